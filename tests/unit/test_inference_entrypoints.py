"""The inference entry points called in-process the way each cloud calls them: the Lambda handler
with Function URL events, the functions-framework app, the Azure FunctionApp's HTTP functions.
And: nothing on the inference path imports TensorFlow."""
import base64
import json
import subprocess
import sys
from pathlib import Path

import azure.functions as func
import functions_framework
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from services.inference import handler
from skyfuse.runtime.clouds.aws import LambdaContext
from skyfuse.serving import testing
from tests.unit.conftest import inference_core

REPO = Path(__file__).resolve().parents[2]
ROW = [5.1, 3.5, 1.4, 0.2]
INFERENCE_MODULES = ["services.inference", "services.inference.handler", "services.inference.aws",
                     "services.inference.gcp", "services.inference.azure", "services.inference.azure_host",
                     "skyfuse.serving", "skyfuse.serving.model", "skyfuse.serving.api", "skyfuse.serving.metrics",
                     "skyfuse.serving.asgi", "skyfuse.dev.hosts", "skyfuse.serving.oip",
                     "skyfuse.serving.prometheus", "skyfuse.serving.routes", "skyfuse.serving.session"]
JSON_TYPE = {"Content-Type": "application/json"}
V2_INFER = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": ROW * 2}]}


@pytest.fixture(scope="module")
def model_bytes():
    return testing.classifier(seed=3)


@pytest.fixture
def served(tmp_path, monkeypatch, model_bytes):
    """The inference core of this process, serving `model_bytes` as v1 from a temporary store."""
    monkeypatch.setenv("INFERENCE_METRICS_S", "0")
    with inference_core(tmp_path, model_bytes) as service:
        yield service


def function_url_event(method, path, body=None, base64_body=False):
    """A Lambda Function URL request (payload format 2.0)."""
    if base64_body and body is not None:
        body = base64.b64encode(body).decode()
    elif isinstance(body, bytes):
        body = body.decode()
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "abc123.lambda-url.us-east-1.on.aws"},
        "requestContext": {
            "accountId": "anonymous", "apiId": "abc123", "domainName": "abc123.lambda-url.us-east-1.on.aws",
            "domainPrefix": "abc123", "requestId": "c1f0b1b6-0000-4000-8000-000000000000", "routeKey": "$default",
            "stage": "$default", "time": "14/Jan/2025:10:12:30 +0000", "timeEpoch": 1736849550000,
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                     "userAgent": "pytest"}},
        "body": body, "isBase64Encoded": base64_body,
    }


def test_lambda_function_url_predict(served, model_bytes):
    from services.inference.aws import lambda_handler

    body = json.dumps({"instances": [ROW]}).encode()
    response = lambda_handler(function_url_event("POST", "/predict", body), LambdaContext("skyfuse-inference"))
    assert response["statusCode"] == 200 and response["headers"]["Content-Type"] == "application/json"
    doc = json.loads(response["body"])
    assert doc["model_version"] == "v1"
    expected = testing.reference(model_bytes, np.array([ROW]))[0]
    got = [doc["predictions"][0]["probabilities"][c] for c in testing.IRIS_CLASSES]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_lambda_base64_body_and_errors(served):
    from services.inference.aws import lambda_handler

    ctx = LambdaContext("skyfuse-inference")
    ok = lambda_handler(function_url_event("POST", "/predict", json.dumps({"instances": [ROW]}).encode(),
                                           base64_body=True), ctx)
    assert ok["statusCode"] == 200
    bad = lambda_handler(function_url_event("POST", "/predict", b"\xff\xfe", base64_body=True), ctx)
    assert bad["statusCode"] == 400 and "not valid JSON" in json.loads(bad["body"])["error"]
    width = lambda_handler(function_url_event("POST", "/predict", b'{"instances": [[1, 2]]}'), ctx)
    assert width["statusCode"] == 400 and "expected 4" in json.loads(width["body"])["error"]
    missing = lambda_handler(function_url_event("GET", "/nowhere"), ctx)
    assert missing["statusCode"] == 404 and json.loads(missing["body"])["detail"]["code"] == "not_found"
    for path in ("/health", "/metadata", "/openapi.json", "/metrics", "/v2", "/v2/models/skyfuse"):
        assert lambda_handler(function_url_event("GET", path), ctx)["statusCode"] == 200


def test_lambda_reads_request_headers_in_any_case():
    """Function URL events name headers in lower case; a hand-made or proxied event may not."""
    from services.inference.aws import header_lookup

    header = header_lookup({"content-type": "application/json", "X-Api-Key": "k1", "AUTHORIZATION": "Bearer k2"})
    assert header("Content-Type") == "application/json"
    assert header("x-api-key") == "k1" and header("authorization") == "Bearer k2"
    assert header("x-missing") is None


def test_lambda_open_inference_protocol(served, model_bytes):
    from services.inference.aws import lambda_handler

    ctx = LambdaContext("skyfuse-inference")
    response = lambda_handler(function_url_event("POST", "/v2/models/skyfuse/versions/v1/infer",
                                                 json.dumps(V2_INFER).encode()), ctx)
    assert response["statusCode"] == 200, response
    output = json.loads(response["body"])["outputs"][0]
    expected = testing.reference(model_bytes, np.array([ROW, ROW]))
    np.testing.assert_allclose(np.reshape(output["data"], (2, 3)), expected, rtol=1e-6)
    # binary tensor data: the Lambda service hands a binary body over base64-encoded, and takes one back so
    raw = np.array([ROW], np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}],
                       "parameters": {"binary_data_output": True}}).encode()
    event = function_url_event("POST", "/v2/models/skyfuse/infer", head + raw, base64_body=True)
    event["headers"]["inference-header-content-length"] = str(len(head))
    response = lambda_handler(event, ctx)
    assert response["statusCode"] == 200 and response["isBase64Encoded"], response
    body = base64.b64decode(response["body"])
    n = int(response["headers"]["Inference-Header-Content-Length"])
    np.testing.assert_allclose(np.frombuffer(body[n:], "<f4"), expected[0], rtol=1e-6)
    missing = lambda_handler(function_url_event("GET", "/v2/models/nope/ready"), ctx)
    assert missing["statusCode"] == 404 and set(json.loads(missing["body"])) == {"error"}
    unknown = lambda_handler(function_url_event("GET", "/v2/repository/index"), ctx)
    assert unknown["statusCode"] == 404 and set(json.loads(unknown["body"])) == {"error"}  # v2 path: v2 shape


def test_functions_framework_app(served):
    saved = list(sys.path)  # create_app appends services/inference, whose azure.py would shadow `azure`
    try:
        app = functions_framework.create_app(target="inference", source=str(REPO / "services/inference/gcp.py"),
                                             signature_type="http")
    finally:
        sys.path[:] = saved
    assert isinstance(app, Starlette)  # the aio target selects functions-framework's ASGI mode
    client = TestClient(app)
    r = client.post("/predict", content=json.dumps({"instances": [ROW, ROW]}), headers=JSON_TYPE)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert r.headers["Content-Type"] == "application/json"
    assert client.post("/predict", content=b"[]", headers=JSON_TYPE).status_code == 400
    r = client.get("/predict")
    assert r.status_code == 405 and "use POST" in r.json()["error"]
    assert client.get("/nowhere").status_code == 404
    assert client.get("/health").json()["model_version"] == "v1"
    assert client.get("/metadata").json()["input"]["width"] == 4
    r = client.post("/predict", content=b"x" * (handler.max_body_bytes() + 1))
    assert r.status_code == 413
    r = client.post("/v2/models/skyfuse/infer", content=json.dumps(V2_INFER), headers=JSON_TYPE)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 3]
    r = client.get("/v2/models/skyfuse/infer")
    assert r.status_code == 405 and set(r.json()) == {"error"} and "use POST" in r.json()["error"]
    r = client.post("/v2/models/skyfuse/infer", content=b"x" * (handler.max_body_bytes() + 1))
    assert r.status_code == 413 and set(r.json()) == {"error"}
    assert client.get("/v2/health/live").json() == {"live": True}
    for path in ("/favicon.ico", "/v2/models/%0A/ready"):  # kept from the function by functions-framework
        assert client.get(path).status_code == 404, path
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert b'skyfuse_inference_requests_total{route="/v2/models/{name}/infer",status="405"} 1.0' in r.content


def test_the_gcp_entry_point_stops_reading_a_chunked_body_at_the_limit(served):
    """A 64 MiB upload without a Content-Length: 413 once the limit is passed, the rest never read."""
    import asyncio

    from services.inference import gcp

    chunks_read = 0

    async def receive():
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": chunks_read < 1024}

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-type", b"application/json")]}
    response = asyncio.run(gcp.inference(gcp.Request(scope, receive)))
    assert response.status_code == 413
    assert chunks_read == handler.max_body_bytes() // 65536 + 1  # 17 of the 1024 chunks


def test_azure_function_app(served):
    from services.inference import azure as entry
    from services.inference.azure_host import http_routes

    routes = http_routes(entry.app)
    assert {path: sorted(methods) for path, methods in routes.items()} == {
        "/api/predict": ["POST"], "/api/health": ["GET"], "/api/metadata": ["GET"], "/api/openapi.json": ["GET"],
        "/api/metrics": ["GET"], "/api/v2": ["GET"], "/api/v2/health/live": ["GET"], "/api/v2/health/ready": ["GET"],
        "/api/v2/models/{name}": ["GET"], "/api/v2/models/{name}/versions/{version}": ["GET"],
        "/api/v2/models/{name}/ready": ["GET"], "/api/v2/models/{name}/versions/{version}/ready": ["GET"],
        "/api/v2/models/{name}/infer": ["POST"], "/api/v2/models/{name}/versions/{version}/infer": ["POST"]}
    predict, _ = routes["/api/predict"]["POST"]
    request = func.HttpRequest("POST", "http://localhost/api/predict", body=json.dumps({"instances": [ROW]}).encode(),
                               headers={"content-type": "application/json"})
    response = predict(request)
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert json.loads(response.get_body())["model_version"] == "v1"
    bad = predict(func.HttpRequest("POST", "http://localhost/api/predict", body=b'{"instances": 1}'))
    assert bad.status_code == 400 and "non-empty array" in json.loads(bad.get_body())["error"]
    health = routes["/api/health"]["GET"][0](func.HttpRequest("GET", "http://localhost/api/health", body=b""))
    assert json.loads(health.get_body())["status"] == "ok"
    function, _ = routes["/api/v2/models/{name}/infer"]["POST"]
    response = function(func.HttpRequest("POST", "http://localhost/api/v2/models/skyfuse/infer",
                                         body=json.dumps(V2_INFER).encode(), route_params={"name": "skyfuse"}))
    assert response.status_code == 200 and json.loads(response.get_body())["model_name"] == "skyfuse"


def test_service_counts_requests_for_metrics(served):
    before = served.recorder.requests
    handler.predict(json.dumps({"instances": [ROW]}).encode())
    handler.predict(b"nope")
    assert served.recorder.requests == before + 2


def test_the_server_remembers_only_its_last_events(served):
    """A server runs for days: its runtime keeps the last `handler.KEEP` events it emitted."""
    from skyfuse import contracts
    from skyfuse.runtime import function

    assert served.runtime.keep == handler.KEEP < function.KEEP
    for _ in range(handler.KEEP + 5):
        served._publish(contracts.sample("metrics.sampled"))
    assert len(served.runtime.emitted) == handler.KEEP


def test_settings_from_env():
    s = handler.Settings.from_env({"INFERENCE_POLL_S": "0.1", "INFERENCE_MAX_ROWS": "5", "INFERENCE_THREADS": "2"})
    assert (s.poll_s, s.max_rows, s.threads, s.metrics_s) == (0.1, 5, 2, 30.0)
    with pytest.raises(ValueError, match="INFERENCE_MAX_ROWS='many' is not a valid int"):
        handler.Settings.from_env({"INFERENCE_MAX_ROWS": "many"})
    assert handler.Settings.from_env({}).model_name == "skyfuse"
    assert handler.Settings.from_env({"INFERENCE_MODEL_NAME": "iris-2.1"}).model_name == "iris-2.1"
    with pytest.raises(ValueError, match="INFERENCE_MODEL_NAME='iris/v2' must be"):
        handler.Settings.from_env({"INFERENCE_MODEL_NAME": "iris/v2"})


def test_route_templates_bound_the_metric_series():
    assert handler.route_of("/predict/") == "/predict"
    assert handler.route_of("/API/Predict", "/api") == "/predict"
    assert handler.route_of("/v2/models/anything/versions/7/ready") == "/v2/models/{name}/versions/{version}/ready"
    assert handler.route_of("/wp-admin/login.php") == handler.route_of("/v2/x") == "unmatched"


def test_no_tensorflow_on_the_inference_path(tmp_path, model_bytes):
    """Import every inference module and serve a prediction in a fresh interpreter: TensorFlow (and
    the onnx package) must never load."""
    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    script = f"""
import json, sys
for name in {INFERENCE_MODULES!r}:
    __import__(name)
from skyfuse.serving.model import LoadedModel, ModelSlot
from skyfuse.serving import api
slot = ModelSlot()
slot.swap(LoadedModel(open({str(model)!r}, "rb").read(), "v1"))
status, _ = api.predict(b'{{"instances": [[1, 2, 3, 4]]}}', slot)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx"))
print(json.dumps({{"status": status, "heavy": heavy, "ort": "onnxruntime" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "heavy": [], "ort": True}



