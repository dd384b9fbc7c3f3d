"""Serving the fused model over HTTP, framework- and cloud-neutral (onnxruntime and numpy only).

- `skyfuse.serving.model`: `LoadedModel` (verified, warmed onnxruntime session with its lineage),
  `ModelSlot` (atomic swap), `PointerWatcher` (follows `serving/current.json` in the cloud's store).
- `skyfuse.serving.api`: `predict`, `health`, `metadata`, `openapi`: bytes in, (status, JSON) out.
- `skyfuse.serving.oip`: the Open Inference Protocol v2 (KServe/Triton REST) routes, same shape.
- `skyfuse.serving.prometheus`: the `/metrics` of every host (prometheus_client, multiprocess
  under gunicorn's workers).
- `skyfuse.serving.metrics`: latency/error recorder and the `metrics.sampled` emitter.
- `skyfuse.serving.asgi`: the few ASGI helpers the local hosts share.
- `skyfuse.serving.hosts`: start each cloud's real HTTP server on 127.0.0.1 as a subprocess.
- `skyfuse.serving.launch`: how those servers start (imports with the garbage collector off).
- `skyfuse.serving.testing`: tiny ONNX classifiers for tests and the benchmark (imports `onnx`
  when called; never used on the serving path).

Import the submodule you need; this package imports nothing.
"""
