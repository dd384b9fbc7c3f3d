"""Google Cloud entry point of inference: functions-framework, target `inference`, signature http.

One HTTP function serves every route (Cloud Run functions pass the path after the function's
URL). Served locally by functions-framework's own production server (gunicorn, gthread workers;
`WORKERS` and `THREADS` from the environment):

    functions-framework --target inference --source services/inference/gcp.py --host 127.0.0.1 --port 8082

    POST /predict   GET /health   GET /metadata   GET /openapi.json   GET /metrics
    the Open Inference Protocol v2 routes: GET /v2, /v2/health/{live,ready},
    /v2/models/{name}[/versions/{version}][/ready]; POST /v2/models/{name}[/versions/{version}]/infer

functions-framework imports this file in gunicorn's parent process, before it forks the workers:
the place to give them one Prometheus metrics directory (`WORKERS` > 1), so that any worker's
/metrics counts the requests of all of them.
"""
import os

from skyfuse.serving import prometheus

prometheus.prepare_workers(int(os.environ.get("WORKERS") or 1))  # before anything imports prometheus_client

import flask  # noqa: E402
import functions_framework  # noqa: E402

from services.inference import handler  # noqa: E402
from skyfuse.serving import oip  # noqa: E402

_JSON = {"Content-Type": "application/json"}
_ROUTES = {
    "/health": ("GET", lambda request: handler.health()),
    "/metadata": ("GET", lambda request: handler.authorize(request.headers.get) or handler.metadata()),
    "/openapi.json": ("GET", lambda request: handler.openapi()),
    "/predict": ("POST", lambda request: _predict(request)),
    "/metrics": ("GET", lambda request: _metrics()),
}


def _metrics():
    status, text, content_type = handler.metrics()
    return status, text, {"Content-Type": content_type}


def _predict(request):
    denied = handler.authorize(request.headers.get)
    if denied:
        return denied
    body = _body(request)
    if isinstance(body, tuple):
        return body
    return handler.predict(body, request.content_type)


def _body(request) -> bytes | tuple:
    """The body, or the 413 for one over the limit (refused on its Content-Length before reading,
    or counted while reading a chunked one)."""
    limit = handler.max_body_bytes()
    if request.content_length is not None and request.content_length > limit:
        return handler.too_large(request.content_length, request.path)
    body = _read_at_most(request.stream, limit)
    return handler.too_large(None, request.path) if body is None else body


def _read_at_most(stream, limit: int, chunk: int = 65536) -> bytes | None:
    """The body, or None as soon as it passes `limit` bytes (the rest is never read)."""
    parts, size = [], 0
    while True:
        part = stream.read(min(chunk, limit + 1 - size))
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > limit:
            return None


def _route(request, path: str):
    """(status, body, headers) of one request."""
    route = _ROUTES.get(path)
    if route is None:
        matched = oip.match(path) if path.startswith("/v2") else None
        if matched is None:
            return *handler.not_found(request.method, path), {}
        method, _, endpoint, params = matched
        if request.method != method:
            return *handler.method_not_allowed(request.method, path, method), {}
        body = _body(request) if method == "POST" else b""
        if isinstance(body, tuple):
            return *body, {}
        return handler.v2(endpoint, params, request.headers.get, body)
    if request.method != route[0]:
        return *handler.method_not_allowed(request.method, path, route[0]), {}
    answer = route[1](request)
    return answer if len(answer) == 3 else (*answer, {})


@functions_framework.http
def inference(request):
    path = request.path.rstrip("/") or "/"
    with handler.track(path) as tracked:
        status, body, headers = _route(request, path)
        tracked.status = status
        tracked.received = request.content_length or 0  # a chunked body counts 0
        tracked.sent = len(body.encode() if isinstance(body, str) else body)
    return body, status, {**_JSON, **headers}


def _not_routed(_exc):
    """functions-framework's own 404 (an HTML page) for paths it keeps from `inference`: /robots.txt,
    /favicon.ico, and any path with a newline; answered like every other unknown path."""
    request = flask.request
    with handler.track(request.path) as tracked:
        status, body = handler.not_found(request.method, request.path)
        tracked.status = status
    return body, status, _JSON


if flask.has_app_context():  # functions-framework executes this module inside the app it is creating
    flask.current_app.register_error_handler(404, _not_routed)
