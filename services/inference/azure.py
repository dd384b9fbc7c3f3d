"""Azure Functions entry point of inference: a v2 `FunctionApp` with one HTTP trigger per route.

Function auth level (a function key in `x-functions-key` or `?code=` before the request reaches the
code; skyfuse's own API keys, `INFERENCE_API_KEY_HASHES`, come on top); under the Functions host the
routes get its `api/` prefix:

    POST /api/predict   GET /api/health   GET /api/metadata   GET /api/openapi.json

Served locally by `services.inference.azure_host` (an ASGI adapter under uvicorn that calls these
functions with real `azure.functions.HttpRequest` objects).
"""
import azure.functions as func

from services.inference import handler

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _answer(result: tuple[int, bytes]) -> func.HttpResponse:
    status, body = result
    return func.HttpResponse(body=body, status_code=status, mimetype="application/json", charset="utf-8")


@app.route(route="predict", methods=[func.HttpMethod.POST])
def predict(req: func.HttpRequest) -> func.HttpResponse:
    denied = handler.authorize(req.headers.get)
    if denied:
        return _answer(denied)
    return _answer(handler.predict(req.get_body(), req.headers.get("Content-Type")))


@app.route(route="health", methods=[func.HttpMethod.GET])
def health(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(handler.health())


@app.route(route="metadata", methods=[func.HttpMethod.GET])
def metadata(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(handler.authorize(req.headers.get) or handler.metadata())


@app.route(route="openapi.json", methods=[func.HttpMethod.GET])
def openapi(req: func.HttpRequest) -> func.HttpResponse:
    return _answer(handler.openapi())
