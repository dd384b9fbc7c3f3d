"""The picture of a training run: test accuracy per shard model, per fusion strategy, and of the
centralized baseline, as a PNG and an HTML page that shows it with the figures."""
from __future__ import annotations

import base64
import html
from pathlib import Path


def write(summary: dict, folder: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    bars = [(f"shard {s['shard_id']}\n{s['cloud']}", s["accuracy"] or 0.0, "#9aa5b1") for s in summary["shards"]]
    chosen = summary["fused"]["strategy"]
    bars += [(name, acc, "#2b8a3e" if name == chosen else "#74c0fc") for name, acc in summary["strategies"].items()]
    bars.append(("centralized", summary["centralized_accuracy"], "#495057"))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4), dpi=120)
    ax.bar([b[0] for b in bars], [100 * b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, acc, _) in enumerate(bars):
        ax.text(i, 100 * acc + 0.3, f"{100 * acc:.1f}", ha="center", va="bottom", fontsize=8)
    low = min(100 * b[1] for b in bars)
    ax.set_ylim(max(0, low - 10), 101)
    ax.set_ylabel("test accuracy (%)")
    plan = summary["plan"]
    ax.set_title(f"{summary['run_id']}: {plan['partition']} over {len(summary['shards'])} clouds, "
                 f"chosen {chosen} (green)", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    png = folder / "report.png"
    fig.savefig(png)
    plt.close(fig)
    rows = "".join(f"<tr><td>{html.escape(label.replace(chr(10), ' '))}</td><td>{100 * acc:.1f}%</td></tr>"
                   for label, acc, _ in bars)
    page = folder / "report.html"
    page.write_text(
        f"<!doctype html><meta charset=utf-8><title>skyfuse {html.escape(summary['run_id'])}</title>"
        f"<h1>{html.escape(summary['run_id'])}</h1>"
        f"<p>Fused model <b>{html.escape(summary['fused']['version'])}</b>, chosen on the validation split; "
        f"every figure below is on the test split, never used for training or choosing.</p>"
        f"<img alt='accuracy per shard, strategy and centralized' src='data:image/png;base64,"
        f"{base64.b64encode(png.read_bytes()).decode()}'>"
        f"<table><tr><th>model</th><th>test accuracy</th></tr>{rows}</table>")
    return png, page
