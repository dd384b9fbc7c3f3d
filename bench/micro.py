"""Per-call costs of the hot paths that every request or sample pays, with their goals.

    .venv/bin/python bench/micro.py

Speed goals live here, not in the tests (a test must not depend on how fast the machine is).
Each figure is the best of 5 runs of 100,000 calls; exits 1 when one misses its goal.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "shared")]

from skyfuse.scheduling.clock import EventClock  # noqa: E402
from skyfuse.serving.metrics import LatencyRecorder  # noqa: E402

CALLS = 100_000


def per_call_us(fn) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / CALLS * 1e6


def main() -> int:
    recorder = LatencyRecorder()
    clock = EventClock()
    ticks = iter(range(10 ** 9))
    rows = [
        ("LatencyRecorder.record (per request)", per_call_us(lambda: recorder.record(0.0003)), 5.0),
        ("EventClock.accept (per sample)", per_call_us(lambda: clock.accept("aws", float(next(ticks)))), 5.0),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'hot path':<{width}}  {'µs/call':>8}  {'goal':>6}")
    missed = 0
    for name, value, goal in rows:
        ok = value < goal
        missed += not ok
        print(f"{name:<{width}}  {value:8.2f}  <{goal:5.1f}  {'ok' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
