"""`skyfuse report`: a run's figures drawn as a PNG inside an HTML page (`skyfuse.report`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skyfuse.cli.common import FAILURE, Command, app, fail, load_fleet, out
from skyfuse.config import Fleet
from skyfuse.payloads import PlacementChanged


@app.command(cls=Command)
def report(run: Annotated[list[str] | None, typer.Option(help="Run id, repeatable: several runs (seeds) show "
                                                             "their mean and spread (default: the last run).")] = None,
           out_dir: Annotated[Path | None, typer.Option("--out", metavar="FOLDER",
                                                        help="Folder for report.png and report.html.")] = None) -> None:
    """Draw a run's accuracies (per shard, per strategy with the validation score that chose it,
    centralized), its time per stage and its placement timeline, as a PNG inside an HTML page."""
    from skyfuse import report as reporting
    from skyfuse import training

    try:
        summaries = [training.load(r) for r in run] if run else [training.load()]
    except FileNotFoundError as exc:
        fail(f"no such training run ({exc.filename}): run `skyfuse demo` or `skyfuse train` first", FAILURE)
    png, html = reporting.write(summaries, out_dir or training.RUNS_DIR / summaries[0]["run_id"],
                                _placements(load_fleet(), {s["run_id"] for s in summaries}))
    out.print(f"wrote {png} and {html}", highlight=False)


def _placements(fleet: Fleet, run_ids: set[str]) -> list[PlacementChanged]:
    """The runs' placement timeline from the bus; the report draws what it has: without the bus, none."""
    from skyfuse import training
    from skyfuse.bus import open_bus

    try:
        bus = open_bus(fleet)
    except Exception:  # noqa: BLE001 - no bus, no timeline
        return []
    try:
        return training.placement_decisions(fleet, bus, run_ids)
    except Exception:  # noqa: BLE001 - the bus went away while reading: no timeline
        return []
    finally:
        bus.close()
