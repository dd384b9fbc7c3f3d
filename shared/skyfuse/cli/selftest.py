"""`skyfuse selftest`: the sample of every event type reaching its function in every cloud."""
from __future__ import annotations

import threading
import time
from typing import Annotated

import typer
from rich.table import Table

from skyfuse import contracts
from skyfuse.cli.common import FAILURE, Command, app, fail, load_fleet, out, publish_event, ready_bus
from skyfuse.cli.publish import sample_event
from skyfuse.config import Fleet
from skyfuse.runtime.host import Delivery

REACHED = ("ok", "rejected")  # a rejected event reached its function, which refused it


@app.command(cls=Command)
def selftest(timeout: Annotated[float, typer.Option(help="Seconds to wait for every delivery.")] = 60.0) -> None:
    """Publish the sample of every event type and show it reaching its function in every cloud."""
    from skyfuse.dev import local
    from skyfuse.dev.fleet import Fabric, build_hosts

    fleet = load_fleet()
    local.prepare(fleet)
    bus = ready_bus(fleet)
    published: dict[str, str] = {}  # event id → type
    seen: dict[tuple[str, str, str], Delivery] = {}  # (event id, function, cloud): an event may have several consumers
    lock = threading.Lock()

    def record(delivery: Delivery) -> None:
        with lock:
            if delivery.event_id in published:
                seen[(delivery.event_id, delivery.function, delivery.cloud)] = delivery

    hosts = build_hosts(fleet, bus, record)
    expected = {(t.name, f, cloud) for t in contracts.catalog().values()
                for f in t.consumers for cloud in fleet.clouds_for(f)}
    out.print(f"[bold]skyfuse selftest[/]: {len(hosts)} function hosts in {len(fleet.clouds)} clouds on the "
              f"{fleet.bus.backend} bus; publishing one sample of each of {len(contracts.catalog())} event types…")
    started = time.monotonic()
    with Fabric(hosts):
        for name in contracts.catalog():
            event = sample_event(fleet, name)
            with lock:  # before publishing: a host may deliver it before publish() returns
                published[event["id"]] = name
            publish_event(fleet, bus, event)
        while time.monotonic() - started < timeout:
            with lock:
                got = {(published[eid], function, cloud) for eid, function, cloud in seen}
            if expected <= got:
                break
            time.sleep(0.1)
    bus.close()
    by_type = {(published[eid], function, cloud): d for (eid, function, cloud), d in seen.items()}
    out.print(_deliveries(fleet, by_type, time.monotonic() - started))
    rejected = sum(d.result == "rejected" for d in by_type.values())
    if rejected:  # the samples name objects this fleet does not have: the core refuses them, with the reason
        out.print(f"[yellow]rejected[/]: {rejected} reached their function, which dead-lettered them with the reason "
                  "(`skyfuse dlq FUNCTION`)", highlight=False)
    missing = expected - {k for k, d in by_type.items() if d.result in REACHED}
    if missing:
        fail(f"{len(missing)} deliveries did not arrive within {timeout:g} s: {sorted(missing)}", FAILURE)
    out.print(f"[green]every event reached its function in every cloud[/] "
              f"({len(expected)} deliveries, each in its cloud's native event shape)")


def _deliveries(fleet: Fleet, by_type: dict[tuple[str, str, str], Delivery], seconds: float) -> Table:
    """Per event type and consumer, per cloud: reached (in which native shape), rejected, or missing."""
    table = Table("event", "function", *fleet.clouds, title=f"deliveries ({seconds:.1f} s)")
    for t in contracts.catalog().values():
        for function in t.consumers:
            cells: list[str] = []
            for cloud in fleet.clouds:
                d = by_type.get((t.name, function, cloud))
                rejected = " [yellow](rejected)[/]" if d and d.result == "rejected" else ""
                cells.append("—" if cloud not in fleet.clouds_for(function) else
                             f"[green]✓[/] {d.shape.split(' ')[0]}{rejected}"
                             if d and d.result in REACHED else "[red]✗ missing[/]")
            table.add_row(t.name, function, *cells)
    return table
