"""A local Azure Functions host for HTTP triggers: an ASGI app (run it under uvicorn) that turns each
request into an `azure.functions.HttpRequest`, calls the v2 `FunctionApp` function whose
`httpTrigger` route and methods match, and sends back its `HttpResponse`.

    uvicorn services.inference.azure_host:create_app --factory --host 127.0.0.1 --port 8083 \
        --loop uvloop --http httptools --ws none

Routes get the Functions host's default `api/` prefix and match case-insensitively, as there;
`{name}` segments of a route template become the request's `route_params`. Every request is
counted and timed for GET /api/metrics. The functions are called on the event loop (the inference
core takes tens of microseconds and never waits on I/O). Bodies over the inference size limit are
refused with 413 before they are read; a function that raises answers 500 with the exception named.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import azure.functions as func
from azure.functions.decorators.function_app import Function
from azure.functions.decorators.http import HttpTrigger

from services.inference import handler
from skyfuse.serving import api
from skyfuse.serving.asgi import Receive, Scope, Send, content_length, lifespan, read_body, send_response
from skyfuse.serving.prometheus import Tracker

ROUTE_PREFIX = "api"
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")
Target = tuple[Callable[..., Any], str]  # (the user function, the name of its HttpRequest argument)
Methods = dict[str, Target]  # METHOD → what answers it


@functools.cache  # get_functions() may run once per app: a second call fails its name check
def _functions(app: func.FunctionApp) -> tuple[Function, ...]:
    return tuple(app.get_functions())


def http_routes(app: func.FunctionApp, prefix: str = ROUTE_PREFIX) -> dict[str, Methods]:
    """'/api/<route>' (lower case) → {METHOD: (user function, name of its HttpRequest argument)}."""
    routes: dict[str, Methods] = {}
    for fn in _functions(app):
        found = fn.get_trigger()
        if found is None or found.get_binding_name() != "httpTrigger":
            continue
        trigger = cast(HttpTrigger, found)  # what app.route attaches
        route = (trigger.route or fn.get_function_name() or "").strip("/")  # get_functions() named every function
        path = f"/{prefix}/{route}".lower() if prefix else f"/{route}".lower()
        methods = [str(getattr(m, "value", m)).upper() for m in trigger.methods] if trigger.methods else ALL_METHODS
        for method in methods:
            routes.setdefault(path, {})[method] = (fn.get_user_function(), trigger.name)
    return routes


def _template(path: str) -> re.Pattern[str] | None:
    """A matcher for a route with `{param}` segments (constraints like `{id:int}` are not checked)."""
    if "{" not in path:
        return None
    return re.compile("^" + re.sub(r"\\\{(\w+)(?::[^}]*)?\\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$",
                      re.IGNORECASE)


class AzureFunctionsHost:
    def __init__(self, app: func.FunctionApp, prefix: str = ROUTE_PREFIX) -> None:
        self.routes = http_routes(app, prefix)
        self.prefix = f"/{prefix}" if prefix else ""
        self.templates = [(pattern, methods) for path, methods in self.routes.items()
                          if (pattern := _template(path)) is not None]

    def match(self, path: str) -> tuple[Methods | None, dict[str, str]]:
        """(the route's {METHOD: function}, route params) of a request path; (None, {}) for no route."""
        key = path.rstrip("/").lower()
        methods = self.routes.get(key)
        if methods is not None:
            return methods, {}
        for pattern, methods in self.templates:
            found = pattern.match(path.rstrip("/"))
            if found:
                return methods, found.groupdict()
        return None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, handler.service)
            return
        if scope["type"] != "http":
            return
        with handler.track(scope["path"], self.prefix) as tracked:
            await self._serve(scope, receive, send, tracked)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, tracked: Tracker) -> None:
        method, path = scope["method"], scope["path"]
        methods, route_params = self.match(path)
        if methods is None:
            await send_response(send, *handler.not_found(method, path), tracked=tracked)
            return
        target = methods.get(method)
        if target is None:
            await send_response(send, *handler.method_not_allowed(method, path, ", ".join(methods)), tracked=tracked)
            return
        limit = handler.max_body_bytes()
        declared = content_length(scope)
        body = None if declared is not None and declared > limit else await read_body(receive, limit, tracked)
        if body is None:
            await send_response(send, *handler.too_large(declared, path), tracked=tracked)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        host = headers.get("host") or ":".join(map(str, scope.get("server") or ("127.0.0.1", 80)))
        url = f"{scope.get('scheme', 'http')}://{host}{path}" + (f"?{query}" if query else "")
        request = func.HttpRequest(method=method, url=url, headers=headers,
                                   params=dict(parse_qsl(query)) if query else {}, route_params=route_params, body=body)
        function, arg_name = target
        try:
            response: func.HttpResponse = function(**{arg_name: request})
        except Exception as exc:  # noqa: BLE001 - the Functions host answers 500 too
            failed = api.error(500, f"function {function.__name__} raised {type(exc).__name__}: {exc}",
                               "function_error")
            await send_response(send, *failed, tracked=tracked)
            return
        out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
        if not any(k == b"content-type" for k, _ in out):
            out.append((b"content-type", response.mimetype.encode("latin-1")))
        await send_response(send, response.status_code, response.get_body(), out, tracked)


def create_app() -> AzureFunctionsHost:
    from services.inference.azure import app

    return AzureFunctionsHost(app)
