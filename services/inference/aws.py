"""AWS entry point of inference: a Lambda behind a Function URL, routed by Powertools.

`lambda_handler(event, context)` takes Function URL events (payload format 2.0) through a
`LambdaFunctionUrlResolver`. The same routes are registered on Powertools' ASGI resolver
`HttpResolverLocal`, which `asgi` (below) serves locally under uvicorn:

    uvicorn services.inference.aws:asgi --host 127.0.0.1 --port 8081 --loop uvloop --http httptools --ws none

    its own routes (`skyfuse.serving.routes.ROUTES`): POST /predict, GET /health, GET /metadata,
    GET /openapi.json, GET /metrics; the Open Inference Protocol v2 routes (`skyfuse.serving.oip.ROUTES`):
    GET /v2, /v2/health/{live,ready}, /v2/models/<name>[/versions/<version>][/ready];
    POST /v2/models/<name>[/versions/<version>]/infer

`asgi` puts a small guard in front of the resolver: it refuses bodies over the size limit with
413 before reading them, hands on a body that is not UTF-8 (binary tensor data, or garbage)
base64-encoded and flagged so, as the Lambda service delivers one (`HttpResolverLocal` itself
cannot take it), and counts and times every request for GET /metrics. Every request goes through
Powertools' resolver, as in Lambda.
"""
from __future__ import annotations

import base64
import contextvars
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import HttpResolverLocal, LambdaFunctionUrlResolver, Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.utilities.data_classes.common import BaseProxyEvent
from aws_lambda_powertools.utilities.typing import LambdaContext

from services.inference import handler
from skyfuse.serving import api, oip, routes
from skyfuse.serving.asgi import (
    Receive,
    Scope,
    Send,
    content_length,
    lifespan,
    noting_status,
    read_body,
    replay,
    send_response,
)
from skyfuse.serving.prometheus import Tracker

logger = Logger(service="skyfuse-inference")
JSON = "application/json"
_BASE64_BODY = contextvars.ContextVar("skyfuse_base64_body", default=False)
Resolver = TypeVar("Resolver", bound=ApiGatewayResolver)
Answer = Response[str | bytes]  # text as str, binary tensor data as bytes


def _answer(result: handler.Reply) -> Answer:
    """(status, body[, headers]) as a Response; a body that is not text (binary tensor data) goes as
    bytes, which Powertools base64-encodes for Lambda."""
    status, body, *rest = result
    headers = dict(rest[0]) if rest else {}
    content_type = headers.pop("Content-Type", JSON)
    text = content_type.startswith(JSON) or content_type.startswith("text/")
    return Response(status_code=status, content_type=content_type, body=body.decode() if text else body,
                    headers=headers or None)


def header_lookup(headers: dict[str, str]) -> api.Header:
    """`header(name)` over an event's header map: Function URL events (and Powertools' local events)
    name headers in lower case, so a lower-case name is one dict read; any other casing is found by a
    scan. (`event.headers` would build a case-insensitive copy of the map at every read.)"""
    def header(name: str) -> str | None:
        wanted = name.lower()
        found = headers.get(wanted)
        if found is None:
            found = next((value for key, value in headers.items() if key.lower() == wanted), None)
        return found

    return header


def add_routes(app: Resolver) -> Resolver:
    """The inference routes on a Powertools resolver; each reads `app.current_event`."""

    def request() -> tuple[api.Header, bytes | str]:
        """(the request's header lookup, its body)"""
        event = app.current_event
        body = base64.b64decode(event.body or "") if event.is_base64_encoded else (event.body or "")
        return header_lookup(event.get("headers") or {}), body

    def route_view(route: routes.Route) -> Callable[[], Answer]:
        def view() -> Answer:
            header, body = request()
            return _answer(handler.answer(route, header, body if route.method == "POST" else b""))
        return view

    for route in routes.ROUTES:
        app.route(route.path, route.method)(route_view(route))

    def v2_view(endpoint: str, method: str) -> Callable[..., Answer]:
        def view(**params: str) -> Answer:
            header, body = request()
            return _answer(handler.v2(endpoint, params, header, body if method == "POST" else b""))
        return view

    for method, template, endpoint in oip.ROUTES:
        app.route(re.sub(r"\{(\w+)\}", r"<\1>", template), method)(v2_view(endpoint, method))

    @app.not_found
    def not_found(_exc: Exception) -> Answer:  # also a route's wrong method: Powertools has no 405
        event = app.current_event
        return _answer(handler.not_found(event.http_method, event.path))

    return app


class _LocalResolver(HttpResolverLocal):
    """`HttpResolverLocal` that takes a body the guard base64-encoded as a Lambda event does, and
    resolves the (sync) views as Lambda's `resolve()` does."""

    async def _resolve_async(self) -> dict[str, Any]:  # type: ignore[override]  # HttpResolverLocal's own
        # the async resolution rebuilds (and logs) each route's middleware chain at every request;
        # the sync one builds it once per route
        return self._build_response(self._resolve())

    def _to_proxy_event(self, event: dict[str, Any]) -> BaseProxyEvent:
        if _BASE64_BODY.get():  # set by LocalHost for this request's task only
            event = {**event, "isBase64Encoded": True}
        return super()._to_proxy_event(event)


app = add_routes(LambdaFunctionUrlResolver())
local_app = add_routes(_LocalResolver())

if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):  # in Lambda: load the model during the init phase
    handler.service()


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    with handler.track(event.get("rawPath") or "/") as tracked:
        response = app.resolve(event, context)
        tracked.status = response.get("statusCode", 200)
    return response


class LocalHost:
    """ASGI app: the body guard, then Powertools' `HttpResolverLocal`, as the function URL hands
    every request to the resolver in Lambda. Loads the model at startup."""

    def __init__(self, resolver: HttpResolverLocal) -> None:
        self.resolver = resolver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, handler.service)
            return
        if scope["type"] != "http":
            return
        with handler.track(scope["path"]) as tracked:
            await self._serve(scope, receive, send, tracked)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, tracked: Tracker) -> None:
        path, limit = scope["path"], handler.max_body_bytes()
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await send_response(send, *handler.too_large(declared, path), tracked=tracked)
            return
        body = await read_body(receive, limit, tracked)
        if body is None:
            await send_response(send, *handler.too_large(None, path), tracked=tracked)
            return
        if not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError:
                body = base64.b64encode(body)
                _BASE64_BODY.set(True)
        await self.resolver(scope, replay(body), noting_status(send, tracked))


asgi = LocalHost(local_app)
