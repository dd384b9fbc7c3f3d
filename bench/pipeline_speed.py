"""Group "pipeline": the demo end to end and per stage, where its time goes, and how the pipeline
grows with the number of shards.

- `demo_end_to_end_s`: `skyfuse demo --json` in a fresh folder (embedded bus, local stores, its own
  fleet, the inference servers started, the fused model placed and serving), from the command's
  start to its exit, against the same run's accuracy (the fused model's must match the one the
  demo reports today, and the centralized baseline's). The stages are the run's own milestones.
- where the time goes: the same command sampled by py-spy (the thread holding the GIL, in every
  process), the functions with the most samples, in `bench/pipeline-profile.txt`.
- growth: `skyfuse train` on the demo's data with 1, 4 and 10 shards per cloud (3, 12, 30 shards),
  no serving, from the shard events to fused.ready (`fusion_s`, the pipeline's own clock).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import BENCH, REPO, Context

SHARDS_PER_CLOUD = (1, 4, 10)  # x 3 clouds = 3, 12, 30 shards
# What bounds the growth (py-spy of the 30-shard run); the note of the figure.
GROWTH_LIMIT = ("the 30 tiny shards take 8 rounds to stop improving, 3 take 5; every shard costs each round ~40 ms "
                "here: its training, its .keras file written and read, an ONNX export and parity check, ~8 fsynced "
                "writes and two events (each read by a host in every cloud), all on one process's GIL (a cloud runs "
                "a trainer instance per shard)")
STAGES = {"prepare_s": "split + upload shards", "train_s": "shards trained (round 0)",
          "export_s": "exported to ONNX (round 0)", "fedavg_rounds_s": "FedAvg rounds after the first",
          "fusion_s": "fused.ready", "serving_s": "placed clouds serving it",
          "centralized_train_s": "centralized baseline (after fusion)"}


def _env(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "shared")]),
           "SKYFUSE_BUS__BACKEND": "embedded", "SKYFUSE_BUS__EMBEDDED__PATH": str(folder / "bus"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return env


def _skyfuse(folder: Path, *args: str, prefix: list[str] | None = None, timeout: float = 900) -> tuple[dict, float]:
    """Run `skyfuse ARGS --json` in `folder`; (its summary, wall seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = subprocess.run([*(prefix or []), sys.executable, "-m", "skyfuse.cli", *args, "--json"], cwd=folder,
                         env=_env(folder), capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"skyfuse {' '.join(args)} exited {run.returncode}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1]), seconds


def _profile(ctx: Context, folder: Path) -> Path | None:
    """The demo under py-spy: the top functions by samples, or None without py-spy."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return None
    raw = folder / "profile.txt"
    folder.mkdir(parents=True, exist_ok=True)
    # --gil: only the thread holding the GIL, i.e. where the Python time goes (threads asleep in a
    # poll are not counted); its own summary is not read, the samples are the point.
    subprocess.run([spy, "record", "--format", "raw", "--gil", "--subprocesses", "--rate", "50", "--output", str(raw),
                    "--", sys.executable, "-m", "skyfuse.cli", "demo"], cwd=folder, env=_env(folder),
                   capture_output=True, timeout=900)
    if not raw.exists():
        return None
    totals: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        for frame in dict.fromkeys(f.split(" (")[0] for f in frames):  # inclusive, each function once per stack
            totals[frame] = totals.get(frame, 0) + int(count)
    everything = sum(int(line.rpartition(" ")[2]) for line in raw.read_text().splitlines()) or 1
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:60]
    out = BENCH / "pipeline-profile.txt"
    out.write_text("skyfuse demo under py-spy (50 Hz, the thread holding the GIL, child processes too): share of "
                   "samples in which each function is on the stack\n\n"
                   + "\n".join(f"{100 * n / everything:5.1f}%  {name}" for name, n in top) + "\n")
    return out


def run(ctx: Context) -> None:
    ctx.progress("pipeline: skyfuse demo, end to end")
    summary, wall = _skyfuse(ctx.workdir / "demo", "demo", *(["--rounds", "2"] if ctx.smoke else []))
    fused, central = summary["fused"]["accuracy"], summary["centralized_accuracy"]
    ctx.add("demo_end_to_end_s", wall, "s", f"the demo's own figures: fused {fused:.1%} vs centralized {central:.1%}"
            " test accuracy", goal=("<=", 10.0), note="2 rounds (smoke)" if ctx.smoke else "")
    for key, label in STAGES.items():
        value = summary["timings"].get(key)
        ctx.add("demo_stage_s", value, "s", label + " (seconds from the start of the run)", subject=key)
    ctx.add("demo_fused_accuracy", fused, "fraction", f"centralized {central:.4f}")

    if ctx.smoke:
        ctx.add("demo_profile", None, "", "py-spy samples of the demo", note="skipped (smoke)")
    else:
        ctx.progress("pipeline: the demo again under py-spy")
        profile = _profile(ctx, ctx.workdir / "demo-profile")
        ctx.add("demo_profile", None, "", "py-spy samples of the demo",
                note=f"see {profile.relative_to(REPO)}" if profile else "py-spy not installed (pip install py-spy)")

    from skyfuse.ml import data as mldata

    csv = ctx.workdir / "breast_cancer.csv"
    csv.write_bytes(mldata.to_csv_bytes(mldata.sample_dataset("breast_cancer")))
    points = []
    for per_cloud in (1, 2) if ctx.smoke else SHARDS_PER_CLOUD:
        shards = 3 * per_cloud
        ctx.progress(f"pipeline: {shards} shards, shard events to fused.ready")
        grown, _ = _skyfuse(ctx.workdir / f"shards-{shards}", "train", str(csv), "--target", "diagnosis",
                            "--shards-per-cloud", str(per_cloud), "--no-serve",
                            *(["--rounds", "2"] if ctx.smoke else []))
        points.append((shards, grown["timings"]["fusion_s"]))
        ctx.add("pipeline_s", grown["timings"]["fusion_s"], "s", "shard events published to fused.ready",
                subject=f"{shards} shards")
    ctx.growth("pipeline time", "shards", "s to fused.ready", points,
               note="the demo's data and fusion, no serving" + (" (smoke: 2 rounds)" if ctx.smoke else ""))
    first, last = points[0][1], points[-1][1]
    ctx.add("pipeline_growth_30_vs_3" if not ctx.smoke else "pipeline_growth", last / first if first else None, "x",
            f"pipeline time with {points[-1][0]} shards / with {points[0][0]}", goal=None if ctx.smoke else ("<=", 3.0),
            note=GROWTH_LIMIT)
