"""skyfuse's benchmark suite: every figure against its floor or its peer, measured side by side.

    .venv/bin/python bench/suite.py                 # everything (make bench), ~15 min on 2 cores
    .venv/bin/python bench/suite.py --only http,fusion
    .venv/bin/python bench/suite.py --smoke --out /tmp/r.json   # the harness end to end, seconds

Writes `bench/results.json` (one entry per figure: key, subject, value, unit, what it was measured
against, goal, met), prints the table and the growth tables, and draws `bench/growth.png`. Exits 1
when a group failed or a key is missing; a missed goal is reported, not an error.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

# group name → module under bench/; the order they run in
GROUPS = {"http": "http_serving", "cold": "cold_start", "fusion": "fusion_speed", "bus": "bus_speed",
          "pipeline": "pipeline_speed", "scheduler": "scheduler_speed"}

# Every key `make bench` must write (issue 13), by group.
KEYS = {
    "http": ["http_p50_overhead_ms", "throughput_vs_peer", "http_p99_ms_c8", "http_b64_p50_ms",
             "cpu_per_request_vs_floor"],
    "cold": ["cold_start_s", "cold_start_vs_tf"],
    "fusion": ["fused_vs_separate_b1", "fused_vs_separate_b1024"],
    "bus": ["host_vs_raw_consumer", "embedded_events_per_s", "scale_out_2_members"],
    "pipeline": ["demo_end_to_end_s"],
    "scheduler": [],
}
GROWTH = {"fusion": ["fused graph latency"], "pipeline": ["pipeline time"], "scheduler": ["scheduler decision time"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: " + ", ".join(GROUPS))
    parser.add_argument("--smoke", action="store_true", help="run the harness end to end in seconds; measure nothing")
    parser.add_argument("--out", type=Path, default=harness.BENCH / "results.json")
    parser.add_argument("--plot", type=Path, default=None, help="the growth plot (default: beside --out, growth.png)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")

    started, failed = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="skyfuse-bench-") as tmp:
        ctx = harness.Context(Path(tmp), smoke=args.smoke)
        for group in groups:
            ctx.progress(f"{group}: starting")
            t0 = time.perf_counter()
            try:
                importlib.import_module(GROUPS[group]).run(ctx)
            except Exception:  # noqa: BLE001 - report it, run the other groups, fail at the end
                failed.append(group)
                ctx.progress(f"{group}: FAILED\n{traceback.format_exc()}")
            ctx.progress(f"{group}: done in {time.perf_counter() - t0:.1f} s")
        elapsed = time.perf_counter() - started
        harness.write(ctx, groups, elapsed, args.out)
        plot = harness.plot_growth(ctx, args.plot or args.out.with_name("growth.png"))

    print(harness.table(ctx))
    if ctx.growths:
        print()
        print(harness.growth_tables(ctx))
    present = {f.key for f in ctx.figures}
    missing = [k for g in groups for k in KEYS[g] if k not in present]
    missing += [f"growth: {n}" for g in groups for n in GROWTH.get(g, []) if n not in {s.name for s in ctx.growths}]
    print(f"\nwrote {args.out}" + (f" and {plot}" if plot else "") + f" in {elapsed:.0f} s"
          + (" (smoke run: the harness, not measurements)" if args.smoke else ""))
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
    if failed:
        print(f"failed groups: {', '.join(failed)}", file=sys.stderr)
    return 1 if missing or failed else 0


if __name__ == "__main__":
    sys.exit(main())
