"""Google Cloud entry point of inference: functions-framework, target `inference`, signature http.

One HTTP function serves every route (Cloud Run functions pass the path after the function's
URL). It is an async function under functions-framework's ASGI mode (`functions_framework.aio`:
Starlette on gunicorn's uvicorn workers; `WORKERS` from the environment), which costs about a
third of the CPU per request of the Flask/gthread mode. The `aio` decorator selects that mode by
itself, locally and on Cloud Run, with or without `--asgi`:

    functions-framework --asgi --target inference --source services/inference/gcp.py --host 127.0.0.1 --port 8082

    its own routes (`skyfuse.serving.routes.ROUTES`): POST /predict, GET /health, GET /metadata,
    GET /openapi.json, GET /metrics; the Open Inference Protocol v2 routes (`skyfuse.serving.oip.ROUTES`):
    GET /v2, /v2/health/{live,ready}, /v2/models/{name}[/versions/{version}][/ready];
    POST /v2/models/{name}[/versions/{version}]/infer

functions-framework keeps GET /robots.txt, /favicon.ico and any path with a newline from the
function (its own plain-text 404). It imports this file in gunicorn's parent process, before it
forks the workers: the place to give them one Prometheus metrics directory (`WORKERS` > 1), so
that any worker's /metrics counts the requests of all of them. The handler's work is
microseconds of CPU with no I/O, so it runs on the event loop (no thread hand-off).
"""
import os

from skyfuse.serving import prometheus

prometheus.prepare_workers(int(os.environ.get("WORKERS") or 1))  # before anything imports prometheus_client

import functions_framework.aio  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from services.inference import handler  # noqa: E402
from skyfuse.serving import api, oip, routes  # noqa: E402
from skyfuse.serving.asgi import content_length, header_lookup, read_body  # noqa: E402
from skyfuse.serving.prometheus import Tracker  # noqa: E402

_JSON = "application/json"
_ROUTES = routes.BY_PATH  # path: the service's own route; the v2 routes are matched by oip.match


async def _body(request: Request, path: str, declared: int | None, tracked: Tracker) -> bytes | api.Result:
    """The body, or the 413 for one over the limit (refused on its Content-Length before reading,
    or counted while reading a chunked one: the rest is never read)."""
    limit = handler.max_body_bytes()
    if declared is not None and declared > limit:
        return handler.too_large(declared, path)
    body = await read_body(request.receive, limit, tracked)
    return handler.too_large(None, path) if body is None else body


async def _route(request: Request, path: str, tracked: Tracker) -> handler.Reply:
    """(status, body[, headers]) of one request."""
    method, scope = request.method, request.scope
    header = header_lookup(scope)
    route = _ROUTES.get(path)
    if route is None:
        matched = oip.match(path) if path.startswith("/v2") else None
        if matched is None:
            return handler.not_found(method, path)
        allowed, _, endpoint, params = matched
        if method != allowed:
            return handler.method_not_allowed(method, path, allowed)
        body = await _body(request, path, content_length(scope), tracked) if allowed == "POST" else b""
        return body if isinstance(body, tuple) else handler.v2(endpoint, params, header, body)
    if method != route.method:
        return handler.method_not_allowed(method, path, route.method)
    body = await _body(request, path, content_length(scope), tracked) if route.method == "POST" else b""
    return body if isinstance(body, tuple) else handler.answer(route, header, body)


@functions_framework.aio.http
async def inference(request: Request) -> Response:
    path = request.scope["path"].rstrip("/") or "/"
    with handler.track(path) as tracked:
        status, body, *headers = await _route(request, path, tracked)
        tracked.status, tracked.sent = status, len(body)
    return Response(body, status, headers[0] if headers else None, media_type=_JSON)
