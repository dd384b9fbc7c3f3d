"""The `skyfuse` command line.

Exit codes: 0 success; 1 a runtime failure (a server unreachable, no fleet up, nothing fused in
time, deliveries missing); 2 a usage error (an unknown option, command or value, invalid data, a
bad config key), with what to change.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from rich.console import Console
from rich.table import Table

from skyfuse import config as fleet_config
from skyfuse import contracts, events, signing
from skyfuse.bus import Bus, open_bus
from skyfuse.ml import federated
from skyfuse.runtime import deadletter
from skyfuse.runtime.fleet import Fabric, build_hosts, event_functions
from skyfuse.runtime.function import JsonFormatter
from skyfuse.runtime.host import Delivery

# Help shows what to type: options as NAME placeholders (CLOUD, DATA), flags bare, arguments with
# plain types; typer would print Python type names (<str>, <bool>).
PLAIN_TYPES = {"<str>": "TEXT", "<int>": "INTEGER", "<float>": "NUMBER", "<path>": "PATH", "<bool>": ""}


class _PlainHelp:
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperOption) and param.metavar is None:
                param.metavar = "" if param.is_flag else param.name.strip("_").upper()
            elif isinstance(param, TyperArgument) and not getattr(param, "_plain", False):
                param.metavar = param.metavar or param.name.upper()
                shown = param.display_type_rich(ctx)
                param.display_type_rich = lambda ctx, shown=shown: PLAIN_TYPES.get(shown, shown)
                param._plain = True
        return params


class Command(_PlainHelp, TyperCommand):
    pass


class Group(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(help="skyfuse: train where the data lives, fuse the sub-models, serve from the best cloud.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=Group)
out = Console()
err = Console(stderr=True)
_config_path: Optional[str] = None


@app.callback()
def main(config: Annotated[Optional[str], typer.Option("--config", "-c", metavar="FILE", help="Fleet config TOML (default: $SKYFUSE_CONFIG or ./skyfuse.toml).")] = None,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="JSON logs of every delivery on stderr.")] = False,
         version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                               callback=lambda shown: _version(shown))] = False):
    global _config_path
    _config_path = config
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python is chatty about reconnects


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        print(f"skyfuse {version('skyfuse')}")
        raise typer.Exit()


USAGE, FAILURE = 2, 1  # exit codes: see the module docstring


def fail(message: str, code: int = USAGE) -> None:
    """Print the error and exit: USAGE (2) for what the user must change, FAILURE (1) for what went wrong."""
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
            local_broker = all(s.strip().startswith(("127.0.0.1:", "localhost:"))
                               for s in fleet.bus.kafka.bootstrap_servers.split(","))
            fail(f"cannot reach Kafka at {fleet.bus.kafka.bootstrap_servers} ({type(exc).__name__}: {exc})"
                 + ("; start the local broker with `make kafka-up`, or set bus.backend = \"embedded\""
                    if local_broker else ""), FAILURE)
    return bus


def all_topics(fleet: fleet_config.Fleet) -> list[str]:
    return [t.topic for t in contracts.catalog().values()] + [contracts.dlq_topic(f) for f in event_functions()]


def publish_event(fleet: fleet_config.Fleet, bus: Bus, event) -> object:
    """Publish inside a span of its own (the root of a trace, when tracing is on)."""
    from skyfuse import tracing

    with tracing.producing(event, fleet, "cli", event.get("subject")):
        key, value, headers = events.encode(event)
        return bus.publish(events.topic_of(event), value, key, headers)


def event_as(fleet: fleet_config.Fleet, who: str, type_name: str, data: dict):
    """An event emitted by principal `who` (`cli`, or `cloud/function` of a local fleet), signed with
    its key when signing is on."""
    event = events.new_event(type_name, data, source=signing.source_of(who), subject=data.get("cloud"))
    try:
        signer = signing.signer_for(fleet, who)
    except signing.KeySetupError as exc:
        fail(str(exc), FAILURE)
    return signer.sign(event) if signer else event


@app.command(cls=Command)
def publish(
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="Event type, e.g. shard.ready (see `skyfuse events`).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="The event data as JSON, or @FILE to read it from a file.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Publish the shipped sample data of this type.")] = False,
    as_: Annotated[str, typer.Option("--as", metavar="PRODUCER", help="Sign as this producer: cli, or cloud/function (e.g. aws/scheduler; "
                                                  "its key must be in signing.keys_dir, as in a local fleet).")] = signing.CLI,
):
    """Validate event data against its schema, then publish it as a signed CloudEvent."""
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
        raise typer.Exit(USAGE)
    fleet = load_fleet()
    refusal = contracts.producer_error(kind.name, as_, payload, fleet.control_cloud or next(iter(fleet.clouds)))
    if fleet.signing.enabled and refusal:
        fail(f"{refusal}, so every consumer would dead-letter it; sign as an allowed producer with --as "
             f"{sample_producer(fleet, kind.name, dict(payload))}")
    with connect(fleet) as bus:
        bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
        event = event_as(fleet, as_, kind.name, payload)
        record = publish_event(fleet, bus, event)
    out.print(f"published [bold]{kind.name}[/] id={event['id']} → {record.topic}[{record.partition}]@{record.offset}",
              highlight=False)


@app.command("events", cls=Command)
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


@app.command(cls=Command)
def up(
    cloud: Annotated[Optional[list[str]], typer.Option("--cloud", help="Only these clouds (repeatable).")] = None,
    function: Annotated[Optional[list[str]], typer.Option("--function", help="Only these functions (repeatable).")] = None,
    seconds: Annotated[Optional[float], typer.Option("--for", help="Stop after this many seconds.")] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Also run each cloud's inference server.")] = True,
    emulate: Annotated[bool, typer.Option("--emulate", help="Stores in the cloud emulators, the bus on Kafka.")] = False,
    metrics_port: Annotated[int, typer.Option("--metrics-port", metavar="PORT", help="Serve the function hosts' "
                                              "Prometheus metrics on 127.0.0.1:PORT/metrics (0: off).")] = 0,
    router_port: Annotated[int, typer.Option("--router-port", metavar="PORT", help="Serve one front door on "
                                             "127.0.0.1:PORT that forwards to the placed clouds by their placement "
                                             "weights (0: off).")] = 8100,
):
    """Start every cloud's function hosts, timers and inference server; run until interrupted."""
    from skyfuse import emulation

    fleet = emulation.apply(load_fleet()) if emulate else load_fleet()
    for name in cloud or ():
        if name not in fleet.clouds:
            fail(f"--cloud {name!r} is not configured; configured clouds: {', '.join(fleet.clouds)}")
    for name in function or ():
        if name not in event_functions():
            fail(f"--function {name!r} is not an event-triggered function; expected one of: {', '.join(event_functions())}")
    from skyfuse import local

    if serve and local.running():
        fail("a fleet is already up in this folder (.skyfuse/endpoints.json); stop it first, or use --no-serve", FAILURE)
    bus = connect(fleet)
    bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    from skyfuse.serving.hosts import HostError

    fabric = local.LocalFleet(fleet, bus, _print_delivery, functions=function, clouds=cloud, serve=serve,
                              metrics_port=metrics_port, router_port=router_port if serve else 0)
    try:
        fabric.start()  # stops what it started when a part fails
    except (HostError, OSError) as exc:
        fail(f"the fleet could not start: {exc}", FAILURE)
    with fabric as running:
        out.print(f"[bold]skyfuse up[/]: {len(running.hosts)} function hosts on the {fleet.bus.backend} bus "
                  f"({', '.join(sorted({h.cloud for h in running.hosts}))}); Ctrl-C to stop", highlight=False)
        for host in running.hosts:
            out.print(f"  {host.group:<18} ← {', '.join(host.topics)}  [dim]{host.invoker.shape}[/]", highlight=False)
        if metrics_port:
            out.print(f"  {'function hosts':<18} → http://127.0.0.1:{metrics_port}/metrics  [dim]Prometheus[/]",
                      highlight=False)
        if running.router:
            out.print(f"  {'router':<18} → {running.router.url}/predict  [dim]by placement weights; GET /router[/]",
                      highlight=False)
        for name, server in running.servers.items():
            out.print(f"  {name + '.inference':<18} → {server.url}/predict  [dim]{' '.join(server.server_argv[:2])}[/]",
                      highlight=False)
        if emulate and "aws" in running.servers:
            gateway = emulation.api_gateway(running.servers["aws"].url)
            local.record_gateway("aws", gateway)
            out.print(f"  {'aws.api-gateway':<18} → {gateway}/predict  [dim]LocalStack API Gateway, HTTP proxy[/]",
                      highlight=False)
        try:
            done.wait(seconds)
        except KeyboardInterrupt:
            pass
        out.print("stopping: finishing in-flight batches, committing, stopping the servers…")
    bus.close()


def gather_status(fleet: fleet_config.Fleet, bus: Bus) -> dict:
    ours = set(all_topics(fleet))  # a broker may carry other applications' topics too
    topics = {name: n for name, n in bus.topics().items() if name in ours}
    ends = bus.end_offsets_of(sorted(topics))
    status = {"bus": fleet.bus.backend, "topics": {}, "functions": [], "dead_letters": {}}
    for name in sorted(topics):
        status["topics"][name] = {"partitions": topics[name], "records": sum(ends[name].values())}
    for function in event_functions():
        for cloud in fleet.clouds_for(function):
            group = f"{cloud}.{function}"
            lag = {t: bus.lag(group, t, ends[t]) for t in contracts.topics_for(function) if t in topics}
            status["functions"].append({"function": function, "cloud": cloud, "group": group,
                                        "lag": sum(lag.values()), "lag_by_topic": lag})
        dlq = contracts.dlq_topic(function)
        status["dead_letters"][function] = sum(ends[dlq].values()) if dlq in topics else 0
    status["clouds"] = cloud_status(fleet, bus, topics)
    return status


def _latest(bus: Bus, type_name: str, topics: dict, per_partition: int = 200) -> list[dict]:
    """Data of the latest events of a type, oldest first (the log's tail, not its whole)."""
    topic = contracts.event_type(type_name).topic
    if topic not in topics:
        return []
    found = []
    for record in bus.tail(topic, per_partition):
        try:
            found.append(events.decode(record.key, record.value, record.headers).get_data())
        except events.MalformedEvent:
            continue
    return found


def cloud_status(fleet: fleet_config.Fleet, bus: Bus, topics: dict) -> dict:
    from skyfuse import local

    endpoints = local.running() or {}
    placements = _latest(bus, "placement.changed", topics)
    weights = {p["cloud"]: p["weight"] for p in (placements[-1]["placements"] if placements else [])}
    metrics = {m["cloud"]: m for m in _latest(bus, "metrics.sampled", topics) if m["source"] == "inference"}
    clouds = {}
    for name in fleet.clouds:
        endpoint = endpoints.get(name)
        health = _get_json(f"{endpoint}/health") if endpoint else None
        m = metrics.get(name, {})
        clouds[name] = {"endpoint": endpoint, "model_version": (health or {}).get("model_version"),
                        "placement_weight": weights.get(name, 0.0),
                        "p50_ms": (m.get("latency_ms") or {}).get("p50"), "p99_ms": (m.get("latency_ms") or {}).get("p99"),
                        "requests_per_s": m.get("requests_per_s"), "error_rate": m.get("error_rate")}
    return clouds


def _get_json(url: str) -> dict | None:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3)
        conn.request("GET", parts.path)
        return orjson.loads(conn.getresponse().read())
    except (OSError, orjson.JSONDecodeError):
        return None


@app.command(cls=Command)
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
    clouds = Table("cloud", "endpoint", "model", "placement weight", "p50 ms", "p99 ms", "requests/s",
                   title="serving")
    for name, c in report["clouds"].items():
        clouds.add_row(name, c["endpoint"] or "— (skyfuse up not running)", c["model_version"] or "—",
                       f"{c['placement_weight']:.2f}", *("—" if c[k] is None else f"{c[k]:.2f}"
                                                         for k in ("p50_ms", "p99_ms", "requests_per_s")))
    out.print(topics, lag, clouds)


@app.command(cls=Command)
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
        d = deadletter.describe(r.headers)
        where = f"{d.get('topic')}[{d.get('partition')}]@{d.get('offset')}" if d.get("topic") else "rejected by the function"
        rows.append({"cloud": d.get("cloud"), "from": where,
                     "event_id": d["event_id"], "attempts": int(d.get("attempts") or 0), "reason": d.get("reason")})
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("cloud", "from", "event id", "attempts", "reason", title=f"{function}.dlq ({len(rows)} shown)")
    for row in rows:
        table.add_row(row["cloud"], row["from"], row["event_id"] or "—", str(row["attempts"]), row["reason"])
    out.print(table)


REACHED = ("ok", "rejected")  # a rejected event reached its function, which refused it


def sample_producer(fleet: fleet_config.Fleet, type_name: str, data: dict) -> str:
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


def sample_event(fleet: fleet_config.Fleet, type_name: str):
    """The sample of `type_name` as its first allowed producer in this local fleet would emit it."""
    data = contracts.sample(type_name)
    return event_as(fleet, sample_producer(fleet, type_name, data), type_name, data)


@app.command(cls=Command)
def selftest(timeout: Annotated[float, typer.Option(help="Seconds to wait for every delivery.")] = 60.0):
    """Publish the sample of every event type and show it reaching its function in every cloud."""
    from skyfuse import local

    fleet = load_fleet()
    local.prepare(fleet)
    bus = connect(fleet)
    bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
    published: dict[str, str] = {}  # event id → type
    seen: dict[tuple[str, str, str], Delivery] = {}  # (event id, function, cloud): an event may have several consumers
    lock = threading.Lock()

    def record(delivery: Delivery) -> None:
        with lock:
            if delivery.event_id in published:
                seen[(delivery.event_id, delivery.function, delivery.cloud)] = delivery

    hosts = build_hosts(fleet, bus, record)
    expected = {(t.name, f, cloud) for t in contracts.catalog().values() for f in t.consumers for cloud in fleet.clouds_for(f)}
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
    table = Table("event", "function", *fleet.clouds, title=f"deliveries ({time.monotonic() - started:.1f} s)")
    by_type = {(published[eid], function, cloud): d for (eid, function, cloud), d in seen.items()}
    for t in contracts.catalog().values():
        for function in t.consumers:
            cells = []
            for cloud in fleet.clouds:
                d = by_type.get((t.name, function, cloud))
                cells.append("—" if cloud not in fleet.clouds_for(function) else
                             f"[green]✓[/] {d.shape.split(' ')[0]}" + (" [yellow](rejected)[/]" if d.result == "rejected" else "")
                             if d and d.result in REACHED else "[red]✗ missing[/]")
            table.add_row(t.name, function, *cells)
    out.print(table)
    rejected = sum(d.result == "rejected" for d in by_type.values())
    if rejected:  # the samples name objects this fleet does not have: the core refuses them, with the reason
        out.print(f"[yellow]rejected[/]: {rejected} reached their function, which dead-lettered them with the reason "
                  "(`skyfuse dlq FUNCTION`)", highlight=False)
    missing = expected - {k for k, d in by_type.items() if d.result in REACHED}
    if missing:
        fail(f"{len(missing)} deliveries did not arrive within {timeout:g} s: {sorted(missing)}", FAILURE)
    out.print(f"[green]every event reached its function in every cloud[/] "
              f"({len(expected)} deliveries, each in its cloud's native event shape)")


PARTITIONS = ("iid", "stratified", "kmeans", "label-skew")
FUSIONS = federated.FUSIONS


def parse_partition(text: str) -> tuple[str, float]:
    method, _, alpha = text.partition(":")
    if method not in PARTITIONS:
        fail(f"--partition {text!r}: expected one of iid, stratified, kmeans, label-skew:ALPHA (e.g. label-skew:0.5)")
    try:
        value = float(alpha) if alpha else 0.5
    except ValueError:
        fail(f"--partition {text!r}: ALPHA must be a number, e.g. label-skew:0.5")
    if value <= 0:
        fail(f"--partition {text!r}: ALPHA must be > 0 (smaller is more skewed)")
    return method, value


def run_training(fleet: fleet_config.Fleet, dataset, plan, as_json: bool, timeout: float, serve: bool = True,
                 then=None) -> dict:
    """Train, fuse and (with servers) serve; `then(context)` runs while the fleet is still up and
    returns more of the summary (a scenario's load step and its placement timeline)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from skyfuse import local, training

    local.prepare(fleet)
    prepared = training.prepare(fleet, dataset, plan)
    err.print(f"[bold]{plan.run_id}[/]: {len(dataset)} rows → train {len(prepared.train)} / validation "
              f"{len(prepared.validation)} / test {len(prepared.test)}; {len(prepared.shards)} shards ({plan.partition}) "
              f"placed in {', '.join(plan.clouds)}; fusion {plan.fusion}, {plan.rounds} round(s)", highlight=False)
    bus = connect(fleet)
    bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
    endpoints = local.running()
    own = None if endpoints else local.LocalFleet(fleet, bus, serve=serve)
    err.print("using the fleet `skyfuse up` runs" if endpoints else
              f"starting the fleet in this process ({'with' if serve else 'without'} inference servers)")
    shards = len(prepared.shard_events)
    bars = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)
    train_bar = bars.add_task("models trained", total=shards * plan.rounds)
    export_bar = bars.add_task("models exported", total=shards * plan.rounds)
    fuse_bar = bars.add_task("rounds fused", total=plan.rounds)
    serve_bar = bars.add_task("placed clouds serving", total=None) if (endpoints or serve) else None

    def show(p: "training.Progress") -> None:
        bars.update(train_bar, completed=sum(p.trained.values()))
        bars.update(export_bar, completed=sum(p.exported.values()))
        bars.update(fuse_bar, completed=sum(1 for k in p.times if k.startswith("round.")) + (p.fused is not None))
        if serve_bar is not None and p.placement:
            bars.update(serve_bar, total=len(p.placed),
                        completed=sum(p.deployments.get(c, {}).get("state") == "serving" for c in p.placed))

    try:
        if own:
            own.start()
            endpoints = {c: s.url for c, s in own.servers.items()}
        with bars:
            progress = training.follow(bus, prepared, show, timeout, until_served=bool(endpoints))
        # a scenario first: the check's big batches would otherwise weigh in its quiet baseline
        extra = then(ScenarioContext(fleet, bus, endpoints, prepared, progress, err)) \
            if then and progress.fused and progress.deployed else {}
        serving = training.check_serving(progress, endpoints, prepared.test, local.api_key(fleet)) if endpoints and progress.deployed else {}
    finally:
        if own:
            own.stop()
    bus.close()
    for failure in progress.failures:
        err.print(f"[yellow]dead-lettered[/] by {failure['function']} in {failure['cloud']}: {failure['reason']}",
                  highlight=False)
    if progress.fused is None:
        fail(f"{plan.run_id}: no fused model after {timeout:g} s "
             f"({len(progress.failures)} event(s) dead-lettered; see `skyfuse dlq trainer`)", FAILURE)
    err.print("training the centralized baseline on all training rows…")
    accuracy, central_s = training.centralized(fleet, prepared)
    t = progress.times
    last_round = plan.rounds - 1
    timings = {"prepare_s": prepared.seconds, "train_s": t.get("trained.0.last"),
               "export_s": t.get("exported.0.last"), "fusion_s": t.get("fused"),
               "fedavg_rounds_s": (t["fused"] - t["round.1"]) if "round.1" in t else 0.0,
               "centralized_train_s": central_s}
    timings["serving_s"] = t.get("serving")
    summary = training.score(prepared, progress, accuracy, timings)
    summary["serving"] = serving
    summary.update(extra)
    path = training.save(summary)
    if as_json:
        print(orjson.dumps(summary).decode())
    else:
        print_summary(summary)
        out.print(f"[dim]saved {path}; `skyfuse report` draws it[/]", highlight=False)
    return summary


@dataclass
class ScenarioContext:
    """What a scenario step gets while the fleet is still up."""

    fleet: fleet_config.Fleet
    bus: Bus
    endpoints: dict[str, str]
    prepared: object  # training.Prepared
    progress: object  # training.Progress
    console: Console


def placement_table(placements: list[dict]) -> Table:
    table = Table("at (UTC)", "trigger", "serving", "weights", "reason", title="placement timeline (scheduler decisions)")
    for p in placements:
        weights = ", ".join(f"{c} {w:.2f}" for c, w in p["weights"].items() if w > 0)
        table.add_row(p["at"][11:23], p["trigger"], ", ".join(p["serving"]), weights, p["reason"])
    return table


def load_table(phases: list[dict]) -> Table:
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


def _num(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def print_summary(summary: dict) -> None:
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
    labels = {"prepare_s": "split + upload shards", "train_s": "shards trained (round 0)",
              "export_s": "exported to ONNX (round 0)", "fedavg_rounds_s": "FedAvg rounds after the first",
              "fusion_s": "fused.ready", "serving_s": "placed clouds serving it",
              "centralized_train_s": "centralized baseline training"}
    for key, label in labels.items():
        value = summary["timings"].get(key)
        timings.add_row(label, "—" if value is None else f"{value:.1f}")
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


PARTITION_HELP = "iid | stratified | kmeans | label-skew:ALPHA"
FUSION_HELP = "auto | " + " | ".join(f for f in FUSIONS if f != "auto")
WEIGHTS_HELP = "Fusion weight per cloud, e.g. aws=0.3,gcp=0.3,azure=0.4 (non-negative, normalised; default: by rows)."


@app.command(cls=Command)
def train(
    data: Annotated[Path, typer.Argument(help="CSV file with a header row; every column but the target is a numeric feature.")],
    target: Annotated[str, typer.Option("--target", "-t", help="The label column.")],
    clouds: Annotated[Optional[str], typer.Option(help="Comma-separated configured clouds, any number (default: every configured cloud).")] = None,
    shards_per_cloud: Annotated[int, typer.Option("--shards-per-cloud", metavar="N", min=1, help="Shards (sub-models) each cloud trains.")] = 1,
    partition: Annotated[str, typer.Option(help=PARTITION_HELP)] = "iid",
    fusion: Annotated[str, typer.Option(help=FUSION_HELP)] = "auto",
    weights: Annotated[Optional[str], typer.Option(metavar="CLOUD=W,...", help=WEIGHTS_HELP)] = None,
    rounds: Annotated[Optional[int], typer.Option(help="FedAvg rounds (default from the config).")] = None,
    init: Annotated[str, typer.Option(help="random, or a .keras model to warm-start every trainer from.")] = "random",
    model: Annotated[Optional[str], typer.Option("--model", metavar="FILE.keras|MODULE:FUNCTION", help="Your own Keras "
                     "model instead of the built-in MLP: a .keras file, or MODULE:FUNCTION (a .py path or importable "
                     "module, then a function returning a compiled model). One input (None, d) of raw features, one "
                     "softmax output (None, k).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, the partition and the initial weights.")] = 0,
    quorum_timeout: Annotated[Optional[float], typer.Option(help="Seconds the fuser waits for missing members.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout) instead of tables.")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Without `skyfuse up`: also start the inference servers, place and serve the fused model.")] = True,
    emulate: Annotated[bool, typer.Option("--emulate", help="Stores in LocalStack S3, fake-gcs-server and Azurite, the bus on Kafka (`make emulators-up kafka-up`).")] = False,
):
    """Train on DATA split across clouds, fuse the shard models, and compare with centralized training."""
    from skyfuse.ml import data as mldata

    if not data.is_file():
        fail(f"no such file: {data}")
    try:
        dataset = mldata.load_csv(data.read_bytes(), target)
    except mldata.DataError as exc:
        fail(f"{data}: {exc}")
    fleet = load_fleet()
    plan = make_plan(fleet, dataset, clouds, partition, fusion, rounds, init, seed, quorum_timeout,
                     weights=weights, shards_per_cloud=shards_per_cloud, model=model)
    launch(fleet, dataset, plan, timeout, as_json, serve, emulate)


def make_plan(fleet: fleet_config.Fleet, dataset, clouds: str | None, partition: str, fusion: str,
              rounds: int | None, init: str, seed: int, quorum_timeout: float | None, **options):
    """The training plan from the command line's options, or a usage error saying what to change."""
    from skyfuse import training

    method, alpha = parse_partition(partition)
    if fusion not in FUSIONS:
        fail(f"--fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    if init != "random" and not Path(init).is_file():
        fail(f"--init {init!r}: expected 'random' or the path of a .keras model file")
    chosen = [c.strip() for c in clouds.split(",") if c.strip()] if clouds else list(fleet.clouds)
    unknown = [c for c in chosen if c not in fleet.clouds]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        fail(f"--clouds {clouds!r}: name each configured cloud at most once; configured: {', '.join(fleet.clouds)}")
    if isinstance(options.get("weights"), str):
        try:
            options["weights"] = training.parse_weights(options["weights"])
            training.check_weights(options["weights"], chosen)
        except ValueError as exc:
            fail(str(exc))
    rounds = rounds or (fleet.training.rounds if fusion in ("auto", *federated.SERVER_STRATEGIES) else 1)
    return training.Plan(target=dataset.target, clouds=chosen, partition=method, alpha=alpha, fusion=fusion,
                         rounds=rounds, seed=seed, init=None if init == "random" else init, timeout_s=quorum_timeout,
                         **options)


def launch(fleet: fleet_config.Fleet, dataset, plan, timeout: float, as_json: bool, serve: bool, emulate: bool,
           then=None) -> dict:
    from skyfuse import emulation

    if emulate:
        fleet = emulation.apply(fleet)
    try:
        return run_training(fleet, dataset, plan, as_json, timeout, serve, then)
    except ValueError as exc:
        fail(str(exc))


SCENARIOS = ("worked-example",)


@app.command(cls=Command)
def demo(
    dataset: Annotated[str, typer.Option(help="breast_cancer or digits (scikit-learn's, shipped with it).")] = "breast_cancer",
    partition: Annotated[str, typer.Option(help=PARTITION_HELP)] = "iid",
    fusion: Annotated[str, typer.Option(help=FUSION_HELP)] = "auto",
    rounds: Annotated[Optional[int], typer.Option(help="FedAvg rounds (default from the config).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    scenario: Annotated[Optional[str], typer.Option(metavar="NAME", help="worked-example: the design's example end to "
                        "end (3 × 1000 rows, N(0, 1) init, 10 GD steps, fusion 0.3/0.3/0.4, then a load step that "
                        "moves serving by response time).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Without `skyfuse up`: also start the inference servers, place and serve the fused model.")] = True,
    emulate: Annotated[bool, typer.Option("--emulate", help="Stores in LocalStack S3, fake-gcs-server and Azurite, the bus on Kafka (`make emulators-up kafka-up`).")] = False,
):
    """The whole training half on a real dataset over three clouds: what `make run` runs."""
    from skyfuse.ml import data as mldata

    if scenario is not None:
        if scenario not in SCENARIOS:
            fail(f"--scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
        from skyfuse import scenarios

        if not serve:
            fail("--scenario worked-example moves serving between clouds: it needs the inference servers (drop --no-serve)")
        if local_running():
            fail("--scenario worked-example starts its own fleet with its own timings; stop `skyfuse up` first", FAILURE)
        scenarios.prepare_environment(list(load_fleet().clouds))  # before the fleet loads: all its processes see it
        fleet = load_fleet()
        try:
            data, plan = scenarios.worked_example(list(fleet.clouds), seed)
        except ValueError as exc:
            fail(str(exc))
        summary = launch(fleet, data, plan, 900.0, as_json, True, emulate, then=scenarios.load_step)
        if not summary["scenario"]["moved"]:
            fail(f"the load step did not move serving: {summary['scenario']['error']}", FAILURE)
        return
    if dataset not in ("breast_cancer", "digits"):
        fail(f"--dataset {dataset!r}: expected breast_cancer or digits")
    fleet = load_fleet()
    ds = mldata.sample_dataset(dataset)
    launch(fleet, ds, make_plan(fleet, ds, None, partition, fusion, rounds, "random", seed, None), 900.0, as_json,
           serve, emulate)


def local_running() -> bool:
    from skyfuse import local

    return local.running() is not None


@app.command(cls=Command)
def report(run: Annotated[Optional[list[str]], typer.Option(help="Run id, repeatable: several runs (seeds) show "
                                                                  "their mean and spread (default: the last run).")] = None,
           out_dir: Annotated[Optional[Path], typer.Option("--out", metavar="FOLDER", help="Folder for report.png and report.html.")] = None):
    """Draw a run's accuracies (per shard, per strategy with the validation score that chose it,
    centralized), its time per stage and its placement timeline, as a PNG inside an HTML page."""
    from skyfuse import report as reporting
    from skyfuse import training

    try:
        summaries = [training.load(r) for r in run] if run else [training.load()]
    except FileNotFoundError as exc:
        fail(f"no such training run ({exc.filename}): run `skyfuse demo` or `skyfuse train` first", FAILURE)
    png, html = reporting.write(summaries, out_dir or training.RUNS_DIR / summaries[0]["run_id"],
                                placements_of(load_fleet(), {s["run_id"] for s in summaries}))
    out.print(f"wrote {png} and {html}", highlight=False)


def placements_of(fleet: fleet_config.Fleet, run_ids: set[str]) -> list[dict]:
    """The verified placement.changed decisions for the models of these runs, from the bus."""
    topic = contracts.event_type("placement.changed").topic
    try:
        bus = open_bus(fleet)
        records = bus.read(topic, 100_000) if topic in bus.topics() else []
    except Exception:  # the report draws what it has: without the bus, no timeline
        return []
    found = []
    for record in records:
        try:
            event = events.decode(record.key, record.value, record.headers)
            signing.check(fleet, event)
        except (events.MalformedEvent, signing.Untrusted, signing.KeySetupError):
            continue
        data = event.get_data()
        if any(data["model_version"].startswith(f"{r}-") for r in run_ids):
            found.append(data)
    bus.close()
    return found


@app.command(cls=Command)
def predict(data: Annotated[str, typer.Option("--data", "-d", help='{"instances": [[...], ...]} as JSON, or @FILE.')],
            cloud: Annotated[Optional[str], typer.Option("--cloud", help="Call this cloud's endpoint (default: the "
                                                                          "router, which follows placement).")] = None):
    """Call the fleet's inference (`skyfuse up` must be running) and print its answer."""
    import http.client
    from urllib.parse import urlsplit

    from skyfuse import local

    endpoints = local.running()
    if not endpoints:
        fail("no fleet is up in this folder: start one with `skyfuse up`", FAILURE)
    if cloud is not None and cloud not in endpoints:
        fail(f"--cloud {cloud!r} has no endpoint; serving clouds: {', '.join(endpoints)}")
    target = endpoints[cloud] if cloud else local.router()
    if not target:
        fail("this fleet runs without a router (skyfuse up --router-port 0): name a cloud with --cloud")
    body = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
    parts = urlsplit(target)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"content-type": "application/json", "x-api-key": local.api_key(load_fleet())}
    conn.request("POST", f"{parts.path}/predict", body, headers)
    response = conn.getresponse()
    print(response.read().decode())
    if response.status >= 300:
        raise typer.Exit(FAILURE)


keys_app = typer.Typer(help="The fleet's event-signing keys and the local inference API key (under signing.keys_dir).",
                       no_args_is_help=True, cls=Group)
app.add_typer(keys_app, name="keys")


@keys_app.command("init", cls=Command)
def keys_init():
    """Make a signing key for every function in every cloud and for the CLI, where none exists yet,
    and the local inference API key; `skyfuse up` and `make run` do this themselves."""
    from skyfuse import local

    fleet = load_fleet()
    made = signing.ensure_local_keys(fleet)
    local.api_key(fleet)
    out.print(f"{len(made)} new signing key(s) in {fleet.signing.keys_dir}; trust file "
              f"{Path(fleet.signing.keys_dir) / 'trust.json'} lists {len(signing.trusted(fleet.signing.keys_dir))}",
              highlight=False)


@keys_app.command("list", cls=Command)
def keys_list():
    """The trusted public keys: which principal each one signs for."""
    fleet = load_fleet()
    table = Table("key id", "principal", title=f"trusted keys ({Path(fleet.signing.keys_dir) / 'trust.json'})")
    for entry in signing.trusted(fleet.signing.keys_dir):
        table.add_row(entry["id"], entry["principal"])
    out.print(table)


@keys_app.command("rotate", cls=Command)
def keys_rotate(who: Annotated[str, typer.Argument(help="cloud/function (e.g. aws/scheduler), or cli.")]):
    """A new key for WHO: it signs from now on; the old one stays trusted until `skyfuse keys retire`."""
    fleet = load_fleet()
    if who not in signing.fleet_principals(fleet):
        fail(f"{who!r} is not a principal of this fleet; expected cli or cloud/function, e.g. "
             f"{signing.principal(next(iter(fleet.clouds)), 'scheduler')}")
    out.print(f"new key {signing.rotate(fleet.signing.keys_dir, who)} for {who}; retire the old one after "
              f"signing.max_age_s ({fleet.signing.max_age_s:.0f} s)", highlight=False)


@keys_app.command("retire", cls=Command)
def keys_retire(key_id: Annotated[str, typer.Argument(help="A key id from `skyfuse keys list`.")]):
    """Stop trusting a key: events signed with it are dead-lettered from now on."""
    try:
        signing.retire(load_fleet().signing.keys_dir, key_id)
    except signing.KeySetupError as exc:
        fail(str(exc))
    out.print(f"retired {key_id}", highlight=False)


@app.command(cls=Command)
def simulate(trace: Annotated[Optional[Path], typer.Argument(help="JSON lines of metrics.sampled data (default: the shipped day).")] = None,
             decisions: Annotated[bool, typer.Option("--decisions", help="Also list the policy's decisions.")] = False,
             as_json: Annotated[bool, typer.Option("--json")] = False):
    """Replay a metrics trace through the placement policy and compare it with three baselines."""
    from skyfuse.scheduling import PolicyConfig
    from skyfuse.scheduling import simulate as sim

    try:
        samples = sim.load_trace(trace or sim.SHIPPED_TRACE)
    except (OSError, sim.TraceError) as exc:
        fail(str(exc))
    results = sim.compare(samples, PolicyConfig.from_fleet(load_fleet()))
    rows = [{"policy": r.name, "cost_usd": round(r.cost_usd, 4), "slo_violating_minutes": r.slo_minutes,
             "down_minutes": r.down_minutes, "moves": r.moves} for r in results]
    if as_json:
        print(json.dumps(rows))
        return
    floor = min(r["cost_usd"] for r in rows) or 1.0
    table = Table("policy", "cost (USD)", "vs lowest", "SLO-violating min", "of which on a down cloud", "moves",
                  title=f"placement over {trace or 'the shipped day (daily cycle, price change, outage)'}")
    for r in rows:
        table.add_row(r["policy"], f"{r['cost_usd']:.2f}", f"{r['cost_usd'] / floor:.3f}×",
                      f"{r['slo_violating_minutes']:.0f}", f"{r['down_minutes']:.0f}", str(r["moves"]),
                      style="bold" if r["policy"] == "policy" else None)
    out.print(table)
    if decisions:
        for d in results[0].decisions:
            out.print(f"{sim.format_time(d.at)} [bold]{d.kind}[/]: {d.reason}", highlight=False)


if __name__ == "__main__":
    app()
