"""The exporter's core: turns a trained Keras model into ONNX, in the cloud that trained it.

Any single-input Keras model exports: the built-in MLP or a user's own (`skyfuse train --model`).
Parity is checked on the shard's validation rows before anything is announced: a model whose ONNX
form differs from Keras by more than 1e-5, or that tf2onnx cannot convert, is dead-lettered with
the figure or the reason. Each (run, round, shard) is exported once through the idempotency
layer; its onnx.ready id is derived from it.
"""
from __future__ import annotations

from typing import cast

from cloudevents.http import CloudEvent

from skyfuse.payloads import ModelReady
from skyfuse.runtime.function import Rejected, Runtime
from skyfuse.storage import StoreError, keys

PARITY_LIMIT = 1e-5


def handle(event: CloudEvent, runtime: Runtime) -> None:
    data = cast(ModelReady, event.get_data())
    if data["cloud"] != runtime.cloud:
        runtime.received(event, "skipped: the model lives in another cloud")
        return
    key = f"export/{data['run_id']}/round-{data['round']}/{data['cloud']}-{data['shard_id']}"
    with runtime.once(key) as claim:
        if claim.done:
            runtime.received(event, "skipped: already exported (duplicate event)")
            return
        _export(runtime, event, data, key)


def _export(runtime: Runtime, event: CloudEvent, data: ModelReady, key: str) -> None:
    from skyfuse.ml import data as mldata
    from skyfuse.ml import export
    from skyfuse.ml import model as mlmodel

    store = runtime.store()
    try:
        model = mlmodel.from_bytes(runtime.fetch(data["model_uri"], data["sha256"]), keep=True)  # as a warm instance
        raw = runtime.fetch(data["validation_uri"], data.get("validation_sha256"))
    except StoreError as exc:
        raise Rejected(f"model {data['model_uri']} cannot be read: {exc}") from exc
    rows = mldata.load_csv(raw, label_column(raw, data["features"]), classes=data["classes"])
    try:
        onnx_bytes = export.to_onnx(model)
        diff = export.parity(model, onnx_bytes, rows.X)
        if diff > PARITY_LIMIT:  # judged on a graph traced from this very model, not one reused
            onnx_bytes = export.to_onnx(model, fresh=True)
            diff = export.parity(model, onnx_bytes, rows.X)
    except Exception as exc:  # noqa: BLE001 - the same model fails the same way again: no retries
        raise Rejected(f"{data['model_uri']} cannot be exported to ONNX: {type(exc).__name__}: {exc}") from None
    if diff > PARITY_LIMIT:
        raise Rejected(f"ONNX export of {data['model_uri']} differs from Keras by {diff:.3g} "
                       f"(limit {PARITY_LIMIT:g}) on {len(rows)} validation rows")
    saved = store.put(keys.member_onnx(data["run_id"], data["round"], data["cloud"], data["shard_id"]), onnx_bytes)
    shape = export.describe(onnx_bytes)
    runtime.emit("onnx.ready", {
        "run_id": data["run_id"], "round": data["round"], "shard_id": data["shard_id"], "cloud": data["cloud"],
        "onnx_uri": saved.uri, "sha256": saved.sha256, "source_sha256": data["sha256"], "model_uri": data["model_uri"],
        "opset": shape["opset"], "inputs": shape["inputs"], "outputs": shape["outputs"],
        "parity_max_abs_diff": float(diff), "samples": data["samples"], "validation": data["validation"],
        "features": data["features"], "classes": data["classes"], "task": data["task"], "manifest": data["manifest"],
    }, caused_by=event, dedupe_key=key)
    runtime.received(event, f"exported (parity {diff:.2g})")


def label_column(csv: bytes, features: list[str]) -> str:
    """The label column of a shard CSV: the one header that is not a feature."""
    header = csv.split(b"\n", 1)[0].decode().strip().split(",")
    (label,) = [name.strip('"') for name in header if name.strip('"') not in features]
    return label
