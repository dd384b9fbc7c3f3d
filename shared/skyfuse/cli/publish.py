"""`skyfuse publish` and `skyfuse events`: the event contracts from the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from cloudevents.http import CloudEvent
from rich.table import Table

from skyfuse import contracts, signing
from skyfuse.cli.common import USAGE, Command, app, err, event_as, fail, load_fleet, out, publish_event, ready_bus
from skyfuse.config import Fleet


@app.command(cls=Command)
def publish(
    event_type: Annotated[str, typer.Argument(metavar="TYPE",
                                              help="Event type, e.g. shard.ready (see `skyfuse events`).")],
    data: Annotated[str | None, typer.Option("--data", "-d",
                                             help="The event data as JSON, or @FILE to read it from a file.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Publish the shipped sample data of this type.")] = False,
    as_: Annotated[str, typer.Option("--as", metavar="PRODUCER",
                                     help="Sign as this producer: cli, or cloud/function (e.g. aws/scheduler; "
                                          "its key must be in signing.keys_dir, as in a local fleet).")] = signing.CLI,
) -> None:
    """Validate event data against its schema, then publish it as a signed CloudEvent."""
    kind = contracts.event_type(event_type)
    if sample == (data is not None):
        fail("give exactly one of --data JSON|@FILE or --sample")
    payload = contracts.sample(kind.name) if data is None else _parse_data(data)
    errors = contracts.validation_errors(kind.name, payload)
    if errors:
        err.print(f"[bold red]invalid {kind.name} data[/] ({len(errors)} problem{'s' * (len(errors) > 1)}):")
        for line in errors:
            err.print(f"  • {line}", highlight=False)
        raise typer.Exit(USAGE)
    fleet = load_fleet()
    refusal = contracts.producer_error(kind.name, as_, payload, fleet.control_cloud or next(iter(fleet.clouds)))
    if fleet.signing.enabled and refusal:
        fail(f"{refusal}, so every consumer would dead-letter it; sign as an allowed producer with --as "
             f"{sample_producer(fleet, kind.name, dict(payload))}")
    with ready_bus(fleet) as bus:
        event = event_as(fleet, as_, kind.name, payload)
        record = publish_event(fleet, bus, event)
    out.print(f"published [bold]{kind.name}[/] id={event['id']} → {record.topic}[{record.partition}]@{record.offset}",
              highlight=False)


def _parse_data(data: str) -> Any:
    """The JSON `data` (or @FILE) says: anything JSON, until its schema checks it."""
    raw = Path(data[1:]).read_text() if data.startswith("@") else data
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        fail(f"--data is not valid JSON: {exc}")


@app.command("events", cls=Command)
def list_events() -> None:
    """The event types, their topics and the functions they trigger."""
    table = Table("type", "topic", "key", "consumers", "meaning", title="skyfuse events")
    for t in contracts.catalog().values():
        table.add_row(t.name, t.topic, t.key, ", ".join(t.consumers), t.description)
    out.print(table)


def sample_producer(fleet: Fleet, type_name: str, data: dict[str, Any]) -> str:
    """The first producer the catalog allows for `type_name` that may send `data` in this fleet (it
    may set `data`'s cloud field to a configured cloud)."""
    kind = contracts.event_type(type_name)
    function, _, where = kind.producers[0].partition("@")
    if function == signing.CLI:
        return signing.CLI
    cloud = fleet.control_cloud or next(iter(fleet.clouds))
    if kind.cloud_field:
        if where == "control" or data.get(kind.cloud_field) not in fleet.clouds:
            data[kind.cloud_field] = cloud
        cloud = data[kind.cloud_field]
    return signing.principal(cloud, function)


def sample_event(fleet: Fleet, type_name: str) -> CloudEvent:
    """The sample of `type_name` as its first allowed producer in this local fleet would emit it.
    A sample decision carries no scheduler `sequence`: the deployers skip any decision older than
    the newest they applied, so the sample's 42 would hold back the real scheduler's next decisions."""
    data = contracts.sample(type_name)
    if type_name == "placement.changed":
        data.pop("sequence", None)
    return event_as(fleet, sample_producer(fleet, type_name, data), type_name, data)
