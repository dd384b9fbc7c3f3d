"""Google Cloud entry point of inference: functions-framework, target `inference`, signature http.

One HTTP function serves every route (Cloud Run functions pass the path after the function's
URL). Served locally by functions-framework's own production server (gunicorn, gthread workers;
`WORKERS` and `THREADS` from the environment):

    functions-framework --target inference --source services/inference/gcp.py --host 127.0.0.1 --port 8082

    POST /predict   GET /health   GET /metadata   GET /openapi.json
"""
import functions_framework

from services.inference import handler

_JSON = {"Content-Type": "application/json"}
_ROUTES = {
    "/health": ("GET", lambda request: handler.health()),
    "/metadata": ("GET", lambda request: handler.authorize(request.headers.get) or handler.metadata()),
    "/openapi.json": ("GET", lambda request: handler.openapi()),
    "/predict": ("POST", lambda request: _predict(request)),
}


def _predict(request):
    denied = handler.authorize(request.headers.get)
    if denied:
        return denied
    limit = handler.max_body_bytes()
    if request.content_length is not None and request.content_length > limit:
        return handler.too_large(request.content_length)  # refused before reading the body
    body = _read_at_most(request.stream, limit)  # a chunked body has no length: count while reading
    if body is None:
        return handler.too_large(None)
    return handler.predict(body, request.content_type)


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


@functions_framework.http
def inference(request):
    path = request.path.rstrip("/") or "/"
    route = _ROUTES.get(path)
    if route is None:
        status, body = handler.not_found(request.method, path)
    elif request.method != route[0]:
        status, body = handler.method_not_allowed(request.method, path, route[0])
    else:
        status, body = route[1](request)
    return body, status, _JSON
