"""The benchmark suite's frame: figures, goals, progress, `bench/results.json`, the table, the plot.

Each group is a module under `bench/` with `run(ctx: Context) -> None` that measures side by side
in one run and records every figure with `ctx.add(...)`; `bench/suite.py` runs the groups. A
figure is one number with its unit, the key a reader looks up (`http_p99_ms_c8`), the subject it
is about (a host, `None` for one-of-a-kind figures), what it was measured against (the floor or
the peer, in words), and the goal from issue 13 where there is one. Growth series (cost against
the size of the work) go through `ctx.growth(...)` and are drawn in one plot.

`ctx.smoke` (set by `--smoke`, used by `make test`) means: prove the harness runs end to end and
writes every key, not measure. Groups shorten their runs to a fraction of a second and skip what
needs a separate install (BentoML, TensorFlow cold start); a figure not measured is recorded with
value None and the reason, never left out.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for path in (REPO, REPO / "shared"):  # the project's modules, whatever the caller's working directory
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

Number = float | int | None


@dataclass(frozen=True)
class Goal:
    """`value <op> threshold`, op one of `<=`, `>=`."""

    op: str
    threshold: float

    def met(self, value: Number) -> bool | None:
        if value is None:
            return None
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass
class Figure:
    key: str
    value: Number
    unit: str
    against: str  # what it was measured against (the floor, the peer), or how
    subject: str | None = None  # a host or a size; None: one figure for the key
    goal: Goal | None = None
    note: str = ""  # why a value is missing, or what limits it

    def to_data(self) -> dict:
        data = asdict(self)
        data["goal"] = str(self.goal) if self.goal else None
        data["met"] = self.goal.met(self.value) if self.goal else None
        return data


@dataclass
class Growth:
    """One series of cost against size: `(size, value)` points."""

    name: str  # e.g. "fused graph latency"
    size: str  # what grows, e.g. "members K"
    unit: str  # of the value
    points: list[tuple[float, float | None]] = field(default_factory=list)
    note: str = ""


@dataclass
class Context:
    workdir: Path  # scratch space for this run (deleted afterwards)
    smoke: bool = False
    figures: list[Figure] = field(default_factory=list)
    growths: list[Growth] = field(default_factory=list)
    log: object = sys.stderr

    def seconds(self, full: float, smoke: float = 0.3) -> float:
        """A measuring duration: `full` for a real run, `smoke` under --smoke."""
        return smoke if self.smoke else full

    def add(self, key: str, value: Number, unit: str, against: str, subject: str | None = None,
            goal: tuple[str, float] | None = None, note: str = "") -> Figure:
        figure = Figure(key, None if value is None else float(value), unit, against, subject,
                        Goal(*goal) if goal else None, note)
        self.figures.append(figure)
        return figure

    def growth(self, name: str, size: str, unit: str, points: list[tuple[float, float | None]],
               note: str = "") -> Growth:
        series = Growth(name, size, unit, list(points), note)
        self.growths.append(series)
        return series

    def progress(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=self.log, flush=True)


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def results_document(ctx: Context, groups: list[str], seconds: float) -> dict:
    return {"smoke": ctx.smoke, "groups": groups, "seconds": round(seconds, 1), "machine": machine(),
            "figures": [f.to_data() for f in ctx.figures],
            "growth": [asdict(g) for g in ctx.growths]}


def table(ctx: Context) -> str:
    """The figures as a fixed-width table, one row per figure, goals marked."""
    rows = [("figure", "subject", "value", "goal", "", "measured against")]
    for f in ctx.figures:
        value = "—" if f.value is None else f"{f.value:.4g} {f.unit}"
        met = {True: "ok", False: "MISS", None: ""}[f.goal.met(f.value)] if f.goal else ""
        against = f.against + (f" ({f.note})" if f.note else "")
        rows.append((f.key, f.subject or "", value, str(f.goal or ""), met, against))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
    lines.insert(1, "-" * min(160, len(lines[0])))
    return "\n".join(lines)


def growth_tables(ctx: Context) -> str:
    out = []
    for g in ctx.growths:
        first = next((v for _, v in g.points if v), None)
        out.append(f"{g.name} ({g.unit}) by {g.size}" + (f" — {g.note}" if g.note else ""))
        for size, value in g.points:
            ratio = f"  x{value / first:.2f}" if value and first else ""
            out.append(f"  {size:>8g}  {'—' if value is None else f'{value:.4g}'}{ratio}")
    return "\n".join(out)


def plot_growth(ctx: Context, path: Path) -> Path | None:
    """One panel per growth series, log-log, with the linear reference through the first point."""
    series = [g for g in ctx.growths if sum(v is not None for _, v in g.points) >= 2]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), squeeze=False)
    for ax, g in zip(axes[0], series, strict=True):
        points = [(s, v) for s, v in g.points if v is not None]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "o-", label="measured")
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color="grey", label="linear")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the sizes measured, not powers of ten
        ax.set_xlabel(g.size)
        ax.set_ylabel(g.unit)
        ax.set_title(g.name, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("skyfuse: how cost grows with the work", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(ctx: Context, groups: list[str], seconds: float, out: Path) -> dict:
    document = results_document(ctx, groups, seconds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    return document
