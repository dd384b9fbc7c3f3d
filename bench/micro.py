"""Per-call costs of the hot paths that every request or sample pays, with their goals.

    .venv/bin/python bench/micro.py

Speed goals live here, not in the tests (a test must not depend on how fast the machine is).
Each figure is the best of 5 runs of 100,000 calls (2,000 for the signatures); exits 1 when one
misses its goal.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "shared")]

from skyfuse import config, contracts, events, signing  # noqa: E402
from skyfuse.scheduling.clock import EventClock  # noqa: E402
from skyfuse.serving.metrics import LatencyRecorder  # noqa: E402

CALLS = 100_000


def per_call_us(fn, calls: int = CALLS) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def signing_rows(keys_dir: str) -> list[tuple[str, float, float]]:
    """What signing adds to every event: the emitter signs once, each consumer checks once."""
    fleet = config.load(environ={"SKYFUSE_SIGNING__KEYS_DIR": keys_dir})
    signing.ensure_local_keys(fleet)
    signer = signing.load_signer(keys_dir, "aws/scheduler")
    event = events.new_event("placement.changed", contracts.sample("placement.changed"), source="skyfuse://aws/scheduler")
    signer.sign(event)
    return [("sign an event (Ed25519, per emit)", per_call_us(lambda: signer.sign(event), 2000), 200.0),
            ("check an event (verify + producer rule, per delivery)",
             per_call_us(lambda: signing.check(fleet, event), 2000), 500.0)]


def main() -> int:
    recorder = LatencyRecorder()
    clock = EventClock()
    ticks = iter(range(10 ** 9))
    rows = [
        ("LatencyRecorder.record (per request)", per_call_us(lambda: recorder.record(0.0003)), 5.0),
        ("EventClock.accept (per sample)", per_call_us(lambda: clock.accept("aws", float(next(ticks)))), 5.0),
    ]
    with tempfile.TemporaryDirectory() as keys_dir:
        rows += signing_rows(keys_dir)
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
