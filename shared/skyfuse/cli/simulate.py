"""`skyfuse simulate`: a metrics trace replayed through the placement policy and its baselines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from skyfuse.cli.common import Command, app, fail, load_fleet, out
from skyfuse.cli.tables import simulation_table


@app.command(cls=Command)
def simulate(trace: Annotated[Path | None, typer.Argument(help="JSON lines of metrics.sampled data "
                                                               "(default: the shipped day).")] = None,
             decisions: Annotated[bool, typer.Option("--decisions", help="Also list the policy's decisions.")] = False,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Replay a metrics trace through the placement policy and compare it with three baselines."""
    from skyfuse.scheduling import PolicyConfig, format_time
    from skyfuse.scheduling import simulate as sim

    try:  # the default day is generated: the same samples bench/traces/day.jsonl holds
        samples = sim.load_trace(trace) if trace else sim.generate_trace()
    except OSError as exc:
        fail(str(exc))
    results = sim.compare(samples, PolicyConfig.from_fleet(load_fleet()))
    rows = [{"policy": r.name, "cost_usd": round(r.cost_usd, 4), "slo_violating_minutes": r.slo_minutes,
             "down_minutes": r.down_minutes, "moves": r.moves} for r in results]
    if as_json:
        print(json.dumps(rows))
        return
    out.print(simulation_table(rows, str(trace) if trace else "the shipped day (daily cycle, price change, outage)"))
    if decisions:
        for d in results[0].decisions:
            out.print(f"{format_time(d.at)} [bold]{d.kind}[/]: {d.reason}", highlight=False)
