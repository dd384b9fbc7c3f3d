"""AWS entry point of inference: a Lambda behind a Function URL, routed by Powertools.

`lambda_handler(event, context)` takes Function URL events (payload format 2.0) through a
`LambdaFunctionUrlResolver`. The same four routes are registered on Powertools' ASGI resolver
`HttpResolverLocal`, which `asgi` (below) serves locally under uvicorn:

    uvicorn services.inference.aws:asgi --host 127.0.0.1 --port 8081 --loop uvloop --http httptools

    POST /predict   GET /health   GET /metadata   GET /openapi.json

`asgi` puts a small guard in front of the resolver: it refuses bodies over the size limit with
413 before reading them, and answers bodies that are not UTF-8 (which the Lambda service would
deliver base64-encoded, and `HttpResolverLocal` cannot decode) with the core's own 400.
"""
from __future__ import annotations

import base64
import os

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import HttpResolverLocal, LambdaFunctionUrlResolver, Response
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver

from services.inference import handler
from skyfuse.serving.asgi import content_length, lifespan, read_body, replay, send_response

logger = Logger(service="skyfuse-inference")
JSON = "application/json"


def _answer(result: tuple[int, bytes]) -> Response:
    status, body = result
    return Response(status_code=status, content_type=JSON, body=body.decode())


def add_routes(app: ApiGatewayResolver) -> ApiGatewayResolver:
    """The inference routes on a Powertools resolver; each reads `app.current_event`."""

    def header(name: str) -> str | None:
        return next((v for k, v in (app.current_event.headers or {}).items() if k.lower() == name), None)

    @app.post("/predict")
    def predict() -> Response:
        denied = handler.authorize(header)
        if denied:
            return _answer(denied)
        event = app.current_event
        body = event.body or ""
        if event.is_base64_encoded:
            body = base64.b64decode(body)
        return _answer(handler.predict(body, header("content-type")))

    @app.get("/health")
    def health() -> Response:
        return _answer(handler.health())

    @app.get("/metadata")
    def metadata() -> Response:
        return _answer(handler.authorize(header) or handler.metadata())

    @app.get("/openapi.json")
    def openapi() -> Response:
        return _answer(handler.openapi())

    @app.not_found
    def not_found(_exc) -> Response:
        event = app.current_event
        return _answer(handler.not_found(event.http_method, event.path))

    return app


app = add_routes(LambdaFunctionUrlResolver())
local_app = add_routes(HttpResolverLocal())

if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):  # in Lambda: load the model during the init phase
    handler.service()


@logger.inject_lambda_context
def lambda_handler(event, context):
    return app.resolve(event, context)


class LocalHost:
    """ASGI app: the body guard, then Powertools' `HttpResolverLocal`. Loads the model at startup."""

    def __init__(self, resolver: HttpResolverLocal):
        self.resolver = resolver

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, handler.service)
            return
        if scope["type"] != "http":
            return
        limit = handler.max_body_bytes()
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await send_response(send, *handler.too_large(declared))
            return
        body = await read_body(receive, limit)
        if body is None:
            await send_response(send, *handler.too_large(None))
            return
        if not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError:
                if scope["method"] == "POST" and scope["path"] == "/predict":
                    await send_response(send, *handler.predict(body))  # the core's 400: not valid JSON
                    return
                body = b""
        await self.resolver(scope, replay(body), send)


asgi = LocalHost(local_app)
