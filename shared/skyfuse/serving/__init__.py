"""Serving the fused model over HTTP, framework- and cloud-neutral (onnxruntime and numpy only).

- `skyfuse.serving.model`: `LoadedModel` (verified, warmed onnxruntime session with its lineage),
  `ModelSlot` (atomic swap), `PointerWatcher` (follows `serving/current.json` in the cloud's store).
- `skyfuse.serving.session`: how skyfuse opens an onnxruntime session (serving and fusion alike).
- `skyfuse.serving.api`: `predict`, `health`, `metadata`, `openapi`: bytes in, (status, JSON) out.
- `skyfuse.serving.routes`: the table of the service's own routes the entry points and OpenAPI share.
- `skyfuse.serving.oip`: the Open Inference Protocol v2 (KServe/Triton REST) routes, same shape.
- `skyfuse.serving.prometheus`: the `/metrics` of every host (prometheus_client, multiprocess
  under gunicorn's workers).
- `skyfuse.serving.metrics`: latency/error recorder and the `metrics.sampled` emitter.
- `skyfuse.serving.asgi`: the few ASGI helpers the local hosts share.
- `skyfuse.serving.testing`: tiny ONNX classifiers for tests and the benchmark (imports `onnx`
  when called; never used on the serving path).

Import the submodule you need; this package imports nothing.
"""
