"""`skyfuse up`: the whole fleet on this machine until interrupted (`skyfuse.dev.local`)."""
from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from skyfuse.cli.common import FAILURE, Command, app, fail, load_fleet, out, ready_bus
from skyfuse.cli.tables import print_delivery
from skyfuse.contracts import event_functions

if TYPE_CHECKING:
    from skyfuse.dev.local import LocalFleet


@app.command(cls=Command)
def up(
    cloud: Annotated[list[str] | None, typer.Option("--cloud", help="Only these clouds (repeatable).")] = None,
    function: Annotated[list[str] | None, typer.Option("--function", help="Only these functions (repeatable).")] = None,
    seconds: Annotated[float | None, typer.Option("--for", help="Stop after this many seconds.")] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Also run each cloud's inference server.")] = True,
    emulate: Annotated[bool, typer.Option("--emulate",
                                          help="Stores in the cloud emulators, the bus on Kafka.")] = False,
    metrics_port: Annotated[int, typer.Option("--metrics-port", metavar="PORT", help="Serve the function hosts' "
                                              "Prometheus metrics on 127.0.0.1:PORT/metrics (0: off).")] = 0,
    router_port: Annotated[int, typer.Option("--router-port", metavar="PORT", help="Serve one front door on "
                                             "127.0.0.1:PORT that forwards to the placed clouds by their placement "
                                             "weights (0: off).")] = 8100,
) -> None:
    """Start every cloud's function hosts, timers and inference server; run until interrupted."""
    from skyfuse.dev import emulation, hosts, local

    fleet = emulation.apply(load_fleet()) if emulate else load_fleet()
    for name in cloud or ():
        if name not in fleet.clouds:
            fail(f"--cloud {name!r} is not configured; configured clouds: {', '.join(fleet.clouds)}")
    for name in function or ():
        if name not in event_functions():
            fail(f"--function {name!r} is not an event-triggered function; "
                 f"expected one of: {', '.join(event_functions())}")
    bus = ready_bus(fleet)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    fabric = local.LocalFleet(fleet, bus, print_delivery, functions=function, clouds=cloud, serve=serve,
                              metrics_port=metrics_port, router_port=router_port if serve else 0)
    try:
        fabric.start()  # stops what it started when a part fails
    except (hosts.HostError, OSError) as exc:  # a server that would not start, a port taken
        fail(f"the fleet could not start: {exc}", FAILURE)
    with fabric as running:
        _print_fleet(running, fleet.bus.backend, metrics_port)
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


def _print_fleet(running: LocalFleet, backend: str, metrics_port: int) -> None:
    out.print(f"[bold]skyfuse up[/]: {len(running.hosts)} function hosts on the {backend} bus "
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
