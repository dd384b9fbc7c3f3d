"""The picture of one or more training runs, as a PNG and an HTML page that shows it with the figures:

- test accuracy per shard model, per fusion strategy and of the centralized baseline, with the
  validation accuracy that chose the strategy beside it; the axis starts at chance level (labelled),
  not at an arbitrary value that would make small gaps look large; over several runs (seeds), the
  mean with the spread (min to max) as error bars;
- time per stage of the (first) run;
- the placement timeline: which cloud served the run's model when, and what each cloud cost.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Summary = dict[str, Any]  # a run's summary.json, as written by `skyfuse train`

STAGES = (("split + upload shards", "prepare_s"), ("shards trained", "train_s"), ("exported to ONNX", "export_s"),
          ("fused.ready", "fusion_s"), ("placed clouds serving", "serving_s"),
          ("centralized baseline", "centralized_train_s"))


def accuracy_rows(summaries: list[Summary]) -> list[dict[str, Any]]:
    """One row per model (shard i, each strategy, centralized): test accuracy over the runs, and the
    validation accuracy that chose among strategies."""
    labels: dict[str, dict[str, Any]] = {}

    def add(label: str, kind: str, test: float | None, validation: float | None = None) -> None:
        row = labels.setdefault(label, {"label": label, "kind": kind, "test": [], "validation": []})
        if test is not None:
            row["test"].append(test)
        if validation is not None:
            row["validation"].append(validation)

    for s in summaries:
        for shard in s["shards"]:
            add(f"shard {shard['shard_id']} ({shard['cloud']})", "shard", shard["accuracy"])
        for name, acc in s["strategies"].items():
            kind = "chosen" if name == s["fused"]["strategy"] else "strategy"
            add(name, kind, acc, s.get("validation", {}).get(name))
        add("centralized", "centralized", s["centralized_accuracy"])
    return [r for r in labels.values() if r["test"]]


def chance(summary: Summary) -> float:
    """Accuracy of guessing among the classes: the floor of the accuracy axis."""
    classes = summary.get("classes")  # runs recorded before it was kept: the axis starts at 0
    return 1 / len(classes) if classes else 0.0


def timeline(placements: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The run's placement decisions in time order: when, each cloud's weight and cost score."""
    rows: list[dict[str, Any]] = []
    for p in sorted(placements, key=lambda p: p["decided_at"]):
        costs = {s["cloud"]: s.get("cost") for s in p.get("scores", [])}
        rows.append({"at": p["decided_at"], "version": p["model_version"], "reason": p.get("reason", ""),
                     "weights": {x["cloud"]: x["weight"] for x in p["placements"]}, "costs": costs})
    return rows


def write(summaries: Summary | list[Summary], folder: Path,
          placements: Sequence[Mapping[str, Any]] = ()) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [summaries] if isinstance(summaries, dict) else summaries
    first = summaries[0]
    folder.mkdir(parents=True, exist_ok=True)
    rows, steps = accuracy_rows(summaries), timeline(list(placements))
    floor = chance(first)
    fig, axes = plt.subplots(3 if steps else 2, 1, figsize=(max(7, 0.9 * len(rows)), 10 if steps else 7), dpi=110,
                             gridspec_kw={"height_ratios": [3, 1.4, 1.6] if steps else [3, 1.4]})
    ax = axes[0]
    colours = {"shard": "#9aa5b1", "strategy": "#74c0fc", "chosen": "#2b8a3e", "centralized": "#495057"}
    x = range(len(rows))
    means = [100 * mean(r["test"]) for r in rows]
    spread = [[m - 100 * min(r["test"]) for m, r in zip(means, rows, strict=True)],
              [100 * max(r["test"]) - m for m, r in zip(means, rows, strict=True)]]
    ax.bar(x, [m - 100 * floor for m in means], bottom=100 * floor, color=[colours[r["kind"]] for r in rows],
           yerr=spread if len(summaries) > 1 else None, capsize=3, label="test accuracy")
    validated = [(i, 100 * mean(r["validation"])) for i, r in enumerate(rows) if r["validation"]]
    if validated:
        ax.scatter([i for i, _ in validated], [v for _, v in validated], marker="_", s=300, color="#e8590c", zorder=3,
                   label="validation accuracy (chose the strategy)")
    for i, m in enumerate(means):
        ax.text(i, m + 0.4, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(100 * floor, 101)
    ax.set_xticks(list(x), [r["label"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel(f"accuracy (%), axis from chance ({100 * floor:.0f}%)")
    runs = f"mean of {len(summaries)} runs, bars min–max" if len(summaries) > 1 else first["run_id"]
    ax.set_title(f"{runs}: {first['plan']['partition']} over {len(first['shards'])} clouds, chosen "
                 f"{first['fused']['strategy']} (green)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    stages = [(name, first["timings"].get(key)) for name, key in STAGES if first["timings"].get(key) is not None]
    axes[1].barh([n for n, _ in stages][::-1], [s for _, s in stages][::-1], color="#748ffc")
    axes[1].set_xlabel("seconds from the start of the run (centralized: its own training time)")
    axes[1].tick_params(labelsize=8)
    if steps:
        _draw_timeline(axes[2], steps)
    fig.tight_layout()
    png = folder / "report.png"
    fig.savefig(png)
    plt.close(fig)
    page = folder / "report.html"
    page.write_text(_page(summaries, rows, stages, steps, floor, png))
    return png, page


def _draw_timeline(ax: Axes, steps: list[dict[str, Any]]) -> None:
    # matplotlib plots datetimes through its unit converters; its stubs accept only numbers and arrays,
    # hence the arg-type ignores below
    times = [datetime.fromisoformat(s["at"].replace("Z", "+00:00")) for s in steps]
    # the last decision holds on: draw it for a while after (10% of the span, at least a minute)
    end = times[-1] + max((times[-1] - times[0]) / 10, timedelta(minutes=1))
    clouds = sorted({c for s in steps for c in [*s["weights"], *s["costs"]]})
    for cloud in clouds:
        shares = [s["weights"].get(cloud, 0.0) for s in steps]
        ax.step([*times, end], [*shares, shares[-1]], where="post",  # type: ignore[arg-type]
                label=f"{cloud} traffic share")
    ax.set_xlim(times[0] - (end - times[-1]) / 4, end)  # type: ignore[arg-type]
    ax.set_ylabel("traffic share")
    ax.set_ylim(-0.05, 1.05)
    costs = ax.twinx()
    for cloud in clouds:
        values = [s["costs"].get(cloud) for s in steps]
        if any(v is not None for v in values):
            costs.plot(times, values, linestyle=":", marker=".", label=f"{cloud} cost score")  # type: ignore[arg-type]
    costs.set_ylabel("cost score (relative)")
    ax.set_title("placement of the run's model over time", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    costs.legend(fontsize=7, loc="upper right")
    ax.tick_params(labelsize=7)


def _page(summaries: list[Summary], rows: list[dict[str, Any]], stages: list[tuple[str, float]],
          steps: list[dict[str, Any]], floor: float, png: Path) -> str:
    first = summaries[0]
    esc = html.escape

    def pct(values: list[float]) -> str:
        spread = f" ({100 * min(values):.1f}–{100 * max(values):.1f})" if len(values) > 1 else ""
        return f"{100 * mean(values):.1f}%{spread}"

    accuracy = "".join(f"<tr><td>{esc(r['label'])}</td><td>{pct(r['test'])}</td>"
                       f"<td>{pct(r['validation']) if r['validation'] else ''}</td></tr>" for r in rows)
    timing = "".join(f"<tr><td>{esc(name)}</td><td>{seconds:.1f}</td></tr>" for name, seconds in stages)
    placed = "".join(f"<tr><td>{esc(s['at'])}</td>"
                     f"<td>{esc(', '.join(f'{c} {w:.0%}' for c, w in s['weights'].items() if w))}</td>"
                     f"<td>{esc(', '.join(f'{c} {v:.2f}' for c, v in s['costs'].items() if v is not None))}</td>"
                     f"<td>{esc(s['reason'])}</td></tr>" for s in steps)
    runs = ", ".join(esc(s["run_id"]) for s in summaries)
    return (f"<!doctype html><meta charset=utf-8><title>skyfuse {esc(first['run_id'])}</title>"
            f"<h1>{runs}</h1>"
            f"<p>Fused model <b>{esc(first['fused']['version'])}</b>, chosen on the validation split; "
            f"test figures are on the test split, never used for training or choosing. The accuracy axis starts "
            f"at chance ({100 * floor:.0f}%).</p>"
            f"<img alt='accuracy, time per stage and placement' src='data:image/png;base64,"
            f"{base64.b64encode(png.read_bytes()).decode()}'>"
            f"<h2>Accuracy</h2><table><tr><th>model</th><th>test</th><th>validation</th></tr>{accuracy}</table>"
            f"<h2>Time per stage (s)</h2><table>{timing}</table>"
            + (f"<h2>Placement</h2><table><tr><th>decided at</th><th>traffic</th><th>cost score</th><th>why</th></tr>"
               f"{placed}</table>" if steps
               else "<h2>Placement</h2><p>No placement of this run's model on the bus.</p>"))
