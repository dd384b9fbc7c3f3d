"""A training run on the local fleet, what `skyfuse train` and `skyfuse demo` do after parsing their
options: the fleet `skyfuse up` runs from this folder, or one started here for the run; follow the
run to fused.ready (and, with servers, until the placed clouds serve it); an optional step while
the fleet is still up (a scenario's load step); check the endpoints' answers; score everything on
the test rows against a centralized model.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skyfuse import training
from skyfuse.bus import Bus
from skyfuse.config import Fleet
from skyfuse.dev import local
from skyfuse.errors import Failure

if TYPE_CHECKING:
    from rich.console import Console


class NothingFused(Failure):
    """No fused model within the run's timeout."""


@dataclass
class RunContext:
    """What a step run while the fleet is still up gets (`skyfuse.dev.scenarios.load_step`)."""

    fleet: Fleet
    bus: Bus
    endpoints: dict[str, str]
    prepared: training.Prepared
    progress: training.Progress
    console: Console  # where the step reports


Step = Callable[[RunContext], dict[str, Any]]


def serves_here(serve: bool) -> bool:
    """Whether the run will end with placed clouds serving: a running fleet serves, an own one if asked."""
    return bool(local.running()) or serve


def run(fleet: Fleet, bus: Bus, prepared: training.Prepared, *, serve: bool, timeout_s: float,
        show: Callable[[training.Progress], None], console: Console, then: Step | None = None,
        following: AbstractContextManager[object] | None = None) -> dict[str, Any]:
    """The run's summary (`training.score`, plus `serving` and what `then` returned); NothingFused
    when no model was fused in time. `show(progress)` is called as events arrive, inside
    `following` (a live progress display), if given."""
    endpoints = local.running() or {}
    own = None if endpoints else local.LocalFleet(fleet, bus, serve=serve)
    console.print("using the fleet `skyfuse up` runs" if endpoints else
                  f"starting the fleet in this process ({'with' if serve else 'without'} inference servers)")
    extra: dict[str, Any] = {}
    serving: dict[str, dict[str, Any]] = {}
    try:
        if own:
            own.start()
            endpoints = {c: s.url for c, s in own.servers.items()}
        with following or contextlib.nullcontext():
            progress = training.follow(bus, prepared, show, timeout_s, until_served=bool(endpoints))
        # a step first: the check's big batches would otherwise weigh in a scenario's quiet baseline
        if then and progress.fused and progress.deployed:
            extra = then(RunContext(fleet, bus, endpoints, prepared, progress, console))
        if endpoints and progress.deployed:
            serving = training.check_serving(progress, endpoints, prepared.test, local.api_key(fleet))
    except BaseException:
        if own:
            own.stop()
        raise
    # the fleet stops (mostly a wait for its servers to exit) while the baseline trains
    stopping = threading.Thread(target=own.stop, name="fleet-stop") if own else None
    if stopping:
        stopping.start()
    try:
        for failure in progress.failures:
            console.print(f"[yellow]dead-lettered[/] by {failure['function']} in {failure['cloud']}: "
                          f"{failure['reason']}", highlight=False)
        if progress.fused is None:
            raise NothingFused(f"{prepared.plan.run_id}: no fused model after {timeout_s:g} s "
                               f"({len(progress.failures)} event(s) dead-lettered; see `skyfuse dlq trainer`)")
        console.print("training the centralized baseline on all training rows…")
        accuracy, central_s = training.centralized(fleet, prepared)
    finally:
        if stopping:
            stopping.join()
    summary = training.score(prepared, progress, accuracy, progress.stage_seconds(prepared.seconds, central_s))
    summary["serving"] = serving
    summary.update(extra)
    return summary
