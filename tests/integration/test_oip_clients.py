"""A real Open Inference Protocol client, tritonclient's HTTP client, against each cloud's inference
host (skyfuse.dev.hosts): health, readiness, metadata and inference, in JSON and with the binary
tensor data extension, give what POST /predict gives; errors reach the client as the server's message.

The host runs with API keys and a configured model name (INFERENCE_MODEL_NAME): model metadata and
infer need the key, health and readiness do not. On Azure the routes are under /api, which
tritonclient takes as part of its url ("host:port/api")."""
from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from skyfuse.dev import hosts
from skyfuse.serving import testing
from skyfuse.serving.api import key_hash
from skyfuse.serving.model import publish
from skyfuse.storage import open_store
from tests.integration.test_inference_hosts import host_env

KEY = {"X-API-Key": "oip-key-789"}  # pass a copy: tritonclient adds its own headers to the dict it is given
NAME = "iris"
X = np.random.default_rng(17).normal(size=(9, 4)).astype(np.float32) * 2
MODEL = testing.classifier(seed=4)


@pytest.fixture(scope="module", params=hosts.PROVIDERS)
def host(request, tmp_path_factory):
    provider = request.param
    root = tmp_path_factory.mktemp(f"oip-{provider}")
    store_uri, env = host_env(provider, root, INFERENCE_METRICS_S="0", INFERENCE_MODEL_NAME=NAME,
                              INFERENCE_API_KEY_HASHES=key_hash(KEY["X-API-Key"]))
    publish(open_store(store_uri), "v1", MODEL)
    server = hosts.start(provider, env=env, log_dir=root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(host):
    c = triton.InferenceServerClient(host.url.removeprefix("http://"))  # keeps Azure's /api
    yield c
    c.close()


def predict(host, rows: np.ndarray, headers=KEY) -> tuple[int, dict]:
    parts = urlsplit(host.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", parts.path + "/predict", orjson.dumps({"instances": rows, "format": "compact"},
                                                               option=orjson.OPT_SERIALIZE_NUMPY),
                 headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    doc = orjson.loads(response.read())
    conn.close()
    return response.status, doc


def test_health_readiness_and_server_metadata_are_open(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "v1")
    assert not client.is_model_ready("skyfuse") and not client.is_model_ready(NAME, "v0")
    server = client.get_server_metadata()
    assert server["name"] == "skyfuse" and "binary_tensor_data" in server["extensions"]


def test_model_metadata(client):
    meta = client.get_model_metadata(NAME, headers=dict(KEY))
    assert meta == {"name": NAME, "versions": ["v1"], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
                    "outputs": [{"name": "prob", "datatype": "FP32", "shape": [-1, 3]}]}
    assert client.get_model_metadata(NAME, "v1", headers=dict(KEY)) == meta


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_gives_what_predict_gives(host, client, binary):
    status, predicted = predict(host, X)
    assert status == 200
    tensor = triton.InferInput("features", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    outputs = [triton.InferRequestedOutput("prob", binary_data=binary)]
    result = client.infer(NAME, [tensor], outputs=outputs, request_id="batch-1", headers=dict(KEY))
    got = result.as_numpy("prob")
    assert got.dtype == np.float32 and got.shape == (9, 3)
    np.testing.assert_allclose(got, np.array(predicted["probabilities"], np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, testing.reference(MODEL, X), rtol=1e-6, atol=1e-7)
    response = result.get_response()
    assert response["model_name"] == NAME and response["model_version"] == "v1" and response["id"] == "batch-1"


def test_infer_with_the_clients_defaults_and_other_datatypes(client):
    """tritonclient's defaults: binary input, all outputs as binary (binary_data_output)."""
    for datatype, values in (("FP64", X.astype(np.float64)), ("INT64", np.round(X).astype(np.int64))):
        tensor = triton.InferInput("features", list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        got = client.infer(NAME, [tensor], model_version="v1", headers=dict(KEY)).as_numpy("prob")
        np.testing.assert_allclose(got, testing.reference(MODEL, values.astype(np.float32)), rtol=1e-6, atol=1e-7)


def test_errors_reach_the_client_with_the_servers_message(client):
    tensor = triton.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(X[:1])
    with pytest.raises(InferenceServerException) as caught:
        client.infer("skyfuse", [tensor], headers=dict(KEY))
    assert caught.value.status() == "404"
    assert f"unknown model 'skyfuse': this server serves one model, '{NAME}'" in caught.value.message()
    wide = triton.InferInput("features", [1, 5], "FP32")
    wide.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match="takes 4 values a row") as caught:
        client.infer(NAME, [wide], headers=dict(KEY))
    assert caught.value.status() == "400"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}],
                         ids=["none", "wrong", "wrong-bearer"])
def test_infer_and_model_metadata_need_the_key(client, headers):
    tensor = triton.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(X[:1])
    for call in (lambda: client.infer(NAME, [tensor], headers=dict(headers)),
                 lambda: client.get_model_metadata(NAME, headers=dict(headers))):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "401" and "X-API-Key" in caught.value.message()
    bearer = {"Authorization": f"Bearer {KEY['X-API-Key']}"}
    assert client.infer(NAME, [tensor], headers=bearer).as_numpy("prob").shape == (1, 3)


def test_metadata_names_the_model(host):
    parts = urlsplit(host.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path + "/metadata", headers=dict(KEY))
    doc = orjson.loads(conn.getresponse().read())
    conn.close()
    assert doc["model_name"] == NAME and doc["model_version"] == "v1"
