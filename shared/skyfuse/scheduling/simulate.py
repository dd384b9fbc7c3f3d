"""A day of synthetic metrics and a simulator that scores placement policies on it.

`generate_trace()` writes the world as `metrics.sampled` data, one sample per cloud per step,
recorded while the traffic was split evenly over the clouds that were up:

- demand: a daily cycle, `night_rps` at 04:00 rising to `peak_rps` at 15:00, ±4 % noise;
- latency: per-cloud p50/p99 with log-normal noise (σ 0.1 on p99); `gcp` is the fastest but
  congests at the daily peak (p99 up to 4× its base, above the 100 ms SLO for ~2.5 h);
- errors: a small per-cloud rate with noise;
- a price change: `aws` requests cost 2.75× from 12:00 (it is the cheapest until then);
- an outage: `aws` stops reporting from 09:00 to 10:00.

`run(trace, policy)` replays the world closed-loop: per step, the demand (the sum of the
recorded `inference` rates) goes where the policy's placement in force says, the policy gets the
samples each cloud would then send (`inference` with the traffic it served, and for an idle
cloud an empty `inference` sample plus a `monitor` probe sample), and may decide; a decision
applies from the next step. Latency, errors and prices of each cloud are the recorded ones
(replicas autoscale with the traffic, so a cloud's latency does not depend on its share), and
a cloud without a sample in a step is down. Per step and serving cloud j with rate r_j:

    cost += replicas_j · price_per_hour_j · step_h + r_j · step_s · price_per_million_requests_j / 1e6
    replicas_j = clamp(ceil(r_j / capacity_rps_j), min_replicas, max_replicas)

(a down cloud still bills its replicas, and its requests fail). A step counts as SLO-violating
when any cloud with traffic is down or has a p99 above the SLO (conservative for a mix).

`load_trace(path)` reads JSON lines of `metrics.sampled` data (your own traces too) and names
the line and field of the first bad one. `python -m skyfuse.scheduling.simulate [TRACE]` prints
the comparison table; `--write PATH` writes the generated trace.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyfuse.errors import InvalidInput
from skyfuse.scheduling.metrics import Sample, SampleError, as_sample, format_time, parse_time
from skyfuse.scheduling.policy import CloudSpec, Decision, Policy, PolicyConfig, StaticPolicy, fleet_clouds, greedy

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

START = "2025-01-14T00:00:00Z"
PROBES_PER_S = 0.2  # the monitor's probe rate on an idle cloud

# Per-cloud character of the generated world: base p50/p99 in ms, base error rate,
# and how much the p99 grows at the daily peak (0: not at all).
PROFILES: dict[str, dict[str, float]] = {
    "aws": {"p50": 18.0, "p99": 50.0, "errors": 0.002, "congestion": 0.0},
    "gcp": {"p50": 11.0, "p99": 30.0, "errors": 0.001, "congestion": 3.0},
    "azure": {"p50": 22.0, "p99": 75.0, "errors": 0.0015, "congestion": 0.0},
}
OTHER_PROFILE = {"p50": 20.0, "p99": 60.0, "errors": 0.002, "congestion": 0.0}


def daily_shape(hour: float) -> float:
    """0 at 04:00, 1 at 15:00, smooth in between (cosine rise over 11 h, fall over 13 h)."""
    h = (hour - 4.0) % 24.0
    if h <= 11.0:
        return 0.5 - 0.5 * math.cos(math.pi * h / 11.0)
    return 0.5 + 0.5 * math.cos(math.pi * (h - 11.0) / 13.0)


def generate_trace(hours: float = 24, step_s: float = 60, seed: int = 0, *, start: str = START,
                   clouds: Mapping[str, CloudSpec] | None = None, night_rps: float = 10.0, peak_rps: float = 900.0,
                   price_change: tuple[str, float, float] | None = ("aws", 12.0, 2.75),
                   outage: tuple[str, float, float] | None = ("aws", 9.0, 10.0),
                   congestion_from: float = 0.9, p99_noise: float = 0.1) -> list[dict[str, Any]]:
    """The synthetic world as `metrics.sampled` data, deterministic for a seed.

    `price_change` = (cloud, from hour, factor on its per-request price); `outage` = (cloud,
    from hour, to hour): no samples for windows ending in that span; `congestion_from`: the
    demand level (fraction of the peak) above which congesting clouds slow down; `p99_noise`: σ of
    the log-normal noise on each p99 (p50 gets half, error rates 0.3)."""
    clouds = dict(clouds) if clouds is not None else fleet_clouds()
    rng = random.Random(seed)
    t0 = parse_time(start)
    out: list[dict[str, Any]] = []
    steps = int(round(hours * 3600 / step_s))
    for k in range(1, steps + 1):
        t = t0 + k * step_s
        hour = (k * step_s / 3600.0) % 24.0
        elapsed_h = k * step_s / 3600.0
        shape = daily_shape(hour)
        demand = max(0.0, (night_rps + (peak_rps - night_rps) * shape) * (1.0 + 0.04 * rng.gauss(0.0, 1.0)))
        up = [c for c in clouds if not (outage and c == outage[0] and outage[1] < elapsed_h <= outage[2])]
        share = demand / len(up) if up else 0.0
        for cloud, spec in clouds.items():
            profile = PROFILES.get(cloud, OTHER_PROFILE)
            noise99, noise50, noise_err = rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0), rng.gauss(0.0, 0.3)
            if cloud not in up:
                continue
            congestion = 1.0 + profile["congestion"] * max(0.0, shape - congestion_from) / (1.0 - congestion_from)
            requests = int(round(share * step_s))
            replicas = max(1, math.ceil(share / spec.capacity_rps))
            per_million = spec.price_per_million_requests
            if price_change and cloud == price_change[0] and elapsed_h > price_change[1]:
                per_million *= price_change[2]
            sigma = p99_noise * (1.0 + 2.0 * math.sqrt(100.0 / max(requests, 1)))  # few requests: noisy p99
            p99 = round(profile["p99"] * congestion * math.exp(sigma * noise99), 1)
            p50 = round(min(p99, profile["p50"] * math.sqrt(congestion) * math.exp(sigma / 2 * noise50)), 1)
            out.append({
                "cloud": cloud, "source": "inference", "window_s": step_s, "sampled_at": format_time(t),
                "requests": requests, "requests_per_s": round(requests / step_s, 3),
                "latency_ms": {"p50": p50, "p99": p99} if requests else {"p50": None, "p99": None},
                "error_rate": round(min(1.0, profile["errors"] * math.exp(noise_err)), 5) if requests else 0.0,
                "load": round(min(1.0, share / (replicas * spec.capacity_rps)), 4),
                "capacity_rps": replicas * spec.capacity_rps, "replicas": replicas,
                "price": {"per_hour": round(spec.price_per_hour, 6), "per_million_requests": round(per_million, 6)},
            })
    return out


# -- trace files ----------------------------------------------------------------------------------

class TraceError(InvalidInput):
    """A bad trace line; the message names the file, line and field."""


def _field_of(error: ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, Mapping):
        missing = [name for name in error.validator_value if name not in error.instance]
        if missing:
            return f"{path}.{missing[0]}" if path else missing[0]
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(name for name in error.instance if name not in allowed)
        if extra:
            return f"{path}.{extra[0]}" if path else extra[0]
    return path or "(root)"


def load_trace(path: str | Path) -> list[dict[str, Any]]:
    """JSON lines of `metrics.sampled` data (blank lines and `#` comments skipped), each checked
    against the event's JSON Schema; raises `TraceError` naming the line and field of a bad one."""
    from jsonschema import Draft202012Validator

    from skyfuse.contracts import events_dir

    schema = json.loads((events_dir() / "schemas" / "metrics.sampled.json").read_text())
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    samples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path} line {number}"
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not validator.is_valid(data):
                errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message))
                first = errors[0]
                more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
                raise TraceError(f"{where}: field {_field_of(first)!r}: {first.message}{more}")
            try:
                Sample.from_data(data)
            except SampleError as exc:
                raise TraceError(f"{where}: field {exc.field!r}: {exc.message}") from None
            samples.append(data)
    return samples


def write_trace(samples: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """JSON lines, one sample a line, in the given order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s, separators=(",", ":")) + "\n" for s in samples), encoding="utf-8")
    return path


# -- the simulator ----------------------------------------------------------------------------------

@dataclass
class Conditions:
    """One cloud in one step, as recorded."""

    samples: list[Sample]
    p50: float | None
    p99: float | None
    error_rate: float
    price_per_hour: float
    price_per_million_requests: float


@dataclass
class Step:
    t: float
    demand_rps: float
    clouds: dict[str, Conditions]  # the clouds up in this step


@dataclass
class World:
    step_s: float
    steps: list[Step]


def build_world(trace: Iterable[Sample | Mapping[str, Any]], step_s: float | None = None) -> World:
    """Group a trace into steps of `step_s` (default: the median `window_s`)."""
    samples = sorted((as_sample(s) for s in trace), key=lambda s: s.t)
    if not samples:
        raise ValueError("empty trace")
    step_s = step_s or statistics.median(s.window_s for s in samples)
    t0 = samples[0].t
    any_inference = any(s.source == "inference" for s in samples)
    grouped: dict[int, dict[str, list[Sample]]] = {}
    for s in samples:
        grouped.setdefault(int(round((s.t - t0) / step_s)), {}).setdefault(s.cloud, []).append(s)
    last_p: dict[str, tuple[float | None, float | None]] = {}
    steps = []
    for k in range(max(grouped) + 1):
        clouds: dict[str, Conditions] = {}
        demand = 0.0
        for cloud, items in sorted(grouped.get(k, {}).items()):
            traffic = [s for s in items if s.source == "inference"] if any_inference else items
            demand += sum(s.requests_per_s for s in traffic)
            with_latency = [s for s in items if s.p99 is not None]
            p99 = max((s.p99 for s in with_latency if s.p99 is not None), default=None)
            p50 = max((s.p50 for s in with_latency if s.p50 is not None), default=None)
            if p99 is None:
                p50, p99 = last_p.get(cloud, (None, None))
            last_p[cloud] = (p50, p99)
            served = [s for s in items if s.requests > 0]
            errors = (sum(s.error_rate * s.requests for s in served) / sum(s.requests for s in served)
                      if served else 0.0)
            latest = items[-1]
            clouds[cloud] = Conditions(items, p50, p99, errors, latest.price_per_hour,
                                       latest.price_per_million_requests)
        steps.append(Step(t0 + k * step_s, demand, clouds))
    return World(step_s, steps)


@dataclass
class Result:
    name: str
    cost_usd: float
    slo_minutes: float  # minutes with traffic on a down cloud or a cloud above the SLO
    down_minutes: float  # of which: traffic on a down cloud
    moves: int  # placement changes after the first placement
    decisions: list[Decision] = field(default_factory=list)
    placements: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)  # (time, clouds) per change


def _emit(step: Step, serving: Mapping[str, float], cfg: PolicyConfig, step_s: float) -> list[Sample]:
    """The samples the clouds would send in this step under the placement `serving`."""
    if not serving:  # nothing placed yet: the world as recorded
        return [s for c in step.clouds.values() for s in c.samples]
    out = []
    for cloud, cond in step.clouds.items():
        rps = step.demand_rps * serving.get(cloud, 0.0)
        requests = int(round(rps * step_s))
        spec = cfg.clouds.get(cloud)
        capacity = spec.capacity_rps if spec else 500.0
        replicas = cfg.replicas_for(cloud, rps) if spec else max(1, math.ceil(rps / capacity))
        sample = partial(Sample, cloud=cloud, t=step.t, window_s=step_s, price_per_hour=cond.price_per_hour,
                         price_per_million_requests=cond.price_per_million_requests)
        if requests > 0:
            out.append(sample(source="inference", requests=requests, requests_per_s=requests / step_s,
                              p50=cond.p50, p99=cond.p99, error_rate=cond.error_rate,
                              load=min(1.0, rps / (max(replicas, 1) * capacity)), replicas=replicas))
        else:
            probes = max(1, int(round(PROBES_PER_S * step_s)))
            out.append(sample(source="inference", requests=0, requests_per_s=0.0, p50=None, p99=None,
                              error_rate=0.0, load=0.0, replicas=0))
            out.append(sample(source="monitor", requests=probes, requests_per_s=probes / step_s, p50=cond.p50,
                              p99=cond.p99, error_rate=cond.error_rate, load=0.0))
    return out


def _account(step: Step, serving: Mapping[str, float], cfg: PolicyConfig, step_s: float,
             last_price: Mapping[str, tuple[float, float]]) -> tuple[float, bool, bool]:
    """(cost, SLO violated, traffic on a down cloud) of one step under `serving`."""
    cost, violated, down = 0.0, False, False
    for cloud, weight in serving.items():
        if weight <= 0:
            continue
        rps = step.demand_rps * weight
        spec = cfg.clouds.get(cloud)
        replicas = cfg.replicas_for(cloud, rps) if spec else max(1, math.ceil(rps / 500.0))
        cond = step.clouds.get(cloud)
        if cond is None:  # down: replicas bill, requests fail
            price_h, _ = last_price.get(cloud, (spec.price_per_hour if spec else 0.0, 0.0))
            cost += replicas * price_h * step_s / 3600.0
            violated = down = True
            continue
        cost += replicas * cond.price_per_hour * step_s / 3600.0 + rps * step_s * cond.price_per_million_requests / 1e6
        if cond.p99 is not None and cond.p99 > cfg.slo_p99_ms:
            violated = True
    return cost, violated, down


def run(trace: Iterable[Sample | Mapping[str, Any]] | World, policy: Policy, *, step_s: float | None = None) -> Result:
    """Simulate `policy` over `trace` (see the module doc); deterministic."""
    world = trace if isinstance(trace, World) else build_world(trace, step_s)
    cfg = policy.config
    state = policy.new_state()
    serving: dict[str, float] = {}
    result = Result(policy.name, 0.0, 0.0, 0.0, 0)
    last_price: dict[str, tuple[float, float]] = {}
    minutes = world.step_s / 60.0
    for step in world.steps:
        for cloud, cond in step.clouds.items():
            last_price[cloud] = (cond.price_per_hour, cond.price_per_million_requests)
        if serving:
            cost, violated, down = _account(step, serving, cfg, world.step_s, last_price)
            result.cost_usd += cost
            result.slo_minutes += minutes if violated else 0.0
            result.down_minutes += minutes if down else 0.0
        state.observe_all(_emit(step, serving, cfg, world.step_s))
        decision = policy.decide(state, step.t)
        if decision is not None:
            result.decisions.append(decision)
            result.moves += decision.kind != "initial"
            serving = {p.cloud: p.weight for p in decision.serving}
            result.placements.append((step.t, tuple(serving)))
    return result


def hindsight_cheapest(trace: Iterable[Sample | Mapping[str, Any]] | World, config: PolicyConfig | None = None,
                       *, step_s: float | None = None) -> Result:
    """Reference, not a policy: every step on the cloud that is up and cheapest *in that very step*
    (it knows the future one step ahead and moves for free): a floor for the cost."""
    world = trace if isinstance(trace, World) else build_world(trace, step_s)
    cfg = config or PolicyConfig()
    result = Result("hindsight cheapest (reference)", 0.0, 0.0, 0.0, 0)
    previous = None
    for step in world.steps[1:]:
        options = []
        for cloud in step.clouds:
            if cfg.is_allowed(cloud):
                cost, violated, _ = _account(step, {cloud: 1.0}, cfg, world.step_s, {})
                options.append((cost, cloud, violated))
        if not options:
            continue
        cost, cloud, violated = min(options)
        result.cost_usd += cost
        result.slo_minutes += world.step_s / 60.0 if violated else 0.0
        if previous is not None and cloud != previous:
            result.moves += 1
            result.placements.append((step.t, (cloud,)))
        previous = cloud
    return result


def compare(trace: Iterable[Sample | Mapping[str, Any]] | World, config: PolicyConfig | None = None,
            *, step_s: float | None = None) -> list[Result]:
    """The policy and its baselines over one trace: policy, greedy, static cheapest, static
    fastest, and the hindsight-cheapest cost floor."""
    world = trace if isinstance(trace, World) else build_world(trace, step_s)
    cfg = config or PolicyConfig()
    results = [run(world, p) for p in (Policy(cfg), greedy(cfg), StaticPolicy(cfg, "cost"), StaticPolicy(cfg, "p99"))]
    results.append(hindsight_cheapest(world, cfg))
    return results


def table(results: list[Result]) -> str:
    """A Markdown table of results; cost also relative to the lowest cost among them."""
    floor = min(r.cost_usd for r in results) or 1.0
    lines = ["| policy | cost (USD) | cost vs lowest | SLO-violating min | of which down | moves |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.cost_usd:.2f} | {r.cost_usd / floor:.3f}× | {r.slo_minutes:.0f} | "
                     f"{r.down_minutes:.0f} | {r.moves} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m skyfuse.scheduling.simulate",
                                     description="Compare the placement policy with its baselines on a metrics trace.")
    parser.add_argument("trace", nargs="?", help="JSON lines of metrics.sampled data (default: the generated day, "
                                                 "what bench/traces/day.jsonl holds)")
    parser.add_argument("--write", metavar="PATH", help="write the generated day trace to PATH and exit")
    parser.add_argument("--decisions", action="store_true", help="also list the policy's decisions")
    args = parser.parse_args(argv)
    if args.write:
        print(write_trace(generate_trace(), args.write))
        return 0
    try:
        trace = load_trace(args.trace) if args.trace else generate_trace()
    except (OSError, TraceError) as exc:
        parser.exit(2, f"error: {exc}\n")
    results = compare(trace)
    print(table(results))
    if args.decisions:
        for d in results[0].decisions:
            print(f"{format_time(d.at)} {d.kind}: {d.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
