"""The inference API core (skyfuse.serving.api): every bad request gets its 4xx naming the problem,
503 before a model, and predictions equal to onnxruntime run on the same model."""
import json

import numpy as np
import orjson
import pytest

from skyfuse.serving import api, testing
from skyfuse.serving.model import ModelSlot

ROW = [5.1, 3.5, 1.4, 0.2]

# (id, body, status, detail code, words the message must contain). Shared with the host tests.
BAD_CASES = [
    ("empty-body", b"", 400, "invalid_json", ["not valid JSON"]),
    ("not-json", b"{instances: 1}", 400, "invalid_json", ["not valid JSON"]),
    ("not-utf8", b"\xff\xfe{}", 400, "invalid_json", ["not valid JSON", "UTF-8"]),
    ("array-body", b"[[1, 2, 3, 4]]", 400, "not_object", ["JSON object", "got array"]),
    ("string-body", b'"hello"', 400, "not_object", ["JSON object", "got string"]),
    ("missing-instances", b"{}", 400, "missing_key", ['"instances"']),
    ("only-format", b'{"format": "compact"}', 400, "missing_key", ['"instances"']),
    ("extra-key", b'{"instances": [[1, 2, 3, 4]], "inputs": 1}', 400, "unexpected_keys", ['"inputs"', "allowed"]),
    ("wrong-key", b'{"rows": [[1, 2, 3, 4]]}', 400, "unexpected_keys", ['"rows"']),
    ("instances-null", b'{"instances": null}', 400, "bad_instances", ["non-empty array", "got null"]),
    ("instances-object", b'{"instances": {"a": 1}}', 400, "bad_instances", ["got object"]),
    ("instances-empty", b'{"instances": []}', 400, "empty_instances", ["empty"]),
    ("too-many-rows", orjson.dumps({"instances": [ROW] * 1001}), 400, "too_many_rows", ["1001", "max_rows 1000"]),
    ("row-not-array", b'{"instances": [[1, 2, 3, 4], 7]}', 400, "bad_row", ["row 1", "got number"]),
    ("row-too-short", b'{"instances": [[1, 2, 3, 4], [1, 2, 3]]}', 400, "row_width",
     ["row 1", "3 values", "expected 4", "sepal_length"]),
    ("row-too-long", b'{"instances": [[1, 2, 3, 4, 5]]}', 400, "row_width", ["row 0", "5 values", "expected 4"]),
    ("string-value", b'{"instances": [[1, 2, "3", 4]]}', 400, "not_a_number", ["row 0, column 2", "string"]),
    ("bool-value", b'{"instances": [[1, true, 3, 4]]}', 400, "not_a_number", ["row 0, column 1", "boolean"]),
    ("null-value", b'{"instances": [[1, 2, 3, 4], [1, null, 3, 4]]}', 400, "not_a_number",
     ["row 1, column 1", "null"]),
    ("nested-value", b'{"instances": [[1, 2, [3], 4]]}', 400, "not_a_number", ["row 0, column 2", "array"]),
    ("nan", b'{"instances": [[1, 2, 3, 4], [1, 2, NaN, 4]]}', 400, "non_finite", ["row 1, column 2", "NaN"]),
    ("infinity", b'{"instances": [[Infinity, 2, 3, 4]]}', 400, "non_finite", ["row 0, column 0", "Infinity"]),
    ("minus-infinity", b'{"instances": [[1, 2, 3, -Infinity]]}', 400, "non_finite", ["row 0, column 3", "-Infinity"]),
    ("double-overflow", b'{"instances": [[1, 2, 3, 1e999]]}', 400, "non_finite", ["row 0, column 3", "overflows"]),
    ("float32-overflow", b'{"instances": [[1, 2, 3, 1e39]]}', 400, "non_finite", ["row 0, column 3", "float32"]),
    ("bad-format", b'{"instances": [[1, 2, 3, 4]], "format": "csv"}', 400, "bad_format", ['"format"', '"csv"']),
    ("too-large", b'{"instances": [' + b"[1, 2, 3, 4]," * 100_000 + b"[1, 2, 3, 4]]}", 413, "body_too_large",
     ["limit is 1048576"]),
]


def answer(result):
    status, body = result
    return status, orjson.loads(body)


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_request_is_named(case, slot):
    _, body, status, code, words = case
    got_status, doc = answer(api.predict(body, slot))
    assert got_status == status, doc
    assert set(doc) == {"error", "detail"}
    assert doc["detail"]["code"] == code, doc
    for word in words:
        assert word in doc["error"], (word, doc["error"])


def test_bad_request_details_are_structured(slot):
    _, doc = answer(api.predict(b'{"instances": [[1, 2, 3, 4], [1, 2, 3]]}', slot))
    assert doc["detail"] == {"code": "row_width", "row": 1, "expected": 4, "got": 3}
    _, doc = answer(api.predict(b'{"instances": [[1, 2, "x", 4]]}', slot))
    assert doc["detail"] == {"code": "not_a_number", "row": 0, "column": 2, "got": "string"}


def test_limits_are_configurable(slot):
    limits = api.Limits(max_rows=2, max_body_bytes=100)
    status, doc = answer(api.predict(orjson.dumps({"instances": [ROW] * 3}), slot, limits))
    assert status == 400 and "max_rows 2" in doc["error"]
    status, doc = answer(api.predict(b" " * 101, slot, limits))
    assert status == 413 and doc["detail"]["max_body_bytes"] == 100
    status, _ = answer(api.predict(orjson.dumps({"instances": [ROW] * 2}), slot, limits))
    assert status == 200


def test_non_ascii_str_body_counts_bytes(slot):
    limits = api.Limits(max_body_bytes=100)
    status, _ = answer(api.predict("é" * 60, slot, limits))  # 60 characters, 120 bytes
    assert status == 413


def test_no_model_yet_is_503_with_a_clear_message():
    empty = ModelSlot("file:///store/serving/current.json")
    empty.pointer_seen = False
    status, doc = answer(api.predict(orjson.dumps({"instances": [ROW]}), empty))
    assert status == 503
    assert "no model is loaded yet" in doc["error"] and "file:///store/serving/current.json" in doc["error"]
    assert "does not exist yet" in doc["error"]
    assert doc["detail"]["code"] == "no_model"
    assert answer(api.health(empty))[0] == 503
    assert answer(api.metadata(empty))[0] == 503
    empty.fail("model v9 has sha256 abc, expected def", "v9")
    _, doc = answer(api.predict(orjson.dumps({"instances": [ROW]}), empty))
    assert "the last load failed: model v9" in doc["error"]


def test_predictions_equal_onnxruntime(slot, model_bytes):
    X = np.random.default_rng(7).normal(size=(50, 4)).astype(np.float32) * 3
    status, doc = answer(api.predict(orjson.dumps({"instances": X.tolist()}), slot))
    assert status == 200
    assert doc["model_version"] == "v1"
    expected = testing.reference(model_bytes, X)
    labels = list(testing.IRIS_CLASSES)
    got = np.array([[p["probabilities"][c] for c in labels] for p in doc["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert [p["class"] for p in doc["predictions"]] == [labels[i] for i in expected.argmax(axis=1)]
    assert all(list(p["probabilities"]) == labels for p in doc["predictions"])


def test_compact_format_equals_records(slot, model_bytes):
    X = np.random.default_rng(8).normal(size=(5, 4)).astype(np.float32)
    _, records = answer(api.predict(orjson.dumps({"instances": X.tolist()}), slot))
    status, compact = answer(api.predict(orjson.dumps({"instances": X.tolist(), "format": "compact"}), slot))
    assert status == 200
    assert compact["classes"] == list(testing.IRIS_CLASSES)
    assert compact["predictions"] == [p["class"] for p in records["predictions"]]
    assert compact["probabilities"] == [list(p["probabilities"].values()) for p in records["predictions"]]
    np.testing.assert_allclose(np.array(compact["probabilities"], dtype=np.float32),
                               testing.reference(model_bytes, X), rtol=1e-6, atol=1e-7)


def test_answers_are_tf_serving_shaped(slot):
    """TF-Serving's predict answers {"predictions": [one entry per instance, in order]}: both formats do,
    beside their own fields."""
    rows = [ROW, [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
    for fmt in ("records", "compact"):
        status, doc = answer(api.predict(orjson.dumps({"instances": rows, "format": fmt}), slot))
        assert status == 200 and isinstance(doc["predictions"], list) and len(doc["predictions"]) == len(rows)
    _, records = answer(api.predict(orjson.dumps({"instances": rows}), slot))
    _, compact = answer(api.predict(orjson.dumps({"instances": rows, "format": "compact"}), slot))
    assert [p["class"] for p in records["predictions"]] == compact["predictions"]


def test_ints_and_str_bodies_are_accepted(slot):
    status, doc = answer(api.predict('{"instances": [[5, 3, 1, 0]]}', slot))
    assert status == 200 and len(doc["predictions"]) == 1


def test_health_and_metadata(slot, model_bytes):
    status, health = answer(api.health(slot))
    assert status == 200
    assert health["status"] == "ok" and health["model_version"] == "v1" and health["last_error"] is None
    status, meta = answer(api.metadata(slot))
    assert status == 200
    assert meta["model_version"] == "v1" and meta["model_name"] == "skyfuse"
    assert meta["input"] == {"name": "features", "dtype": "float32", "width": 4,
                             "features": list(testing.IRIS_FEATURES)}
    assert meta["output"]["classes"] == list(testing.IRIS_CLASSES)
    assert meta["lineage"]["members"][0]["cloud"] == "aws"
    assert meta["limits"] == {"max_rows": 1000, "max_body_bytes": 1 << 20}


def test_openapi_document():
    status, body = api.openapi("https://example.test")
    doc = json.loads(body)
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/predict", "/health", "/metadata", "/openapi.json", "/metrics", "/v2",
                                 "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}",
                                 "/v2/models/{name}/versions/{version}/ready",
                                 "/v2/models/{name}/versions/{version}/infer"}
    name = doc["paths"]["/v2/models/{name}/infer"]["post"]["parameters"][0]
    assert name["schema"]["enum"] == ["skyfuse"]  # the fuzz sends the served name, then others
    assert set(doc["paths"]["/predict"]["post"]["responses"]) == {"200", "400", "401", "413", "415", "503"}
    assert doc["servers"] == [{"url": "https://example.test"}]
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/")}
    for ref in refs:  # every $ref resolves
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]


def _walk(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
    else:
        yield node


def test_api_keys_are_configured_as_digests_and_a_key_itself_is_refused():
    from skyfuse.serving.api import authorize, key_hash, parse_key_hashes

    hashes = parse_key_hashes(f" {key_hash('k-1')} ,{key_hash('k-2').upper()}")
    assert authorize(hashes, {"x-api-key": "k-2"}.get) is None
    assert authorize(hashes, {"authorization": "Bearer k-1"}.get) is None
    assert authorize(hashes, {}.get)[0] == 401 and authorize((), {}.get) is None
    with pytest.raises(ValueError, match="INFERENCE_API_KEY_HASHES: entry 1 is not a sha256 hex digest") as caught:
        parse_key_hashes("my-plain-key")
    assert "my-plain" not in str(caught.value)
