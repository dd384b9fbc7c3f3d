"""The load signals of the serving processes: figures from two readings (services.monitor.signals),
the new metrics.sampled fields through smoothing, their optional terms in the placement score,
the reason of a move they or the response time drive, and the [scheduler] section of the config."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from services.monitor.signals import Figures, Reading, figures
from skyfuse import config, contracts
from skyfuse.scheduling import CloudSpec, MetricsState, Policy, PolicyConfig, format_time, parse_time
from skyfuse.scheduling.metrics import Sample, SampleError

T0 = parse_time("2025-01-14T00:00:00Z")
GIB = 1 << 30
EQUAL = {c: CloudSpec(price_per_hour=0.04, price_per_million_requests=0.2, capacity_rps=500.0) for c in ("aws", "gcp")}


def reading(at, cpu_s, *, server=(1, 100.0), cores=2, rss=GIB, memory=16 * GIB, net=0.0):
    return Reading(at=at, server=(server,), cpu_s=cpu_s, cores=cores, rss_bytes=rss, memory_bytes=memory,
                   net_bytes=net)


# -- figures from two readings ------------------------------------------------------------------------

def test_cpu_is_the_share_of_the_allotted_cores_used_over_the_window():
    got = figures(reading(100.0, 10.0, net=1000.0), reading(102.0, 11.5, net=5000.0))
    assert got.window_s == 2.0
    assert got.cpu_utilisation == pytest.approx(1.5 / (2.0 * 2))  # 1.5 CPU seconds in 2 s on 2 cores
    assert got.memory_utilisation == pytest.approx(1 / 16)
    assert got.network_bytes_per_s == pytest.approx(2000.0)
    one_core = figures(reading(0.0, 0.0, cores=1), reading(4.0, 3.0, cores=1))
    assert one_core.cpu_utilisation == pytest.approx(0.75)


def test_utilisations_are_capped_at_one():
    got = figures(reading(0.0, 0.0, cores=1), reading(1.0, 1.02, cores=1, rss=20 * GIB))  # tick jitter
    assert got.cpu_utilisation == 1.0 and got.memory_utilisation == 1.0


def test_first_reading_gives_memory_only():
    got = figures(None, reading(5.0, 3.0))
    assert got == Figures(memory_utilisation=pytest.approx(1 / 16))
    assert got.to_data() == {"cpu_utilisation": None, "memory_utilisation": 0.0625, "network_bytes_per_s": None}


@pytest.mark.parametrize("previous, current, why", [
    (reading(0.0, 5.0), reading(1.0, 6.0, server=(2, 200.0)), "another server: a restart"),
    (reading(1.0, 5.0), reading(1.0, 6.0), "a window of no length"),
])
def test_no_rate_across_a_restart_or_an_empty_window(previous, current, why):
    got = figures(previous, current)
    assert got.cpu_utilisation is None and got.network_bytes_per_s is None, why
    assert got.memory_utilisation is not None


def test_counters_going_backwards_or_unknown_give_null():
    back = figures(reading(0.0, 5.0, net=900.0), reading(1.0, 4.0, net=100.0))
    assert back.cpu_utilisation is None and back.network_bytes_per_s is None
    unknown = figures(reading(0.0, 5.0, net=None), reading(1.0, 5.5, net=300.0))
    assert unknown.network_bytes_per_s is None and unknown.cpu_utilisation == pytest.approx(0.25)


def test_no_server_gives_all_null():
    assert figures(reading(0.0, 1.0), None) == Figures()
    assert Figures().to_data() == dict.fromkeys(("cpu_utilisation", "memory_utilisation", "network_bytes_per_s"))


# -- the contract and the smoothing -------------------------------------------------------------------

def sample(cloud, t, *, cpu=None, memory=None, network=None, p99=50.0, rps=100.0, source="inference", **extra):
    requests = int(rps * 60)
    data = {"cloud": cloud, "source": source, "window_s": 60.0, "sampled_at": format_time(t), "requests": requests,
            "requests_per_s": requests / 60.0,
            "latency_ms": {"p50": p99 / 3, "p99": p99} if requests else {"p50": None, "p99": None},
            "error_rate": 0.0, "load": 0.2, "price": {"per_hour": 0.04, "per_million_requests": 0.2}, **extra}
    for name, value in (("cpu_utilisation", cpu), ("memory_utilisation", memory), ("network_bytes_per_s", network)):
        if value is not None:
            data[name] = value
    return data


def test_schema_takes_the_figures_or_null_and_refuses_out_of_range():
    contracts.validate("metrics.sampled", sample("aws", T0, cpu=0.5, memory=0.1, network=1e5))
    contracts.validate("metrics.sampled", sample("aws", T0, cpu_utilisation=None, memory_utilisation=None,
                                                 network_bytes_per_s=None))
    for name, bad in (("cpu_utilisation", 1.5), ("memory_utilisation", -0.1), ("network_bytes_per_s", -1),
                      ("cpu_utilisation", "high")):
        with pytest.raises(contracts.ContractError, match=name):
            contracts.validate("metrics.sampled", sample("aws", T0) | {name: bad})
    description = json.loads((Path(contracts.events_dir()) / "schemas" / "metrics.sampled.json").read_text())
    assert "cpu_utilisation" in description["properties"]["load"]["description"]


def test_sample_reads_and_writes_the_figures():
    s = Sample.from_data(sample("aws", T0, cpu=0.5, memory=0.25, network=2e5))
    assert (s.cpu_utilisation, s.memory_utilisation, s.network_bytes_per_s) == (0.5, 0.25, 2e5)
    assert Sample.from_data(s.to_data()) == s
    plain = Sample.from_data(sample("aws", T0) | {"cpu_utilisation": None})
    assert plain.cpu_utilisation is None and "cpu_utilisation" not in plain.to_data()
    with pytest.raises(SampleError) as err:
        Sample.from_data(sample("aws", T0) | {"cpu_utilisation": 2.0})
    assert err.value.field == "cpu_utilisation"


def test_figures_are_smoothed_from_the_samples_that_carry_them():
    m = MetricsState(half_life_s=60)
    m.observe(sample("aws", T0))
    assert m.view("aws", T0, 150).cpu_utilisation is None  # never reported
    m.observe(sample("aws", T0 + 60, source="monitor", rps=0, cpu=0.2, memory=0.1, network=1000.0))
    m.observe(sample("aws", T0 + 120, source="monitor", rps=0, cpu=0.8, memory=0.1, network=3000.0))
    m.observe(sample("aws", T0 + 180))  # inference: no figures, leaves them alone
    view = m.view("aws", T0 + 180, 150)
    assert view.cpu_utilisation == pytest.approx((0.2 * 0.5 + 0.8) / 1.5)  # one half-life apart
    assert view.memory_utilisation == pytest.approx(0.1)
    assert view.network_bytes_per_s == pytest.approx((1000 * 0.5 + 3000) / 1.5)
    restored = MetricsState.from_data(json.loads(json.dumps(m.to_data())))
    assert restored.view("aws", T0 + 180, 150) == view
    old = m.to_data()
    del old["clouds"]["aws"]["resources"]  # a snapshot from before the figures existed
    assert MetricsState.from_data(old).view("aws", T0 + 180, 150).cpu_utilisation is None


# -- the terms of P -----------------------------------------------------------------------------------

def scored(config: PolicyConfig, **cpu_by_cloud):
    policy = Policy(config)
    state = policy.new_state()
    for cloud in config.clouds:
        state.observe(sample(cloud, T0, cpu=cpu_by_cloud.get(cloud), memory=0.95, network=1.2e8))
    return {s.cloud: s for s in policy.score(state, T0)[0]}


def test_weights_default_to_zero_so_the_figures_change_nothing():
    config = PolicyConfig(clouds=EQUAL)
    with_figures = scored(config, aws=1.0, gcp=0.0)
    policy = Policy(config)
    state = policy.new_state()
    for cloud in config.clouds:
        state.observe(sample(cloud, T0))
    without = {s.cloud: s for s in policy.score(state, T0)[0]}
    assert {c: s.total for c, s in with_figures.items()} == {c: s.total for c, s in without.items()}
    assert set(with_figures["aws"].terms) == {"latency", "errors", "saturation"}
    assert "CPU 100%, memory 95%, network 120.00 MB/s" in with_figures["aws"].note
    assert with_figures["aws"].cpu_utilisation == 1.0


def test_each_term_costs_only_past_the_knee_and_one_when_full():
    config = PolicyConfig(clouds=EQUAL, cpu_weight=2.0, memory_weight=1.0, network_weight=0.5, resource_knee=0.8,
                          network_capacity_bytes_per_s=1e8)
    s = scored(config, aws=0.9, gcp=0.5)
    assert s["aws"].terms["cpu"] == pytest.approx(2.0 * (0.9 - 0.8) / 0.2)
    assert s["gcp"].terms["cpu"] == 0.0  # busy, but below the knee
    assert s["aws"].terms["memory"] == pytest.approx(1.0 * (0.95 - 0.8) / 0.2)
    assert s["aws"].terms["network"] == pytest.approx(0.5)  # 1.2e8 of 1e8: full, capped at 1
    assert s["aws"].performance == pytest.approx(sum(s["aws"].terms.values()))
    assert s["aws"].total - s["gcp"].total == pytest.approx(1.0)  # λ = 1: only the CPU differs
    linear = scored(PolicyConfig(clouds=EQUAL, cpu_weight=3.0, resource_knee=0.0), aws=0.4)
    assert linear["aws"].terms["cpu"] == pytest.approx(1.2)  # knee 0: weight · utilisation
    assert linear["gcp"].terms["cpu"] == 0.0  # not reported: no cost


def test_bad_weights_are_refused():
    for bad, message in ((dict(cpu_weight=-1), "cpu_weight"), (dict(resource_knee=1.0), "resource_knee"),
                         (dict(network_capacity_bytes_per_s=0), "network_capacity")):
        with pytest.raises(ValueError, match=message):
            PolicyConfig(clouds=EQUAL, **bad)


# -- decisions and their reasons ----------------------------------------------------------------------

def run(policy: Policy, ticks: int, start: float, report) -> list:
    """`ticks` one-minute ticks; `report(cloud, t, serving)` gives each cloud's sample."""
    state, decisions = policy.state, []
    for k in range(ticks):
        t = start + 60 * k
        serving = set(state.clouds)
        for cloud in policy.config.clouds:
            state.observe(report(cloud, t, serving))
        decision = policy.decide(state, t)
        if decision:
            decisions.append(decision)
    return decisions


def quick(**kw) -> Policy:
    policy = Policy(PolicyConfig(clouds=EQUAL, dwell_s=120, min_dwell_s=0, half_life_s=30, **kw))
    policy.state = policy.new_state()
    return policy


def test_a_saturated_cpu_moves_serving_and_the_reason_says_so():
    policy = quick(cpu_weight=2.0)
    busy = {"aws": 0.2}
    report = lambda cloud, t, serving: sample(cloud, t, cpu=busy.get(cloud, 0.1),  # noqa: E731
                                              rps=100.0 if cloud in serving or not serving else 0.0,
                                              source="inference" if cloud in serving else "monitor")
    first = run(policy, 1, T0, report)
    assert [d.kind for d in first] == ["initial"] and policy.state.clouds == ("aws",)  # equal: by name
    busy["aws"] = 1.0
    moved = run(policy, 10, T0 + 60, report)
    assert [d.kind for d in moved] == ["move"] and policy.state.clouds == ("gcp",)
    assert re.match(r"move: aws CPU 9\d% vs gcp 10% \(score \d\.\d{3} → \d\.\d{3}\); ", moved[0].reason), \
        moved[0].reason  # smoothed: just under 100 % two minutes after the step
    assert "margin" in moved[0].reason


def test_a_response_time_move_names_the_p99s():
    policy = quick()
    p99 = {"aws": 20.0, "gcp": 30.0}
    report = lambda cloud, t, serving: sample(cloud, t, p99=p99[cloud])  # noqa: E731
    assert [d.kind for d in run(policy, 1, T0, report)] == ["initial"] and policy.state.clouds == ("aws",)
    p99["aws"] = 180.0
    moved = run(policy, 10, T0 + 60, report)
    assert [d.kind for d in moved] == ["move"] and policy.state.clouds == ("gcp",)
    reason = moved[0].reason
    assert re.match(r"move: aws p99 17\d ms vs gcp 30 ms \(score \d\.\d{3} → 1\.300\); ", reason), reason


# -- the [scheduler] section --------------------------------------------------------------------------

def test_scheduler_section_defaults_are_the_policy_defaults():
    assert PolicyConfig.from_fleet(config.Fleet()) == PolicyConfig()
    knobs = {f.name for f in fields(PolicyConfig)} - {"clouds", "lambda_", "allowed"}
    described = config.descriptions(config.Scheduler)
    assert knobs <= set(described)  # every knob of the policy is in the config
    assert all(described.values())


def test_scheduler_section_reaches_the_policy(tmp_path):
    path = tmp_path / "skyfuse.toml"
    path.write_text("lambda = 2.0\n[scheduler]\ndwell_s = 5\nmin_dwell_s = 10\nmargin = 0.05\ncpu_weight = 1.5\n")
    policy = PolicyConfig.from_fleet(config.load(path, environ={"SKYFUSE_SCHEDULER__TOP_K": "2"}))
    assert (policy.dwell_s, policy.min_dwell_s, policy.margin, policy.cpu_weight, policy.top_k, policy.lambda_) == \
           (5.0, 10.0, 0.05, 1.5, 2, 2.0)
    assert PolicyConfig.from_fleet(config.load(path, environ={}), margin=0.3).margin == 0.3  # overrides win


@pytest.mark.parametrize("toml, words", [
    ("[scheduler]\ndwel_s = 5\n", ["scheduler.dwel_s", "did you mean 'dwell_s'"]),
    ("[scheduler]\nmargin = 1.5\n", ["scheduler.margin: must be float < 1.0 (got 1.5)"]),
    ("[scheduler]\ncpu_weight = -1\n", ["scheduler.cpu_weight: must be float >= 0.0 (got -1)"]),
])
def test_bad_scheduler_keys_are_named(tmp_path, toml, words):
    path = tmp_path / "skyfuse.toml"
    path.write_text(toml)
    with pytest.raises(config.ConfigError) as err:
        config.load(path, environ={})
    for word in words:
        assert word in str(err.value)
