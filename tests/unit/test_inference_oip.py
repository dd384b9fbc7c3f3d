"""The Open Inference Protocol v2 core (skyfuse.serving.oip): tensors in every datatype and layout,
the binary tensor data extension both ways, and every bad request answered {"error": ...} naming
what is wrong."""
import numpy as np
import orjson
import pytest

from skyfuse.serving import api, oip, testing
from skyfuse.serving.model import ModelSlot

ROWS = np.random.default_rng(5).normal(size=(6, 4)).astype(np.float32) * 2


def infer(slot, doc, name="skyfuse", version=None, limits=api.DEFAULT_LIMITS, **kw):
    body = doc if isinstance(doc, (bytes, str)) else orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    status, out, headers = oip.infer(body, slot, "skyfuse", name, version, limits, **kw)
    return status, out, headers


def tensor(data, shape=(6, 4), datatype="FP32", name="features", **extra):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data, **extra}]}


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
def test_infer_equals_onnxruntime(slot, model_bytes, datatype, layout):
    X = ROWS if datatype.startswith("FP") else np.round(ROWS).astype(np.int64)
    data = X.ravel().tolist() if layout == "flat" else X.tolist()
    status, out, headers = infer(slot, {"id": "req-1", **tensor(data, datatype=datatype)})
    assert status == 200 and headers == {}
    doc = orjson.loads(out)
    assert doc["model_name"] == "skyfuse" and doc["model_version"] == "v1" and doc["id"] == "req-1"
    (output,) = doc["outputs"]
    assert output["name"] == "prob" and output["datatype"] == "FP32" and output["shape"] == [6, 3]
    expected = testing.reference(model_bytes, X.astype(np.float32))
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(6, 3), expected, rtol=1e-6, atol=1e-7)


def test_infer_matches_predict_and_makes_an_id(slot):
    _, out, _ = infer(slot, tensor(ROWS.ravel()))
    doc = orjson.loads(out)
    assert len(doc["id"]) == 32  # none given: one is made, so answers can be told apart in logs
    _, predicted = api.predict(orjson.dumps({"instances": ROWS, "format": "compact"},
                                            option=orjson.OPT_SERIALIZE_NUMPY), slot)
    assert np.array(doc["outputs"][0]["data"]).reshape(6, 3).tolist() == orjson.loads(predicted)["probabilities"]


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
def test_binary_tensor_data_both_ways(slot, model_bytes, datatype):
    X = ROWS if datatype.startswith("FP") else np.round(ROWS)
    raw = X.astype(oip.DATATYPES[datatype]).tobytes()
    head = orjson.dumps({"inputs": [{"name": "features", "shape": [6, 4], "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}})
    status, out, headers = infer(slot, head + raw, header_length=str(len(head)),
                                 content_type="application/octet-stream")
    assert status == 200, out
    n = int(headers[oip.HEADER_LENGTH])
    doc = orjson.loads(out[:n])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 6 * 3 * 4} and "data" not in doc["outputs"][0]
    got = np.frombuffer(out[n:], dtype="<f4").reshape(6, 3)
    np.testing.assert_allclose(got, testing.reference(model_bytes, X.astype(np.float32)), rtol=1e-6, atol=1e-7)


def test_requested_output_decides_binary(slot):
    doc = {**tensor(ROWS.ravel()), "outputs": [{"name": "prob", "parameters": {"binary_data": False}}],
           "parameters": {"binary_data_output": True}}
    status, out, headers = infer(slot, doc)
    assert status == 200 and headers == {} and "data" in orjson.loads(out)["outputs"][0]


R = ROWS.ravel().tolist()
BAD = [
    ("not-json", b"{inputs", 400, ["not valid JSON"]),
    ("not-object", b"[1]", 400, ["JSON object", "got array"]),
    ("unexpected-key", {"inputs": [], "instances": 1}, 400, ["'instances'", "allowed"]),
    ("no-inputs", {"id": "x"}, 400, ['"inputs"', "'features' (FP32 [rows, 4])", "got null"]),
    ("two-inputs", {"inputs": [tensor(R)["inputs"][0]] * 2}, 400, ["one input", "got 2 inputs"]),
    ("wrong-name", tensor(R, name="x"), 400, ['unknown input "x"', "'features'"]),
    ("bad-datatype", tensor(R, datatype="BYTES"), 400, ['"BYTES"', "FP32, FP64, INT32, INT64"]),
    ("bad-shape", tensor(R, shape=(24,)), 400, ['"shape" must be [rows, 4]']),
    ("wrong-width", tensor(R, shape=(8, 3)), 400, ["takes 4 values a row", "sepal_length"]),
    ("zero-rows", tensor([], shape=(0, 4)), 400, ["at least one row"]),
    ("too-many-rows", tensor([0.0] * 4004, shape=(1001, 4)), 400, ["1001 > max_rows 1000"]),
    ("count-mismatch", tensor(R[:-1]), 400, ["has 23 values", "needs 24"]),
    ("ragged-rows", tensor([[1, 2, 3, 4], [1, 2, 3]], shape=(2, 4)), 400, ["row 1", "3 values, expected 4"]),
    ("string-value", tensor([1, 2, "3", 4], shape=(1, 4)), 400, ["value 2 (row 0, column 2)", "got string"]),
    ("bool-value", tensor([1, True, 3, 4], shape=(1, 4)), 400, ["value 1", "boolean"]),
    ("float-in-int", tensor([1, 2.5, 3, 4], shape=(1, 4), datatype="INT32"), 400, ["not an integer (INT32)"]),
    ("int32-overflow", tensor([1, 2, 3, 2**31], shape=(1, 4), datatype="INT32"), 400, ["does not fit INT32"]),
    ("float32-overflow", tensor([1, 2, 3, 1e39], shape=(1, 4)), 400, ["row 0, column 3", "float32 range"]),
    ("id-not-string", {"id": 7, **tensor(R)}, 400, ['"id" must be a string']),
    ("unknown-output", {**tensor(R), "outputs": [{"name": "logits"}]}, 400, ['"logits"', "one output, 'prob'"]),
    ("bad-binary-flag", {**tensor(R), "parameters": {"binary_data_output": "yes"}}, 400, ["true or false"]),
    ("data-and-binary", tensor(R, parameters={"binary_data_size": 96}), 400, ["both"]),
    ("binary-without-header", {"inputs": [{"name": "features", "shape": [6, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 96}}]}, 400,
     ["binary_data_size is 96", "0 bytes follow", "Inference-Header-Content-Length"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_infer_request_is_named(slot, case):
    _, doc, status, words = case
    got, out, _ = infer(slot, doc)
    body = orjson.loads(out)
    assert got == status and set(body) == {"error"}, body  # the protocol's error shape, nothing else
    for word in words:
        assert word in body["error"], (word, body["error"])


def test_binary_header_is_checked(slot):
    status, out, _ = infer(slot, b'{"inputs": []}', header_length="999")
    assert status == 400 and "Inference-Header-Content-Length is '999'" in orjson.loads(out)["error"]
    status, out, _ = infer(slot, b'{"inputs": []}xx', header_length=None)
    assert status == 400 and "Inference-Header-Content-Length header" in orjson.loads(out)["error"]


def test_unknown_model_version_limits_media_type(slot):
    status, out, _ = infer(slot, tensor(R), name="resnet")
    assert status == 404 and orjson.loads(out)["error"].startswith("unknown model 'resnet'")
    status, out, _ = infer(slot, tensor(R), version="v0")
    assert status == 404 and "the served version is 'v1'" in orjson.loads(out)["error"]
    assert infer(slot, tensor(R), version="v1")[0] == 200
    status, out, _ = infer(slot, tensor(R), limits=api.Limits(max_body_bytes=50))
    assert status == 413 and set(orjson.loads(out)) == {"error"}
    status, out, _ = infer(slot, tensor(R), content_type="text/csv")
    assert status == 415 and "application/json" in orjson.loads(out)["error"]


def test_health_metadata_and_ready(slot):
    assert oip.live() == (200, b'{"live":true}') and oip.ready(slot) == (200, b'{"ready":true}')
    status, out = oip.model_metadata(slot, "skyfuse", "skyfuse")
    assert status == 200 and orjson.loads(out) == {
        "name": "skyfuse", "versions": ["v1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "prob", "datatype": "FP32", "shape": [-1, 3]}]}
    assert oip.model_ready(slot, "skyfuse", "skyfuse", "v1")[0] == 200
    assert oip.model_ready(slot, "skyfuse", "other")[0] == 404
    server = orjson.loads(oip.server()[1])
    assert server["name"] == "skyfuse" and server["extensions"] == ["binary_tensor_data"]
    empty = ModelSlot("file:///store/serving/current.json")
    assert oip.ready(empty) == (503, b'{"ready":false}')
    status, out = oip.model_ready(empty, "skyfuse", "skyfuse")
    assert status == 503 and "no model is loaded yet" in orjson.loads(out)["error"]


def test_routes_match_their_templates():
    assert oip.match("/v2/models/iris.v1/versions/7/infer") == (
        "POST", "/v2/models/{name}/versions/{version}/infer", "infer", {"name": "iris.v1", "version": "7"})
    assert oip.match("/v2/models/ready/ready")[2] == "model_ready"
    assert oip.match("/v2/models/a/b/c") is None and oip.match("/v2/repository/index") is None


def test_binary_values_beyond_float32_are_named(slot):
    X = ROWS.astype(np.float64)
    X[2, 1] = np.nan
    raw = X.tobytes()
    head = orjson.dumps({"inputs": [{"name": "features", "shape": [6, 4], "datatype": "FP64",
                                     "parameters": {"binary_data_size": len(raw)}}]})
    status, out, _ = infer(slot, head + raw, header_length=str(len(head)))
    assert status == 400 and "row 2, column 1 is nan" in orjson.loads(out)["error"]
