"""The deployer's core: brings the placed model to its own cloud and swaps it in, safely.

placement.changed that gives this cloud weight: copy the model from the source cloud's store into
this cloud's store, check its sha256, load it in an onnxruntime session and run it once (warm),
then point `serving/current.json` at it. The inference servers of this cloud watch that pointer
and swap sessions atomically. Any failure leaves the pointer, and so the old model, as it was, and
deployment.status says why. A placement that drops this cloud drains it.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import orjson
from cloudevents.http import CloudEvent

from skyfuse.runtime.function import Runtime
from skyfuse.storage import StoreError, fetch

POINTER = "serving/current.json"


def handle(event: CloudEvent, runtime: Runtime) -> None:
    data = event.get_data()
    weights = {p["cloud"]: p["weight"] for p in data["placements"]}
    was_serving = any(p["cloud"] == runtime.cloud and p["weight"] > 0 for p in data["previous"])
    if weights.get(runtime.cloud, 0) > 0:
        deploy(runtime, event, data)
    elif was_serving or runtime.cloud in weights:
        _status(runtime, event, data, "draining", reason="placement moved away from this cloud")
        _status(runtime, event, data, "removed", reason="no traffic is routed here any more")
    else:
        runtime.received(event, "skipped: placement does not involve this cloud")


def deploy(runtime: Runtime, event: CloudEvent, data: dict) -> None:
    store = runtime.store()
    current = orjson.loads(store.get(POINTER)) if store.exists(POINTER) else None
    if current and current["version"] == data["model_version"] and current["sha256"] == data["sha256"]:
        _status(runtime, event, data, "serving", reason="already serving this version")
        return
    _status(runtime, event, data, "deploying")
    started = time.perf_counter()
    try:
        model = fetch(data["model_uri"], data["sha256"])
        check(model)
    except (StoreError, ModelRejected) as exc:
        _status(runtime, event, data, "failed", reason=f"{exc}; still serving "
                f"{current['version'] if current else 'nothing'}")
        return
    saved = store.put(f"serving/models/{data['model_version']}.onnx", model)
    store.put(POINTER, orjson.dumps({"version": data["model_version"], "uri": saved.uri, "sha256": saved.sha256}))
    _status(runtime, event, data, "serving", warm_ms=round((time.perf_counter() - started) * 1000, 3))


class ModelRejected(ValueError):
    pass


def check(model: bytes) -> None:
    """Load the model in onnxruntime and run one all-zero row through it."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        (feature,) = session.get_inputs()
        width = feature.shape[-1]
        session.run(None, {feature.name: np.zeros((1, int(width)), dtype=np.float32)})
    except Exception as exc:  # onnxruntime raises several types for a bad model
        raise ModelRejected(f"the model does not load or run in onnxruntime: {type(exc).__name__}: {exc}") from exc


def _status(runtime: Runtime, event: CloudEvent, data: dict, state: str, reason: str | None = None,
            warm_ms: float | None = None) -> None:
    status = {"decision_id": data["decision_id"], "cloud": runtime.cloud, "model_version": data["model_version"],
              "state": state, "sha256": data["sha256"],
              "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    endpoint = runtime.fleet.clouds[runtime.cloud].endpoint
    if endpoint:
        status["endpoint"] = endpoint
    if reason:
        status["reason"] = reason
    if warm_ms is not None:
        status["warm_ms"] = warm_ms
    runtime.emit("deployment.status", status, caused_by=event)
    runtime.received(event, f"{state}" + (f": {reason}" if reason else ""))
