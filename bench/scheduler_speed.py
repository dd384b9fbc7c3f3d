"""Scheduler speed: the time `Policy.decide` takes with N clouds configured and reporting.

Each cloud has reported ten one-minute `metrics.sampled` windows (prices and p99s that differ from
cloud to cloud, the demand spread over all), and the initial placement is made; what is timed is
a steady-state decision at the newest sample's time: score every cloud, rank, compare with the
current placement (usually: keep it). The scheduler takes one such decision per sample it reads.
"""
from __future__ import annotations

import timeit

import harness  # puts the project's modules on sys.path
from skyfuse.scheduling import CloudSpec, Policy, PolicyConfig, State, format_time, parse_time

SIZES, SMOKE_SIZES = (3, 30, 300), (3, 30)
T0 = parse_time("2025-01-14T00:00:00Z")
WINDOW_S = 60.0
WINDOWS = 10
DEMAND_RPS = 300.0
ROUNDS = 7  # the sizes take turns, each keeps its best round


def sample(cloud: str, t: float, rps: float, p99: float, per_hour: float) -> dict:
    requests = round(rps * WINDOW_S)
    return {"cloud": cloud, "source": "inference", "window_s": WINDOW_S, "sampled_at": format_time(t),
            "requests": requests, "requests_per_s": requests / WINDOW_S,
            "latency_ms": {"p50": p99 / 3, "p99": p99}, "error_rate": 0.001, "load": min(1.0, rps / 500.0),
            "price": {"per_hour": per_hour, "per_million_requests": 0.2}}


def fleet(n: int) -> tuple[Policy, State, float]:
    """A policy over n clouds, its state fed WINDOWS samples per cloud and placed; and the time now."""
    prices = {f"cloud{i:03d}": 0.04 + 0.001 * (i % 7) for i in range(n)}
    specs = {cloud: CloudSpec(price_per_hour=price, capacity_rps=500.0) for cloud, price in prices.items()}
    policy = Policy(PolicyConfig(clouds=specs))
    state = policy.new_state()
    for step in range(WINDOWS):
        for i, (cloud, price) in enumerate(prices.items()):
            p99 = 40.0 + (i * 37 + step * 11) % 50  # differs by cloud and window
            state.observe(sample(cloud, T0 + step * WINDOW_S, DEMAND_RPS / n, p99, price))
    now = T0 + (WINDOWS - 1) * WINDOW_S
    if policy.decide(state, now) is None:
        raise AssertionError(f"no initial placement over {n} clouds")
    return policy, state, now


def run(ctx: harness.Context) -> None:
    sizes = SMOKE_SIZES if ctx.smoke else SIZES
    deciders = {}
    for n in sizes:
        ctx.progress(f"scheduler: {n} clouds")
        policy, state, now = fleet(n)
        deciders[n] = lambda policy=policy, state=state, now=now: policy.decide(state, now)
    seconds = ctx.seconds(3.0, 0.05)
    calls = {n: max(1, int(seconds / ROUNDS / len(sizes) / min(timeit.Timer(f).repeat(3, 1))))
             for n, f in deciders.items()}
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(ROUNDS):
        for n, decide in deciders.items():
            best[n] = min(best[n], timeit.Timer(decide).timeit(calls[n]) / calls[n] * 1e3)
    smoke = "smoke run: N = 3, 30 only, a few ms each, not a measurement" if ctx.smoke else ""
    for n in sizes:
        ctx.add("scheduler_decision_ms", best[n], "ms", "one decision (Policy.decide) with every cloud reporting",
                subject=f"{n} clouds", note="; ".join(filter(None, [f"{best[n] / n * 1e3:.1f} µs per cloud", smoke])))
    ctx.growth("scheduler decision time", "clouds", "ms per decision", list(best.items()),
               note=f"{WINDOWS} one-minute samples per cloud, steady state" + (f"; {smoke}" if smoke else ""))
