"""The deployer's core: brings the placed model to its own cloud and swaps it in, safely.

placement.changed that gives this cloud weight: copy the model from the source cloud's store into
this cloud's store, check its sha256, load and warm it exactly as the servers will
(`skyfuse.serving.model.LoadedModel`), then point `serving/current.json` at it. The inference
servers of this cloud watch that pointer and swap sessions atomically. Any failure leaves the
pointer, and so the old model, as it was, and deployment.status says why. A placement that drops
this cloud drains it. With `scheduler.standby`, every other cloud of the fleet gets the model too,
as a warm standby that takes no traffic (state `standby`), so a move or failover to it needs no copy
and the monitor can measure it. Each decision is applied once per cloud through the idempotency
layer; its statuses have ids derived from it. A decision older (by the scheduler's `sequence`) than
the last one applied here is skipped: decisions about different model versions travel in different
partitions, so a late one must not roll serving back.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import orjson
from cloudevents.http import CloudEvent

from skyfuse import tracing
from skyfuse.payloads import DeploymentState, DeploymentStatus, PlacementChanged
from skyfuse.runtime.function import Runtime
from skyfuse.serving.model import POINTER_KEY as POINTER
from skyfuse.serving.model import LoadedModel, ModelError, publish
from skyfuse.storage import StoreError

APPLIED = "serving/decision.json"  # the newest decision applied here, so an older one arriving late is skipped


def handle(event: CloudEvent, runtime: Runtime) -> None:
    data = cast(PlacementChanged, event.get_data())
    with runtime.once(_key(runtime, data)) as claim:
        if claim.done:
            runtime.received(event, "skipped: decision already applied (duplicate event)")
            return
        _apply(runtime, event, data)


def _key(runtime: Runtime, data: PlacementChanged) -> str:
    return f"deploy/{data['decision_id']}/{runtime.cloud}"


def _apply(runtime: Runtime, event: CloudEvent, data: PlacementChanged) -> None:
    weights = {p["cloud"]: p["weight"] for p in data["placements"]}
    was_serving = any(p["cloud"] == runtime.cloud and p["weight"] > 0 for p in data["previous"])
    standby = runtime.fleet.scheduler.standby
    if not (weights.get(runtime.cloud, 0) > 0 or was_serving or runtime.cloud in weights or standby):
        runtime.received(event, "skipped: placement does not involve this cloud")
        return
    applied = _applied(runtime)
    if applied and data.get("sequence") is not None and applied.get("sequence", 0) > data["sequence"]:
        # decisions for different versions travel in different partitions: a late one must not undo a newer one
        runtime.received(event, f"skipped: superseded by decision {applied['decision_id']} "
                                f"(scheduler sequence {applied['sequence']} > {data['sequence']})")
        return
    if weights.get(runtime.cloud, 0) > 0:
        deploy(runtime, event, data)
    elif standby:
        deploy(runtime, event, data, "standby")
    else:
        _status(runtime, event, data, "draining", reason="placement moved away from this cloud")
        _status(runtime, event, data, "removed", reason="no traffic is routed here any more")
    if data.get("sequence") is not None:
        runtime.store().put(APPLIED, orjson.dumps({"decision_id": data["decision_id"], "sequence": data["sequence"]}))


def _applied(runtime: Runtime) -> dict[str, Any] | None:
    """The newest decision this cloud's deployer applied."""
    store = runtime.store()
    return orjson.loads(store.get(APPLIED)) if store.exists(APPLIED) else None


def deploy(runtime: Runtime, event: CloudEvent, data: PlacementChanged, state: DeploymentState = "serving") -> None:
    """Bring the model here and point the servers at it; `state` is `serving`, or `standby` (no traffic)."""
    store = runtime.store()
    current = orjson.loads(store.get(POINTER)) if store.exists(POINTER) else None
    if current and current["version"] == data["model_version"] and current["sha256"] == data["sha256"]:
        _status(runtime, event, data, state, reason="already holds this version" + (
            "; a warm standby, no traffic routed here" if state == "standby" else ""))
        return
    _status(runtime, event, data, "deploying")
    try:
        model = runtime.fetch(data["model_uri"], data["sha256"])
        loaded = LoadedModel(model, data["model_version"], data["sha256"], data["model_uri"])  # what servers run
    except (StoreError, ModelError) as exc:
        _status(runtime, event, data, "failed", reason=f"{exc}; still serving "
                f"{current['version'] if current else 'nothing'}")
        return
    publish(store, data["model_version"], model, traceparent=tracing.current_traceparent())
    _status(runtime, event, data, state, warm_ms=round(loaded.load_ms, 3),
            reason="a warm standby, no traffic routed here" if state == "standby" else None)


def _status(runtime: Runtime, event: CloudEvent, data: PlacementChanged, state: DeploymentState,
            reason: str | None = None, warm_ms: float | None = None) -> None:
    status: DeploymentStatus = {
        "decision_id": data["decision_id"], "cloud": runtime.cloud, "model_version": data["model_version"],
        "state": state, "sha256": data["sha256"],
        "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    endpoint = runtime.fleet.clouds[runtime.cloud].endpoint
    if endpoint:
        status["endpoint"] = endpoint
    if reason:
        status["reason"] = reason
    if warm_ms is not None:
        status["warm_ms"] = warm_ms
    runtime.emit("deployment.status", dict(status), caused_by=event, dedupe_key=f"{_key(runtime, data)}/{state}")
    runtime.received(event, f"{state}" + (f": {reason}" if reason else ""))
