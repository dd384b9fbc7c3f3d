"""Every function host of the fleet, in threads of one process: what `skyfuse up` runs.

Each function's entry points come from the project's entry point table (`skyfuse.dev.entrypoints`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from skyfuse.bus.base import Bus
from skyfuse.config import FUNCTIONS, Fleet
from skyfuse.contracts import event_functions
from skyfuse.dev import entrypoints
from skyfuse.runtime.clouds.base import Invoker
from skyfuse.runtime.function import Runtime, hosted
from skyfuse.runtime.host import FunctionHost, Listener

if TYPE_CHECKING:
    from skyfuse.runtime.metrics import HostMetrics

log = logging.getLogger("skyfuse.fleet")


def invoker_for(fleet: Fleet, cloud: str, function: str) -> Invoker:
    """The real entry point of `function` for `cloud`'s provider, behind its native trigger."""
    settings = fleet.clouds[cloud]
    if settings.provider == "aws":
        from skyfuse.runtime.clouds.aws import LambdaInvoker

        bootstrap = fleet.bus.kafka.bootstrap_servers if fleet.bus.backend == "kafka" else "embedded"
        return LambdaInvoker(entrypoints.require(function, "aws").ref, f"skyfuse-{function}", settings.region,
                             bootstrap)
    if settings.provider == "gcp":
        from skyfuse.runtime.clouds.gcp import CloudEventInvoker

        entry = entrypoints.require(function, "gcp")
        return CloudEventInvoker(str(entry.source()), entry.target)
    from skyfuse.runtime.clouds.azure import KafkaTriggerInvoker

    return KafkaTriggerInvoker(entrypoints.require(function, "azure").ref)


def build_hosts(fleet: Fleet, bus: Bus, listener: Listener | None = None, functions: list[str] | None = None,
                clouds: list[str] | None = None, metrics: HostMetrics | None = None) -> list[FunctionHost]:
    hosts: list[FunctionHost] = []
    for function in functions or event_functions():
        for cloud in fleet.clouds_for(function):
            if clouds is None or cloud in clouds:
                hosts.append(FunctionHost(bus, fleet, cloud, function, invoker_for(fleet, cloud, function), listener,
                                          metrics=metrics))
    if metrics:
        metrics.watch(hosts)
    return hosts


class TimerHost:
    """Plays a cloud's scheduler (EventBridge Scheduler, Cloud Scheduler, an Azure timer trigger):
    calls a core's `on_timer(runtime)` every `period_s`."""

    def __init__(self, bus: Bus, fleet: Fleet, cloud: str, function: str, on_timer: Callable[[Runtime], object],
                 period_s: float):
        self.group = f"{cloud}.{function}.timer"
        self.on_timer, self.period_s = on_timer, period_s
        self.runtime = Runtime(cloud, function, fleet, bus_factory=lambda: bus)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.period_s):
            with hosted(self.runtime):
                try:
                    self.on_timer(self.runtime)
                except Exception:
                    log.exception("timer failed", extra={"group": self.group})


def build_timers(fleet: Fleet, bus: Bus, functions: list[str] | None = None,
                 clouds: list[str] | None = None) -> list[TimerHost]:
    """A timer for every function with a `<function>.timer` entry point (the fuser's quorum check, the monitor)."""
    timers: list[TimerHost] = []
    for function in functions or FUNCTIONS:
        entry = entrypoints.get(function, "timer")
        on_timer: Callable[[Runtime], object] | None = entry.load() if entry else None
        if not on_timer:
            continue
        for cloud in fleet.clouds_for(function):
            if clouds is None or cloud in clouds:
                timers.append(TimerHost(bus, fleet, cloud, function, on_timer, fleet.training.timer_s))
    return timers


class Fabric:
    """Runs hosts and timers in threads until `stop()`; each host commits what it finished before it exits."""

    def __init__(self, hosts: Sequence[FunctionHost], timers: Sequence[TimerHost] = ()):
        self.hosts = hosts
        self.stopping = threading.Event()
        runners: list[FunctionHost | TimerHost] = [*hosts, *timers]
        self.threads = [threading.Thread(target=h.run, args=(self.stopping,), name=h.group, daemon=True)
                        for h in runners]

    def start(self) -> Fabric:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout_s)

    def __enter__(self) -> Fabric:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
