"""`skyfuse status` and `skyfuse dlq`: what the bus says about the fleet."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from skyfuse import contracts
from skyfuse import status as fleet_status
from skyfuse.cli.common import Command, app, connect, fail, load_fleet, out
from skyfuse.cli.tables import dead_letter_table, status_tables
from skyfuse.runtime import deadletter


@app.command(cls=Command)
def status(as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for machines.")] = False) -> None:
    """Topics, consumer lag per function and cloud, and dead-letter counts."""
    from skyfuse.dev import local

    fleet = load_fleet()
    with connect(fleet) as bus:
        report = fleet_status.gather(fleet, bus, local.running())
    if as_json:
        print(json.dumps(report))
        return
    out.print(*status_tables(report, list(fleet.clouds)))


@app.command(cls=Command)
def dlq(function: Annotated[str, typer.Argument(help="Function whose dead letters to show.")],
        limit: Annotated[int, typer.Option(help="Show at most this many.")] = 20,
        as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the dead letters of a function: where each record came from and why it was given up."""
    if function not in contracts.event_functions():
        fail(f"no function {function!r}; expected one of: {', '.join(contracts.event_functions())}")
    fleet = load_fleet()
    topic = contracts.dlq_topic(function)
    with connect(fleet) as bus:
        records = bus.read(topic, limit) if topic in bus.topics() else []
    rows = [deadletter.summary(r.headers) for r in records]
    if as_json:
        print(json.dumps(rows))
        return
    out.print(dead_letter_table(function, rows))
