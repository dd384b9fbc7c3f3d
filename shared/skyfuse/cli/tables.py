"""The tables and lines the commands print (rich); no command logic here."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from skyfuse.cli.common import out
from skyfuse.contracts import event_functions

if TYPE_CHECKING:
    from skyfuse.runtime.host import Delivery


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def print_delivery(delivery: Delivery) -> None:
    """One line per delivery of a function host (`skyfuse up`)."""
    colour = {"ok": "green", "retry": "yellow"}.get(delivery.result, "red")
    reason = f"  [dim]{delivery.reason}[/]" if delivery.reason else ""
    out.print(f"{time.strftime('%H:%M:%S')} [{colour}]{delivery.result:>13}[/] {delivery.cloud:<6} "
              f"{delivery.function:<9} {delivery.event_type:<18} {delivery.event_id[:8]}  "
              f"[dim]{delivery.shape}[/]{reason}", highlight=False)


def status_tables(report: dict[str, Any], clouds: list[str]) -> list[Table]:
    """`skyfuse status`: topics, consumer lag with dead letters, and what each cloud serves."""
    topics = Table("topic", "partitions", "records", title=f"topics ({report['bus']} bus)")
    for name, t in report["topics"].items():
        topics.add_row(name, str(t["partitions"]), str(t["records"]))
    lag = Table("function", *clouds, "dead letters", title="consumer lag (records not yet handled)")
    for function in event_functions():
        row = {f["cloud"]: str(f["lag"]) for f in report["functions"] if f["function"] == function}
        dead = report["dead_letters"][function]
        lag.add_row(function, *(row.get(c, "—") for c in clouds), f"[red]{dead}[/]" if dead else "0")
    serving = Table("cloud", "endpoint", "model", "placement weight", "p50 ms", "p99 ms", "requests/s",
                    title="serving")
    for name, c in report["clouds"].items():
        serving.add_row(name, c["endpoint"] or "— (skyfuse up not running)", c["model_version"] or "—",
                        f"{c['placement_weight']:.2f}", *("—" if c[k] is None else f"{c[k]:.2f}"
                                                          for k in ("p50_ms", "p99_ms", "requests_per_s")))
    return [topics, lag, serving]


def dead_letter_table(function: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("cloud", "from", "event id", "attempts", "reason", title=f"{function}.dlq ({len(rows)} shown)")
    for row in rows:
        table.add_row(row["cloud"], row["from"], row["event_id"] or "—", str(row["attempts"]), row["reason"])
    return table


def placement_table(placements: list[dict[str, Any]]) -> Table:
    table = Table("at (UTC)", "trigger", "serving", "weights", "reason",
                  title="placement timeline (scheduler decisions)")
    for p in placements:
        weights = ", ".join(f"{c} {w:.2f}" for c, w in p["weights"].items() if w > 0)
        table.add_row(p["at"][11:23], p["trigger"], ", ".join(p["serving"]), weights, p["reason"])
    return table


def load_table(phases: list[dict[str, Any]]) -> Table:
    """Per phase of a load step, per cloud: what the inference servers and the monitor reported."""
    table = Table("phase", "cloud", "serving", "requests/s", "server p99 ms", "probe p99 ms", "CPU",
                  title="load and response time per cloud (server: its own time per request; "
                        "probe: what a caller waits, queue included)")
    for phase in phases:
        for cloud, m in phase["clouds"].items():
            table.add_row(phase["name"], cloud, "yes" if cloud in phase["serving"] else "",
                          _num(m.get("requests_per_s"), "{:.0f}"), _num(m.get("server_p99_ms"), "{:.1f}"),
                          _num(m.get("probe_p99_ms"), "{:.1f}"), _num(m.get("cpu"), "{:.0%}"))
    return table


TIMING_LABELS = {"prepare_s": "split + upload shards", "train_s": "shards trained (round 0)",
                 "export_s": "exported to ONNX (round 0)", "fedavg_rounds_s": "FedAvg rounds after the first",
                 "fusion_s": "fused.ready", "serving_s": "placed clouds serving it",
                 "centralized_train_s": "centralized baseline training"}


def print_summary(summary: dict[str, Any]) -> None:
    """A training run's summary: shard models, strategies vs. centralized, time per stage, serving."""
    shards = Table("cloud", "shard", "rows", "test accuracy", title="shard models (each trained where its data lives)")
    for s in summary["shards"]:
        shards.add_row(s["cloud"], s["shard_id"], str(s["rows"]), _pct(s["accuracy"]))
    shards.add_row("", "mean", "", _pct(summary["shard_mean_accuracy"]), style="bold")
    fused = summary["fused"]
    strategies = Table("model", "validation (chooses)", "test (reports)", title="fusion vs. centralized")
    for name, accuracy in summary["strategies"].items():
        mark = " ← chosen" if name == fused["strategy"] else ""
        strategies.add_row(f"{name}{mark}", _pct(summary["validation"].get(name)), _pct(accuracy),
                           style="bold green" if mark else None)
    strategies.add_row("centralized (all rows in one place)", "", _pct(summary["centralized_accuracy"]), style="dim")
    timings = Table("stage", "seconds", title="time per stage (from the start of the run)")
    for key, label in TIMING_LABELS.items():
        timings.add_row(label, _num(summary["timings"].get(key), "{:.1f}"))
    out.print(shards, strategies, timings)
    if summary.get("serving"):
        serving = Table("cloud", "endpoint", "model version", "agrees with the fused model", title="placed and serving")
        for cloud, s in summary["serving"].items():
            serving.add_row(cloud, s["endpoint"], str(s["model_version"]), f"{s['agree']}/{s['rows']} test rows",
                            style="green" if s["agree"] == s["rows"] else "red")
        out.print(serving)
    if summary.get("load_phases"):
        out.print(load_table(summary["load_phases"]))
    if summary.get("placements"):
        out.print(placement_table(summary["placements"]))
    out.print(f"fused model [bold]{fused['version']}[/] ({fused['strategy']}, round {fused['round']}): test accuracy "
              f"{_pct(fused['accuracy'])} vs. centralized {_pct(summary['centralized_accuracy'])} and shard mean "
              f"{_pct(summary['shard_mean_accuracy'])}", highlight=False)


def simulation_table(rows: list[dict[str, Any]], trace_label: str) -> Table:
    """`skyfuse simulate`: each policy's cost, SLO minutes and moves; cost also against the lowest."""
    floor = min(r["cost_usd"] for r in rows) or 1.0
    table = Table("policy", "cost (USD)", "vs lowest", "SLO-violating min", "of which on a down cloud", "moves",
                  title=f"placement over {trace_label}")
    for r in rows:
        table.add_row(r["policy"], f"{r['cost_usd']:.2f}", f"{r['cost_usd'] / floor:.3f}×",
                      f"{r['slo_violating_minutes']:.0f}", f"{r['down_minutes']:.0f}", str(r["moves"]),
                      style="bold" if r["policy"] == "policy" else None)
    return table
