"""The inference function's core: cloud-neutral, called by every cloud's HTTP entry point.

One `Service` per process, created on first use from the runtime (`SKYFUSE_CLOUD` and the fleet
config): it serves the model named by the serving pointer `serving/current.json` in this cloud's
store, follows the pointer in a background thread (`PointerWatcher`), records each request's
latency, and publishes a `metrics.sampled` event every `INFERENCE_METRICS_S` seconds. The service
is created lazily and again after a fork, so servers that fork workers after importing the entry
point (gunicorn) get one session and watcher per worker.

onnxruntime and numpy only: nothing here imports TensorFlow (or onnx).

Settings (environment; not `SKYFUSE_*`, whose names are fleet config keys):

| variable | default | meaning |
| --- | --- | --- |
| `INFERENCE_POINTER_KEY` | `serving/current.json` | key of the serving pointer in the cloud's store |
| `INFERENCE_POLL_S` | `0.5` | how often the pointer is read |
| `INFERENCE_RETRY_FAILED_S` | `30` | an unchanged pointer whose model failed to load is retried after this |
| `INFERENCE_MAX_ROWS` | `1000` | most rows per request (more: 400) |
| `INFERENCE_MAX_BODY_BYTES` | `1048576` | largest request body (more: 413) |
| `INFERENCE_METRICS_S` | `30` | seconds between `metrics.sampled` events; `0` turns them off |
| `INFERENCE_THREADS` | `1` | onnxruntime intra-op threads of the session |
| `INFERENCE_API_KEY_HASHES` | (none) | comma-separated sha256 hex digests of the API keys (below) |
| `INFERENCE_MODEL_NAME` | `skyfuse` | the model's name on the v2 routes (`/v2/models/{name}/...`) |

API keys: `/predict`, `/metadata`, and the v2 model metadata and infer routes take one (in `X-API-Key`
or `Authorization: Bearer`) when `INFERENCE_API_KEY_HASHES` is set; a request without a valid key
gets 401. Keys themselves are never stored: `skyfuse.serving.api.key_hash(key)` makes a digest.
A model name is 1 to 128 letters, digits, `_`, `.` or `-`: it is a segment of the URL path.

Every process also keeps Prometheus metrics (`skyfuse.serving.prometheus`, GET /metrics);
`PROMETHEUS_MULTIPROC_DIR` makes several worker processes report as one (see there).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from skyfuse import tracing
from skyfuse.payloads import MetricsSampled
from skyfuse.runtime.function import Runtime, current
from skyfuse.serving import api, oip, prometheus, routes
from skyfuse.serving.metrics import LatencyRecorder, MetricsEmitter
from skyfuse.serving.model import POINTER_KEY, LoadedModel, ModelSlot, PointerWatcher

FUNCTION = "inference"
KEEP = 16  # events its runtime remembers (`Runtime.keep`): a server runs for days, and nothing reads them back
log = logging.getLogger("skyfuse.inference")
Reply = api.Result | oip.Answer  # (status, body[, headers]): what a route answers


@dataclass(frozen=True)
class Settings:
    pointer_key: str = POINTER_KEY
    poll_s: float = 0.5
    retry_failed_s: float = 30.0
    max_rows: int = api.MAX_ROWS
    max_body_bytes: int = api.MAX_BODY_BYTES
    metrics_s: float = 30.0
    threads: int = 1
    api_key_hashes: str = ""
    model_name: str = api.MODEL_NAME

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"INFERENCE_{f.name.upper()}"
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            default = f.default
            assert isinstance(default, (str, float, int))  # every setting has a default of its type
            kind = type(default)
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            if not isinstance(value, str) and value < 0:
                raise ValueError(f"{name}={raw!r} must be >= 0")
            values[f.name] = value
        settings = cls(**values)
        if settings.max_rows < 1 or settings.max_body_bytes < 1 or settings.threads < 1 or settings.poll_s <= 0:
            raise ValueError("INFERENCE_MAX_ROWS, INFERENCE_MAX_BODY_BYTES, INFERENCE_THREADS must be >= 1 "
                             "and INFERENCE_POLL_S > 0")
        if not oip.NAME.match(settings.model_name):
            raise ValueError(f"INFERENCE_MODEL_NAME={settings.model_name!r} must be 1 to 128 letters, digits, "
                             "'_', '.' or '-' (starting with a letter or digit): it is a segment of the URL path")
        return settings


class Service:
    """The model slot, its pointer watcher, the request recorder and the metrics emitter."""

    def __init__(self, runtime: Runtime, settings: Settings | None = None):
        self.runtime = runtime
        runtime.keep = KEEP
        self.settings = settings = settings or Settings.from_env()
        self.limits = api.Limits(settings.max_rows, settings.max_body_bytes)
        self.key_hashes = api.parse_key_hashes(settings.api_key_hashes)
        if runtime.cloud not in runtime.fleet.clouds:
            raise RuntimeError(f"SKYFUSE_CLOUD={runtime.cloud!r} is not under [clouds] of the fleet config; "
                               f"configured: {', '.join(runtime.fleet.clouds)}")
        store = runtime.store()
        self.slot = ModelSlot(source=store.uri_for(settings.pointer_key))
        self.recorder = LatencyRecorder()
        self.metrics = prometheus.Metrics()
        self.first = tracing.FirstPrediction(runtime.fleet, runtime.cloud)  # closes the run's trace
        self.watcher = PointerWatcher(self.slot, store, settings.pointer_key, settings.poll_s, settings.threads,
                                      settings.retry_failed_s, on_swap=self._swapped,
                                      on_fail=lambda version, error: self.metrics.load_failed())
        self.watcher.check_once()  # the current model, if there is one, before the first answer
        self.watcher.start()
        self.emitter: MetricsEmitter | None = None
        if settings.metrics_s > 0:
            self.emitter = MetricsEmitter(self.recorder, self._publish, self._describe, settings.metrics_s)
            self.emitter.start()

    def _swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        self.metrics.swapped(new, old)
        self.first.arm(new.version, new.traceparent)

    def _served(self, started_ns: int, status: int) -> None:
        model = self.slot.model
        self.first.served(model.version if model else None, started_ns, status)

    def _describe(self) -> dict[str, Any]:
        cloud = self.runtime.fleet.clouds[self.runtime.cloud]
        model = self.slot.model
        return {"cloud": self.runtime.cloud, "price_per_hour": cloud.price_per_hour,
                "price_per_million_requests": cloud.price_per_million_requests,
                "model_version": model.version if model else None}

    def _publish(self, data: MetricsSampled) -> None:
        self.runtime.emit("metrics.sampled", data)

    def predict(self, body: bytes | str, content_type: str | None = None) -> api.Result:
        started, started_ns = time.perf_counter(), time.time_ns()
        if not api.is_json(content_type):
            status, out = api.unsupported_media_type(content_type or "")
        else:
            status, out = api.predict(body, self.slot, self.limits)
        self.recorder.record(time.perf_counter() - started, status >= 500)
        self._served(started_ns, status)
        return status, out

    def infer(self, params: dict[str, str], header: api.Header, body: bytes | str) -> oip.Answer:
        started, started_ns = time.perf_counter(), time.time_ns()
        answer = oip.infer(body, self.slot, self.settings.model_name, params["name"], params.get("version"),
                           self.limits, header(oip.HEADER_LENGTH.lower()), header("content-type"))
        self.recorder.record(time.perf_counter() - started, answer[0] >= 500)
        self._served(started_ns, answer[0])
        return answer

    def close(self) -> None:
        self.watcher.stop()
        if self.emitter:
            self.emitter.stop()


_lock = threading.Lock()
_service: Service | None = None
_pid: int | None = None


def service() -> Service:
    """This process's service (created on first use, and again in a forked child)."""
    global _service, _pid
    svc = _service
    if svc is not None:  # a forked child starts with None (_forget_after_fork): no getpid per call
        return svc
    with _lock:
        if _service is None or _pid != os.getpid():
            _service, _pid = Service(current(FUNCTION)), os.getpid()
            atexit.register(_at_exit, os.getpid())
        return _service


def _forget_after_fork() -> None:
    """In a forked child (gunicorn's workers): the parent's service, whose threads did not come
    along, is not this process's; the next `service()` makes its own."""
    global _service, _pid, _lock
    _service, _pid, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _at_exit(pid: int) -> None:
    """Stop the threads and free the onnxruntime sessions before the interpreter tears down (a
    session alive at teardown can abort the process, e.g. a gunicorn worker on SIGTERM)."""
    if _service is not None and _pid == pid == os.getpid():
        _service.close()
        _service.slot.model = None


def reset() -> None:
    """Stop and forget this process's service (tests)."""
    global _service, _pid
    with _lock:
        if _service is not None and _pid == os.getpid():
            _service.close()
        _service, _pid = None, None


def authorize(header: api.Header) -> api.Result | None:
    """None when the request may go on, else the 401 to answer; `header(name)` reads a request
    header (any case)."""
    return api.authorize(service().key_hashes, header)


def max_body_bytes() -> int:
    return service().limits.max_body_bytes


def v2(endpoint: str, params: dict[str, str], header: api.Header, body: bytes | str = b"") -> oip.Answer:
    """An Open Inference Protocol route (`oip.ROUTES` names the endpoints) → (status, body, headers).
    Model metadata and infer take the API keys; health and readiness stay open, like /health.
    `params` are the path's: each of the model routes has a `name`."""
    svc = service()
    version = params.get("version")
    if endpoint in ("model", "infer"):
        denied = authorize(header)
        if denied:
            return *oip.from_api(denied), {}
    if endpoint == "infer":
        return svc.infer(params, header, body)
    if endpoint == "model":
        return *oip.model_metadata(svc.slot, svc.settings.model_name, params["name"], version), {}
    if endpoint == "model_ready":
        return *oip.model_ready(svc.slot, svc.settings.model_name, params["name"], version), {}
    if endpoint == "ready":
        return *oip.ready(svc.slot), {}
    return *(oip.live() if endpoint == "live" else oip.server()), {}


def metrics() -> tuple[int, bytes, str]:
    """GET /metrics: (status, Prometheus text, its content type). Open, like /health."""
    return 200, *service().metrics.exposition()


def _metrics_view(header: api.Header, body: bytes | str) -> oip.Answer:
    status, text, content_type = metrics()
    return status, text, {"Content-Type": content_type}


# route name (`routes.ROUTES`) -> view(header, body) -> (status, body[, headers])
VIEWS: dict[str, Callable[[api.Header, bytes | str], Reply]] = {
    "predict": lambda header, body: predict(body, header("content-type")),
    "health": lambda header, body: health(),
    "metadata": lambda header, body: metadata(),
    "openapi": lambda header, body: openapi(),
    "metrics": _metrics_view,
}
if set(VIEWS) != {route.name for route in routes.ROUTES}:
    raise RuntimeError(f"handler views {sorted(VIEWS)} differ from the routes of skyfuse.serving.routes")


def answer(route: routes.Route, header: api.Header, body: bytes | str = b"") -> Reply:
    """(status, body[, headers]) of one of the service's own routes: its API key checked when the
    table says so, then its view. `header(name)` reads a request header (any case); `body` is read
    by the entry point (for POST routes only)."""
    if route.auth:
        denied = authorize(header)
        if denied:
            return denied
    return VIEWS[route.name](header, body)


_STATIC = set(routes.BY_PATH)
_V2_PATH = re.compile(r"^(/api)?/v2(/|$)", re.IGNORECASE)  # /api: the Azure Functions host's route prefix


def route_of(path: str, prefix: str = "") -> str:
    """The route template a request path is counted under ("unmatched" for any other path)."""
    path = path[len(prefix):] if prefix and path.lower().startswith(prefix) else path
    path = (path.rstrip("/") or "/").lower()  # Azure matches routes case-insensitively
    if path in _STATIC:
        return path
    matched = oip.match(path) if path.startswith("/v2") else None
    return matched[1] if matched else "unmatched"


def track(path: str, prefix: str = "") -> prometheus.Tracker:
    """`with track(path) as t: ...; t.status = status` around one request: counted, timed, in flight."""
    return service().metrics.track(route_of(path, prefix))


def _shaped(path: str, result: api.Result) -> api.Result:
    """An error answer in the shape of the route's protocol (v2 routes: {"error"} only)."""
    return oip.from_api(result) if _V2_PATH.match(path) else result


def predict(body: bytes | str, content_type: str | None = None) -> api.Result:
    return service().predict(body, content_type)


def too_large(size: int | None, path: str = "") -> api.Result:
    """413 for a body the entry point refused before reading all of it (counted as a request)."""
    svc = service()
    svc.recorder.record(0.0)
    return _shaped(path, api.too_large(size, svc.limits.max_body_bytes))


def health() -> api.Result:
    return api.health(service().slot)


def metadata() -> api.Result:
    svc = service()
    return api.metadata(svc.slot, svc.limits, svc.settings.model_name)


def openapi(server_url: str | None = None) -> api.Result:
    svc = service()
    return api.openapi(server_url, svc.limits, svc.settings.model_name)


_ROUTE_LIST = ", ".join(f"{route.method} {route.path}" for route in routes.ROUTES)


def not_found(method: str, path: str) -> api.Result:
    listed = f"{_ROUTE_LIST}, and the Open Inference Protocol v2 routes under /v2 (see GET /openapi.json)"
    return _shaped(path, api.error(404, f"no route {method} {path}; routes: {listed}", "not_found", method=method,
                                   path=path))


def method_not_allowed(method: str, path: str, allowed: str) -> api.Result:
    return _shaped(path, api.error(405, f"{path} does not take {method}; use {allowed}", "method_not_allowed",
                                   method=method, path=path, allowed=allowed))
