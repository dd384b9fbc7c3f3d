"""The `skyfuse` command line."""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console
from rich.table import Table

from skyfuse import config as fleet_config
from skyfuse import contracts, events
from skyfuse.bus import Bus, open_bus
from skyfuse.runtime.fleet import Fabric, build_hosts, event_functions
from skyfuse.runtime.function import JsonFormatter
from skyfuse.runtime.host import Delivery

app = typer.Typer(help="skyfuse: train where the data lives, fuse the sub-models, serve from the best cloud.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True)
_config_path: Optional[str] = None


@app.callback()
def main(config: Annotated[Optional[str], typer.Option("--config", "-c", help="Fleet config TOML (default: $SKYFUSE_CONFIG or ./skyfuse.toml).")] = None,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="JSON logs of every delivery on stderr.")] = False):
    global _config_path
    _config_path = config
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python is chatty about reconnects


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def load_fleet() -> fleet_config.Fleet:
    try:
        return fleet_config.load(_config_path)
    except fleet_config.ConfigError as exc:
        fail(str(exc))


def connect(fleet: fleet_config.Fleet) -> Bus:
    bus = open_bus(fleet)
    if fleet.bus.backend == "kafka":
        try:
            bus.topics()
        except Exception as exc:
            fail(f"cannot reach Kafka at {fleet.bus.kafka.bootstrap_servers} ({type(exc).__name__}: {exc}); "
                 "start the local broker with `make kafka-up`, or set bus.backend = \"embedded\"")
    return bus


def all_topics(fleet: fleet_config.Fleet) -> list[str]:
    return [t.topic for t in contracts.catalog().values()] + [contracts.dlq_topic(f) for f in event_functions()]


def publish_event(bus: Bus, event) -> object:
    key, value, headers = events.encode(event)
    return bus.publish(events.topic_of(event), value, key, headers)


def cli_event(type_name: str, data: dict):
    return events.new_event(type_name, data, source="skyfuse://cli", subject=data.get("cloud"))


@app.command()
def publish(
    event_type: Annotated[str, typer.Argument(help="Event type, e.g. shard.ready (see `skyfuse events`).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="The event data as JSON, or @FILE to read it from a file.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Publish the shipped sample data of this type.")] = False,
):
    """Validate event data against its schema, then publish it as a CloudEvent."""
    try:
        kind = contracts.event_type(event_type)
    except contracts.ContractError as exc:
        fail(str(exc))
    if sample == (data is not None):
        fail("give exactly one of --data JSON|@FILE or --sample")
    if sample:
        payload = contracts.sample(kind.name)
    else:
        raw = Path(data[1:]).read_text() if data.startswith("@") else data
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            fail(f"--data is not valid JSON: {exc}")
    errors = contracts.validation_errors(kind.name, payload)
    if errors:
        err.print(f"[bold red]invalid {kind.name} data[/] ({len(errors)} problem{'s' * (len(errors) > 1)}):")
        for line in errors:
            err.print(f"  • {line}", highlight=False)
        raise typer.Exit(2)
    fleet = load_fleet()
    with connect(fleet) as bus:
        bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
        event = cli_event(kind.name, payload)
        record = publish_event(bus, event)
    out.print(f"published [bold]{kind.name}[/] id={event['id']} → {record.topic}[{record.partition}]@{record.offset}",
              highlight=False)


@app.command("events")
def list_events():
    """The event types, their topics and the functions they trigger."""
    table = Table("type", "topic", "key", "consumers", "meaning", title="skyfuse events")
    for t in contracts.catalog().values():
        table.add_row(t.name, t.topic, t.key, ", ".join(t.consumers), t.description)
    out.print(table)


def _print_delivery(delivery: Delivery) -> None:
    colour = {"ok": "green", "retry": "yellow"}.get(delivery.result, "red")
    reason = f"  [dim]{delivery.reason}[/]" if delivery.reason else ""
    out.print(f"{time.strftime('%H:%M:%S')} [{colour}]{delivery.result:>13}[/] {delivery.cloud:<6} "
              f"{delivery.function:<9} {delivery.event_type:<18} {delivery.event_id[:8]}  "
              f"[dim]{delivery.shape}[/]{reason}", highlight=False)


@app.command()
def up(
    cloud: Annotated[Optional[list[str]], typer.Option("--cloud", help="Only these clouds (repeatable).")] = None,
    function: Annotated[Optional[list[str]], typer.Option("--function", help="Only these functions (repeatable).")] = None,
    seconds: Annotated[Optional[float], typer.Option("--for", help="Stop after this many seconds.")] = None,
):
    """Start the function hosts of every configured cloud and function; run until interrupted."""
    fleet = load_fleet()
    for name in cloud or ():
        if name not in fleet.clouds:
            fail(f"--cloud {name!r} is not configured; configured clouds: {', '.join(fleet.clouds)}")
    for name in function or ():
        if name not in event_functions():
            fail(f"--function {name!r} is not an event-triggered function; expected one of: {', '.join(event_functions())}")
    bus = connect(fleet)
    bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
    hosts = build_hosts(fleet, bus, _print_delivery, functions=function, clouds=cloud)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    out.print(f"[bold]skyfuse up[/]: {len(hosts)} function hosts on the {fleet.bus.backend} bus "
              f"({', '.join(sorted({h.cloud for h in hosts}))}); Ctrl-C to stop", highlight=False)
    for host in hosts:
        out.print(f"  {host.group:<18} ← {', '.join(host.topics)}  [dim]{host.invoker.shape}[/]", highlight=False)
    with Fabric(hosts):
        try:
            done.wait(seconds)
        except KeyboardInterrupt:
            pass
        out.print("stopping: finishing in-flight batches and committing…")
    bus.close()


def gather_status(fleet: fleet_config.Fleet, bus: Bus) -> dict:
    topics = bus.topics()
    status = {"bus": fleet.bus.backend, "topics": {}, "functions": [], "dead_letters": {}}
    for name in sorted(topics):
        status["topics"][name] = {"partitions": topics[name], "records": bus.count(name)}
    for function in event_functions():
        for cloud in fleet.clouds_for(function):
            group = f"{cloud}.{function}"
            lag = {t: bus.lag(group, t) for t in contracts.topics_for(function) if t in topics}
            status["functions"].append({"function": function, "cloud": cloud, "group": group,
                                        "lag": sum(lag.values()), "lag_by_topic": lag})
        dlq = contracts.dlq_topic(function)
        status["dead_letters"][function] = bus.count(dlq) if dlq in topics else 0
    return status


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for machines.")] = False):
    """Topics, consumer lag per function and cloud, and dead-letter counts."""
    fleet = load_fleet()
    with connect(fleet) as bus:
        report = gather_status(fleet, bus)
    if as_json:
        print(json.dumps(report))
        return
    topics = Table("topic", "partitions", "records", title=f"topics ({report['bus']} bus)")
    for name, t in report["topics"].items():
        topics.add_row(name, str(t["partitions"]), str(t["records"]))
    lag = Table("function", *fleet.clouds, "dead letters", title="consumer lag (records not yet handled)")
    for function in event_functions():
        row = {f["cloud"]: str(f["lag"]) for f in report["functions"] if f["function"] == function}
        dead = report["dead_letters"][function]
        lag.add_row(function, *(row.get(c, "—") for c in fleet.clouds), f"[red]{dead}[/]" if dead else "0")
    out.print(topics, lag)


@app.command()
def dlq(function: Annotated[str, typer.Argument(help="Function whose dead letters to show.")],
        limit: Annotated[int, typer.Option(help="Show at most this many.")] = 20,
        as_json: Annotated[bool, typer.Option("--json")] = False):
    """Show the dead letters of a function: where each record came from and why it was given up."""
    if function not in event_functions():
        fail(f"no function {function!r}; expected one of: {', '.join(event_functions())}")
    fleet = load_fleet()
    with connect(fleet) as bus:
        records = bus.read(contracts.dlq_topic(function), limit) if contracts.dlq_topic(function) in bus.topics() else []
    rows = []
    for r in records:
        h = {k: v.decode(errors="replace") for k, v in r.headers}
        rows.append({"cloud": h.get("skyfuse_dlq_cloud"), "from": f"{h.get('skyfuse_dlq_topic')}[{h.get('skyfuse_dlq_partition')}]@{h.get('skyfuse_dlq_offset')}",
                     "event_id": h.get("ce_id"), "attempts": int(h.get("skyfuse_dlq_attempts", 0)),
                     "reason": h.get("skyfuse_dlq_reason")})
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("cloud", "from", "event id", "attempts", "reason", title=f"{function}.dlq ({len(rows)} shown)")
    for row in rows:
        table.add_row(row["cloud"], row["from"], row["event_id"] or "—", str(row["attempts"]), row["reason"])
    out.print(table)


@app.command()
def demo(timeout: Annotated[float, typer.Option(help="Seconds to wait for every delivery.")] = 60.0):
    """Publish the sample of every event type and show it reaching its function in every cloud."""
    fleet = load_fleet()
    bus = connect(fleet)
    bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
    published: dict[str, str] = {}  # event id → type
    seen: dict[tuple[str, str], Delivery] = {}
    lock = threading.Lock()

    def record(delivery: Delivery) -> None:
        with lock:
            if delivery.event_id in published:
                seen[(delivery.event_id, delivery.cloud)] = delivery

    hosts = build_hosts(fleet, bus, record)
    expected = {(t.name, cloud) for t in contracts.catalog().values() for f in t.consumers for cloud in fleet.clouds_for(f)}
    out.print(f"[bold]skyfuse demo[/]: {len(hosts)} function hosts in {len(fleet.clouds)} clouds on the "
              f"{fleet.bus.backend} bus; publishing one sample of each of {len(contracts.catalog())} event types…")
    started = time.monotonic()
    with Fabric(hosts):
        for name in contracts.catalog():
            event = cli_event(name, contracts.sample(name))
            with lock:  # before publishing: a host may deliver it before publish() returns
                published[event["id"]] = name
            publish_event(bus, event)
        while time.monotonic() - started < timeout:
            with lock:
                got = {(published[eid], cloud) for eid, cloud in seen}
            if expected <= got:
                break
            time.sleep(0.1)
    bus.close()
    table = Table("event", "function", *fleet.clouds, title=f"deliveries ({time.monotonic() - started:.1f} s)")
    by_type = {(published[eid], cloud): d for (eid, cloud), d in seen.items()}
    for t in contracts.catalog().values():
        for function in t.consumers:
            cells = []
            for cloud in fleet.clouds:
                d = by_type.get((t.name, cloud))
                cells.append("—" if cloud not in fleet.clouds_for(function) else
                             f"[green]✓[/] {d.shape.split(' ')[0]}" if d and d.result == "ok" else "[red]✗ missing[/]")
            table.add_row(t.name, function, *cells)
    out.print(table)
    missing = expected - {k for k, d in by_type.items() if d.result == "ok"}
    if missing:
        fail(f"{len(missing)} deliveries did not arrive within {timeout:g} s: {sorted(missing)}", 1)
    out.print(f"[green]every event reached its function in every cloud[/] "
              f"({len(expected)} deliveries, each in its cloud's native event shape)")


if __name__ == "__main__":
    app()
