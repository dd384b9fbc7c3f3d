"""Azure Functions entry point of inference: a v2 `FunctionApp` with one HTTP trigger per route.

Function auth level (a function key in `x-functions-key` or `?code=` before the request reaches the
code; skyfuse's own API keys, `INFERENCE_API_KEY_HASHES`, come on top); under the Functions host the
routes get its `api/` prefix:

    its own routes (`skyfuse.serving.routes.ROUTES`): POST /api/predict, GET /api/health, GET /api/metadata,
    GET /api/openapi.json, GET /api/metrics; the Open Inference Protocol v2 routes (`skyfuse.serving.oip.ROUTES`):
    GET /api/v2, /api/v2/health/{live,ready}, /api/v2/models/{name}[/versions/{version}][/ready];
    POST /api/v2/models/{name}[/versions/{version}]/infer

The v2 routes stay under the prefix like the others (the Functions host serves nothing outside it
unless host.json sets `routePrefix` to ""): an Open Inference Protocol client takes the base path
with the address, e.g. `tritonclient.http.InferenceServerClient("host:port/api")`.

Served locally by `services.inference.azure_host` (an ASGI adapter under uvicorn that calls these
functions with real `azure.functions.HttpRequest` objects).
"""
from collections.abc import Callable

import azure.functions as func

from services.inference import handler
from skyfuse.serving import oip, routes

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
_JSON = "application/json"


def _answer(result: handler.Reply) -> func.HttpResponse:
    """(status, body[, headers]) as an HttpResponse; JSON (its mimetype) unless the headers say otherwise."""
    status, body, *rest = result
    headers = rest[0] if rest else None
    content_type = headers.get("Content-Type", _JSON) if headers else _JSON
    return func.HttpResponse(body=body, status_code=status, headers=headers, charset="utf-8",
                             mimetype=content_type.split(";")[0])


def _function(route: routes.Route) -> Callable[[func.HttpRequest], func.HttpResponse]:
    def function(req: func.HttpRequest) -> func.HttpResponse:
        return _answer(handler.answer(route, req.headers.get, req.get_body() if route.method == "POST" else b""))
    return function


for _route in routes.ROUTES:  # function names: the routes' names (predict, health, ...)
    app.function_name(name=_route.name)(app.route(route=_route.path.lstrip("/"), methods=[_route.method])(
        _function(_route)))


def _v2_function(endpoint: str) -> Callable[[func.HttpRequest], func.HttpResponse]:
    def v2(req: func.HttpRequest) -> func.HttpResponse:
        return _answer(handler.v2(endpoint, dict(req.route_params), req.headers.get, req.get_body()))
    return v2


for _method, _template, _endpoint in oip.ROUTES:  # one function per route: a Functions route has one template
    _name = "v2" + _template[3:].replace("/", "_").replace("{", "").replace("}", "")
    app.function_name(name=_name)(app.route(route=_template.lstrip("/"), methods=[_method])(_v2_function(_endpoint)))
