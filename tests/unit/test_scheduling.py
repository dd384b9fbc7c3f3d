"""The placement policy (skyfuse.scheduling): smoothing, scoring, hysteresis, failover,
constraints, the placement.changed contract, replay and the day simulation."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from skyfuse import config
from skyfuse.scheduling import (
    CloudSpec,
    MetricsState,
    Policy,
    PolicyConfig,
    differences,
    format_time,
    greedy,
    parse_time,
    replay,
)
from skyfuse.scheduling.metrics import Ewma, Sample, SampleError
from skyfuse.scheduling.simulate import TraceError, compare, generate_trace, load_trace, run, table, write_trace

SCHEMA = json.loads((Path(__file__).parents[2] / "events" / "schemas" / "placement.changed.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
SHIPPED_TRACE = Path(__file__).parents[2] / "bench" / "traces" / "day.jsonl"
T0 = parse_time("2025-01-14T00:00:00Z")
STEP = 60.0
SHA = "32546e71c151029249edeb557eff47b13bb2fa940a8224a2e7a595b9f18601ee"
EQUAL = {c: CloudSpec(price_per_hour=0.04, price_per_million_requests=0.2, capacity_rps=500.0)
         for c in ("aws", "gcp", "azure")}


def data(cloud, t, *, rps=100.0, p99=50.0, errors=0.001, per_hour=0.04, per_million=0.2, source="inference",
         window=STEP):
    requests = int(round(rps * window))
    return {"cloud": cloud, "source": source, "window_s": window, "sampled_at": format_time(t),
            "requests": requests, "requests_per_s": requests / window,
            "latency_ms": {"p50": p99 / 3, "p99": p99} if requests else {"p50": None, "p99": None},
            "error_rate": errors if requests else 0.0, "load": min(1.0, rps / 500.0),
            "price": {"per_hour": per_hour, "per_million_requests": per_million}}


class World:
    """A tiny closed loop: each tick every cloud that is up reports what it would under the
    current placement (traffic to the placed clouds, probes to the others), then the policy decides."""

    def __init__(self, policy: Policy, demand=300.0, **clouds):
        self.policy, self.state, self.demand = policy, policy.new_state(), demand
        self.clouds = {name: dict(p99=50.0, errors=0.001, per_hour=0.04, per_million=0.2, up=True) | cond
                       for name, cond in clouds.items()}
        self.decisions = []

    def tick(self, t):
        weights = {p.cloud: p.weight for p in self.state.placements}
        for cloud, cond in self.clouds.items():
            if not cond["up"]:
                continue
            share = weights.get(cloud, 0.0) if weights else 1.0 / len(self.clouds)
            kw = {k: cond[k] for k in ("p99", "errors", "per_hour", "per_million")}
            self.state.observe(data(cloud, t, rps=self.demand * share, **kw))
            if share == 0:
                self.state.observe(data(cloud, t, rps=0.2, source="monitor", **kw))
        decision = self.policy.decide(self.state, t)
        if decision is not None:
            self.decisions.append(decision)
        return decision

    def run(self, start, end):
        """Ticks at start, start+STEP, ... < end; returns the decisions taken."""
        out = []
        t = start
        while t < end:
            d = self.tick(t)
            if d:
                out.append(d)
            t += STEP
        return out

    @property
    def placed(self):
        return self.state.clouds


def cfg(**kw) -> PolicyConfig:
    return PolicyConfig(clouds=kw.pop("clouds", EQUAL), **kw)


# -- metrics ------------------------------------------------------------------------------------------

def test_ewma_half_life_first_value_and_order_independence():
    e = Ewma(60.0)
    e.add(0.0, 10.0)
    assert e.value == 10.0  # no bias towards zero
    e.add(60.0, 0.0)  # one half-life later: old weight 0.5, new 1 → 10·0.5/1.5
    assert e.value == pytest.approx(10 * 0.5 / 1.5)
    rng = random.Random(1)
    points = [(t * 30.0, rng.random()) for t in range(50)]
    a, b = Ewma(90.0), Ewma(90.0)
    for t, x in points:
        a.add(t, x)
    for t, x in rng.sample(points, len(points)):
        b.add(t, x)
    assert a.value == pytest.approx(b.value, rel=1e-12)


def test_missing_samples_do_not_bias_and_stale_cloud_is_down():
    m = MetricsState(half_life_s=120)
    for k in range(10):
        if k not in (4, 5, 6):  # three lost windows
            m.observe(data("aws", T0 + k * STEP, p99=40.0, rps=10.0))
    view = m.view("aws", T0 + 9 * STEP, stale_after_s=150)
    assert view.p99_ms == pytest.approx(40.0) and view.requests_per_s == pytest.approx(10.0)
    assert not view.stale
    assert m.view("aws", T0 + 9 * STEP + 151, stale_after_s=150).stale
    assert m.view("gcp", T0, stale_after_s=150) is None


def test_empty_windows_do_not_touch_latency_or_errors():
    m = MetricsState()
    m.observe(data("aws", T0, p99=40.0, errors=0.01))
    m.observe(data("aws", T0 + 60, rps=0.0))  # no requests: latency null, error rate meaningless
    view = m.view("aws", T0 + 60, 150)
    assert view.p99_ms == 40.0 and view.error_rate == pytest.approx(0.01)


def test_latency_is_the_worse_of_the_servers_timing_and_the_probes():
    """The server times its handler; the monitor's probes time the whole wait from outside, which
    includes the queue before a busy server reads a request. Each is smoothed on its own and the
    cloud is as slow as the worse, whatever the order the samples arrive in."""
    m = MetricsState(half_life_s=120)
    for k in range(5):
        m.observe(data("aws", T0 + k * STEP, p99=2.0))  # the handler: fast
        m.observe(data("aws", T0 + k * STEP, p99=30.0, rps=3.0, source="monitor"))  # callers wait behind a queue
    view = m.view("aws", T0 + 4 * STEP, 150)
    assert view.p99_ms == pytest.approx(30.0) and view.p50_ms == pytest.approx(10.0)
    m.observe(data("gcp", T0, p99=50.0))  # a slow model with no queue: the handler's own time shows it
    m.observe(data("gcp", T0, p99=1.0, rps=3.0, source="monitor"))
    assert m.view("gcp", T0, 150).p99_ms == pytest.approx(50.0)
    restored = MetricsState.from_data(json.loads(json.dumps(m.to_data())))
    assert restored.view("aws", T0 + 4 * STEP, 150) == view


def test_a_server_without_traffic_no_longer_speaks_for_its_latency():
    """A check's big batch left the server's p99 at 40 ms; once it reports empty windows the probes
    (2 ms) tell the cloud's latency, until traffic comes back. With neither source current, the
    figure is the one heard last."""
    m = MetricsState(half_life_s=120)
    m.observe(data("aws", T0, p99=40.0))
    m.observe(data("aws", T0, p99=2.0, rps=3.0, source="monitor"))
    assert m.view("aws", T0, 150).p99_ms == pytest.approx(40.0)
    m.observe(data("aws", T0 + 60, rps=0.0))  # idle now
    m.observe(data("aws", T0 + 60, p99=2.0, rps=3.0, source="monitor"))
    assert m.view("aws", T0 + 60, 150).p99_ms == pytest.approx(2.0)
    m.observe(data("aws", T0 + 120, p99=30.0))  # serving again
    assert m.view("aws", T0 + 120, 150).p99_ms == pytest.approx(30.0 * 2 / 3 + 40.0 / 3, rel=0.05)
    m.observe(data("aws", T0 + 180, rps=0.0))
    m.observe(data("aws", T0 + 180, rps=0.0, source="monitor"))  # no probe answered either
    assert m.view("aws", T0 + 180, 150).p99_ms == m.clouds["aws"].p99["inference"].value


def test_a_state_saved_with_one_latency_figure_restores_it_as_the_servers():
    m = MetricsState(half_life_s=120)
    m.observe(data("aws", T0, p99=40.0))
    saved = m.to_data()
    for name in ("p50", "p99"):  # the layout before latency was kept per source
        saved["clouds"]["aws"][name] = saved["clouds"]["aws"][name]["inference"]
    assert MetricsState.from_data(saved).view("aws", T0, 150).p99_ms == pytest.approx(40.0)


def test_sample_errors_name_the_field():
    bad = data("aws", T0)
    bad["latency_ms"]["p99"] = -1
    with pytest.raises(SampleError) as err:
        Sample.from_data(bad)
    assert err.value.field == "latency_ms.p99"
    with pytest.raises(SampleError, match="sampled_at"):
        Sample.from_data(data("aws", T0) | {"sampled_at": "2025-01-14T00:00:00"})


# -- hysteresis ---------------------------------------------------------------------------------------

def test_price_rise_moves_only_after_the_dwell_time_and_to_the_next_best_cloud():
    policy = Policy(cfg())
    w = World(policy, aws=dict(per_million=0.2), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    first = w.run(T0, T0 + 1800)
    assert [d.kind for d in first] == ["initial"] and w.placed == ("aws",)
    rise = T0 + 1800
    w.clouds["aws"]["per_million"] = 1.5
    before = w.run(rise, rise + policy.config.dwell_s)  # the better option is better, but not for long enough
    assert before == [] and w.placed == ("aws",)
    moved = w.tick(rise + policy.config.dwell_s)
    assert moved is not None and moved.kind == "move"
    assert w.placed == ("gcp",)  # gcp is cheaper than azure
    assert [p.cloud for p in moved.previous] == ["aws"]
    assert {p.cloud: (p.weight, p.replicas) for p in moved.placements} == {"gcp": (1.0, 1), "aws": (0.0, 0)}
    assert "margin" in moved.reason and "aws" in moved.reason and "gcp" in moved.reason


def test_latency_spike_moves_after_dwell():
    policy = Policy(cfg())
    w = World(policy, aws=dict(p99=40.0), gcp=dict(p99=55.0), azure=dict(p99=70.0))
    w.run(T0, T0 + 1800)
    assert w.placed == ("aws",)
    spike = T0 + 1800
    w.clouds["aws"]["p99"] = 400.0
    moves = w.run(spike, spike + 1200)
    assert len(moves) == 1 and w.placed == ("gcp",)
    assert moves[0].at >= spike + policy.config.dwell_s
    assert moves[0].at <= spike + policy.config.dwell_s + 3 * STEP  # smoothing adds at most a few samples


def test_no_move_before_min_dwell_even_when_better():
    policy = Policy(cfg(min_dwell_s=1800, dwell_s=120))
    w = World(policy, aws=dict(per_million=0.2), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 300)
    w.clouds["aws"]["per_million"] = 2.0
    assert w.run(T0 + 300, T0 + 1800) == []
    move = w.tick(T0 + 1800)
    assert move is not None and move.kind == "move" and w.placed == ("gcp",)


def test_better_option_must_stay_better_continuously():
    policy = Policy(cfg())
    w = World(policy, aws=dict(per_million=0.2), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 1800)
    t = T0 + 1800
    for _ in range(10):  # aws dearer for 4 minutes, then cheap for 1, again and again: never 5 in a row
        w.clouds["aws"]["per_million"] = 1.5
        assert w.run(t, t + 240) == []
        w.clouds["aws"]["per_million"] = 0.2
        assert w.run(t + 240, t + 300) == []
        t += 300
    assert w.placed == ("aws",)


def test_noisy_equal_clouds_never_flap():
    rng = random.Random(7)
    policy, fast = Policy(cfg()), greedy(cfg())
    worlds = [World(policy, aws={}, gcp={}, azure={}), World(fast, aws={}, gcp={}, azure={})]
    for k in range(3 * 24 * 60):  # three days of one-minute samples
        jitter = {c: dict(p99=50.0 * math.exp(rng.gauss(0, 0.25)), errors=0.001 * math.exp(rng.gauss(0, 0.5)))
                  for c in ("aws", "gcp", "azure")}
        demand = 300.0 * math.exp(rng.gauss(0, 0.1))
        for w in worlds:
            w.demand = demand
            for c, j in jitter.items():
                w.clouds[c].update(j)
            w.tick(T0 + k * STEP)
    assert [d.kind for d in worlds[0].decisions] == ["initial"]
    assert len(worlds[1].decisions) > 20  # the same noise makes the greedy baseline flap


# -- failover -----------------------------------------------------------------------------------------

def test_failover_is_immediate_when_the_placed_cloud_stops_reporting():
    policy = Policy(cfg(min_dwell_s=3600, dwell_s=600))
    w = World(policy, aws=dict(per_million=0.2), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 300)  # placed 5 minutes ago: far inside min_dwell
    last = T0 + 240
    w.clouds["aws"]["up"] = False
    t = T0 + 300
    while t - last <= policy.config.stale_after_s:
        assert w.tick(t) is None
        t += STEP
    failover = w.tick(t)  # the first decision after stale_after_s
    assert failover is not None and failover.kind == "failover" and w.placed == ("gcp",)
    assert "stale" in failover.reason
    aws = next(s for s in failover.scores if s.cloud == "aws")
    assert not aws.eligible and "treated as down" in aws.note


def test_failover_on_heavy_errors():
    policy = Policy(cfg(min_dwell_s=3600))
    w = World(policy, aws=dict(per_million=0.2), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 300)
    w.clouds["aws"]["errors"] = 0.9
    decisions = w.run(T0 + 300, T0 + 300 + 2 * STEP)
    assert [d.kind for d in decisions] == ["failover"] and w.placed == ("gcp",)


def test_no_decision_when_nothing_is_eligible():
    policy = Policy(cfg())
    w = World(policy, aws={}, gcp={}, azure={})
    w.run(T0, T0 + 120)
    for c in w.clouds.values():
        c["up"] = False
    assert w.run(T0 + 120, T0 + 1200) == []  # nowhere to go: keep what serves
    assert len(w.placed) == 1


# -- constraints --------------------------------------------------------------------------------------

def test_disallowed_cloud_is_never_chosen():
    policy = Policy(cfg(allowed=("gcp", "azure")))
    w = World(policy, aws=dict(per_million=0.01, p99=10.0), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 2 * 3600)
    w.clouds["gcp"]["up"] = False
    w.run(T0 + 2 * 3600, T0 + 4 * 3600)
    assert w.decisions and all("aws" not in {p.cloud for p in d.serving} for d in w.decisions)
    assert w.placed == ("azure",)
    aws = next(s for s in w.decisions[-1].scores if s.cloud == "aws")
    assert not aws.eligible and aws.note == "not allowed by the policy"


def test_capacity_is_respected():
    clouds = dict(EQUAL) | {"aws": CloudSpec(0.04, 0.01, capacity_rps=100.0, max_replicas=2)}
    policy = Policy(cfg(clouds=clouds))
    w = World(policy, demand=300.0, aws={}, gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 600)
    assert w.placed == ("gcp",)  # aws is far cheaper but holds only 200 rps
    aws = next(s for s in w.decisions[0].scores if s.cloud == "aws")
    assert not aws.eligible and "can hold only 67%" in aws.note


def test_load_beyond_every_cloud_is_spread_within_capacity():
    clouds = {c: CloudSpec(0.04, 0.2, capacity_rps=100.0, max_replicas=2) for c in ("aws", "gcp", "azure")}
    policy = Policy(cfg(clouds=clouds))
    w = World(policy, demand=500.0, aws=dict(p99=30.0), gcp=dict(p99=40.0), azure=dict(p99=50.0))
    w.tick(T0)
    (decision,) = w.decisions
    weights = {p.cloud: p.weight for p in decision.serving}
    assert set(weights) == {"aws", "gcp", "azure"} and sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(w_ * 500.0 <= 200.0 + 1e-6 for w_ in weights.values())
    assert all(p.replicas <= 2 for p in decision.serving)


def test_min_replicas_and_top_k_weights():
    policy = Policy(cfg(min_replicas=2, top_k=2))
    w = World(policy, demand=5.0, aws=dict(p99=30.0), gcp=dict(p99=60.0), azure=dict(p99=90.0))
    w.run(T0, T0 + 600)
    (decision,) = w.decisions
    serving = decision.serving
    assert [p.cloud for p in serving] == ["aws", "gcp"]
    assert sum(p.weight for p in serving) == pytest.approx(1.0, abs=1e-9)
    assert serving[0].weight > serving[1].weight  # ∝ 1/score: the better one takes more
    scores = {s.cloud: s.total for s in decision.scores}
    assert serving[0].weight / serving[1].weight == pytest.approx(scores["gcp"] / scores["aws"], rel=1e-3)
    assert all(p.replicas == 2 for p in serving)  # 5 rps needs 1 replica; the floor is 2
    idle = Policy(cfg(min_replicas=0))
    state = idle.new_state()
    for cloud in ("aws", "gcp", "azure"):  # no traffic at all, only probes
        state.observe(data(cloud, T0, rps=0.0))
        state.observe(data(cloud, T0, rps=0.2, source="monitor"))
    first = idle.decide(state, T0)
    assert [p.replicas for p in first.serving] == [1]  # serving means a replica; 0 would mean "remove"
    assert VALIDATOR.is_valid(first.to_event_data("v1", "file:///m.onnx", SHA, "aws"))


def test_config_from_fleet_and_validation():
    fleet = config.load(environ={"SKYFUSE_LAMBDA": "0.5", "SKYFUSE_CLOUDS__GCP__CAPACITY_RPS": "120"})
    c = PolicyConfig.from_fleet(fleet, margin=0.2)
    assert c.lambda_ == 0.5 and c.margin == 0.2 and c.clouds["gcp"].capacity_rps == 120.0
    assert list(c.clouds) == ["aws", "gcp", "azure"]
    with pytest.raises(ValueError, match="allowed"):
        PolicyConfig(allowed=("oracle",))
    with pytest.raises(ValueError, match="margin"):
        PolicyConfig(margin=1.5)


def test_scores_follow_the_documented_formula():
    policy = Policy(cfg(lambda_=2.0))
    state = policy.new_state()
    state.observe(data("aws", T0, rps=600.0, p99=120.0, errors=0.02, per_hour=0.05, per_million=0.2))
    state.observe(data("gcp", T0, rps=0.0))
    state.observe(data("gcp", T0, rps=0.2, source="monitor", p99=50.0, per_hour=0.04, per_million=0.4))
    scores, load = policy.score(state, T0)
    s = {x.cloud: x for x in scores}
    assert load == pytest.approx(600.0)  # probes are not demand
    usd_aws = 2 * 0.05 + 600 * 3600 * 0.2 / 1e6  # ceil(600/500) replicas
    usd_gcp = 2 * 0.04 + 600 * 3600 * 0.4 / 1e6
    assert s["aws"].usd_per_hour == pytest.approx(usd_aws) and s["gcp"].usd_per_hour == pytest.approx(usd_gcp)
    assert s["aws"].cost == pytest.approx(1.0) and s["gcp"].cost == pytest.approx(usd_gcp / usd_aws)
    perf_aws = 1.2 + 4 * 0.2 + 0.02 / 0.01 + 0  # utilisation 60 %: under the knee
    assert s["aws"].performance == pytest.approx(perf_aws)
    assert s["aws"].total == pytest.approx(1.0 + 2.0 * perf_aws)
    assert not s["azure"].eligible and s["azure"].note == "no metrics yet"


# -- contract, replay, simulation ---------------------------------------------------------------------

def test_decision_event_data_validates_against_the_schema():
    policy = Policy(cfg(top_k=2))
    w = World(policy, aws=dict(per_million=0.2), gcp=dict(per_million=0.3), azure=dict(per_million=0.4))
    w.run(T0, T0 + 600)
    w.clouds["aws"]["up"] = False
    w.run(T0 + 600, T0 + 1200)
    assert [d.kind for d in w.decisions] == ["initial", "failover"]
    for decision in w.decisions:
        event = decision.to_event_data("r1-wavg-3f2a1c", "s3://skyfuse-aws/runs/r1/fused/r1-wavg-3f2a1c.onnx",
                                       SHA, "aws")
        errors = [e.message for e in VALIDATOR.iter_errors(event)]
        assert errors == []
        assert {s["cloud"] for s in event["scores"]} == {"aws", "gcp", "azure"}
        assert sum(p["weight"] for p in event["placements"]) == pytest.approx(1.0, abs=1e-9)
        assert event["policy"] == {"margin": 0.15, "dwell_s": 900.0, "min_replicas": 1}
    failover = w.decisions[1].to_event_data("v1", "file:///m.onnx", SHA, "aws", decision_id="d-1",
                                            decided_at="2025-01-14T00:11:00Z")
    assert failover["decision_id"] == "d-1" and failover["previous"] and failover["trigger"] == "metrics"
    assert {"cloud": "aws", "weight": 0.0, "replicas": 0} in failover["placements"]  # removed explicitly
    assert VALIDATOR.is_valid(failover)


def test_replay_is_deterministic():
    trace = generate_trace(hours=12, seed=3)
    first, second = replay(trace), replay(list(trace))
    assert len(first) >= 2
    assert [d.to_dict() for d in first] == [d.to_dict() for d in second]
    events = [d.to_event_data("v1", "file:///m.onnx", SHA, "aws") for d in first]
    assert differences(events, replay(trace)) == []
    assert [e["decision_id"] for e in events] == [d.to_event_data("v1", "file:///m.onnx", SHA, "aws")["decision_id"]
                                                  for d in second]
    changed = replay(trace, cfg(margin=0.0, dwell_s=0.0, min_dwell_s=0.0, clouds=PolicyConfig().clouds))
    assert differences(events, changed)  # a different policy does not pass as the recorded one


def test_shipped_trace_is_the_generated_one_and_the_policy_beats_the_baselines():
    trace = load_trace(SHIPPED_TRACE)
    assert trace == generate_trace()  # deterministic, regenerated by `--write`; `skyfuse simulate` generates it
    results = {r.name: r for r in compare(trace)}
    print("\n" + table(list(results.values())))
    policy, fast = results["policy"], results["greedy"]
    cheap, fastest = results["static cheapest"], results["static fastest"]
    floor = results["hindsight cheapest (reference)"]
    assert policy.moves < fast.moves and policy.moves * 3 <= fast.moves
    assert policy.slo_minutes < cheap.slo_minutes and policy.slo_minutes < fastest.slo_minutes
    assert cheap.down_minutes >= 60 and policy.down_minutes <= 3  # the outage hits the static placement
    assert policy.cost_usd <= 1.05 * floor.cost_usd
    assert policy.cost_usd < cheap.cost_usd and policy.cost_usd < fastest.cost_usd
    kinds = [d.kind for d in policy.decisions]
    assert kinds.count("failover") == 1 and kinds[0] == "initial"


def test_run_is_deterministic():
    trace = generate_trace(hours=6, seed=5)
    a, b = run(trace, Policy()), run(trace, Policy())
    assert (a.cost_usd, a.slo_minutes, a.moves) == (b.cost_usd, b.slo_minutes, b.moves)
    assert [d.to_dict() for d in a.decisions] == [d.to_dict() for d in b.decisions]


def test_trace_loader_names_line_and_field(tmp_path):
    good = generate_trace(hours=0.05)
    path = write_trace(good, tmp_path / "t.jsonl")
    assert load_trace(path) == good

    def broken(mutate, line=2):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        mutate(rows[line - 1])
        bad = tmp_path / "bad.jsonl"
        bad.write_text("# a comment\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
        with pytest.raises(TraceError) as err:
            load_trace(bad)
        return str(err.value)

    message = broken(lambda r: r["latency_ms"].update(p99=-5))
    assert "line 3" in message and "'latency_ms.p99'" in message  # the comment is line 1
    assert "'price'" in broken(lambda r: r.pop("price"))
    assert "'sampled_at'" in broken(lambda r: r.update(sampled_at="yesterday"))
    assert "'colour'" in broken(lambda r: r.update(colour="blue"))
    bad = tmp_path / "json.jsonl"
    bad.write_text(path.read_text() + "{not json\n")
    with pytest.raises(TraceError, match=rf"line {len(good) + 1}: not valid JSON"):
        load_trace(bad)
