"""Open Inference Protocol v2 (the KServe / Triton REST API) over the served model: bytes in,
(status, bytes[, headers]) out, independent of any HTTP framework.

    GET  /v2                                          {"name", "version", "extensions"}
    GET  /v2/health/live                              200 {"live": true}
    GET  /v2/health/ready                             200 {"ready": true}; 503 {"ready": false} before a model
    GET  /v2/models/{name}[/versions/{version}]       {"name", "versions", "platform", "inputs", "outputs"}
    GET  /v2/models/{name}[/versions/{version}]/ready 200 {"name", "ready": true}
    POST /v2/models/{name}[/versions/{version}]/infer

Infer takes one input, the model's own (`GET /v2/models/{name}` names it), shape [rows, width],
datatype FP32, FP64, INT32 or INT64 (served as float32), data flat or nested in row-major order:

    {"id": "42", "inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                             "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]}
    200 {"model_name": "skyfuse", "model_version": "v1", "id": "42",
         "outputs": [{"name": "prob", "shape": [2, 3], "datatype": "FP32", "data": [...]}]}

The binary tensor data extension (Triton's, what tritonclient sends by default) is supported both
ways: `Inference-Header-Content-Length` says how much of the body is JSON; an input with
`"parameters": {"binary_data_size": n}` takes its n little-endian bytes from the rest; outputs are
sent as bytes when the request asks (`"binary_data_output": true`, or `"binary_data": true` on a
requested output), and the answer then carries that header too.

Errors have the protocol's shape, `{"error": "<what is wrong and what to do>"}`: 400 for a bad
request, 404 for a model or version not served here, 413 for a body over the limit, 503 before a
model is loaded. The limits are the /predict ones (rows, body size); API keys are the hosts' to check.
"""
from __future__ import annotations

import functools
import re
import uuid
from typing import Any

import numpy as np
import orjson

from skyfuse.serving import api
from skyfuse.serving.model import LoadedModel, ModelSlot

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("binary_tensor_data",)
DATATYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT32": np.dtype("<i4"),
                                       "INT64": np.dtype("<i8")}
HEADER_LENGTH = "Inference-Header-Content-Length"
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a model name that is one URL path segment
_F32_MAX = float(np.finfo(np.float32).max)

# (method, path template, endpoint): what every host serves; each writes the template its own way.
ROUTES = (
    ("GET", "/v2", "server"),
    ("GET", "/v2/health/live", "live"),
    ("GET", "/v2/health/ready", "ready"),
    ("GET", "/v2/models/{name}", "model"),
    ("GET", "/v2/models/{name}/versions/{version}", "model"),
    ("GET", "/v2/models/{name}/ready", "model_ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready"),
    ("POST", "/v2/models/{name}/infer", "infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "infer"),
)
_PATTERNS = [(re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$"), method, template, endpoint)
             for method, template, endpoint in ROUTES]

Result = api.Result
Answer = tuple[int, bytes, dict[str, str]]


def match(path: str) -> tuple[str, str, str, dict[str, str]] | None:
    """(method, template, endpoint, path parameters) of a v2 path, or None."""
    for pattern, method, template, endpoint in _PATTERNS:
        found = pattern.match(path)
        if found:
            return method, template, endpoint, found.groupdict()
    return None


def error(status: int, message: str) -> Result:
    return status, orjson.dumps({"error": message})


def from_api(result: Result) -> Result:
    """An answer of `api` (401, 413, 415, 503, ...) with its error in the protocol's shape."""
    status, body = result
    if status < 400:
        return result
    return error(status, orjson.loads(body)["error"])


def live() -> Result:
    return 200, b'{"live":true}'


def ready(slot: ModelSlot) -> Result:
    return (200, b'{"ready":true}') if slot.model is not None else (503, b'{"ready":false}')


@functools.cache
def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("skyfuse")
    except PackageNotFoundError:
        return "0"


def server() -> Result:
    return 200, orjson.dumps({"name": "skyfuse", "version": _server_version(), "extensions": list(EXTENSIONS)})


def _served(slot: ModelSlot, served_name: str, name: str, version: str | None) -> LoadedModel | Result:
    """The model when `name` (and `version`, if given) is what this server serves, else the error to answer."""
    if name != served_name:
        return error(404, f"unknown model {name!r}: this server serves one model, {served_name!r} "
                          f"(GET /v2/models/{served_name} describes it)")
    model = slot.model  # one reference for the whole request, as in api.predict
    if model is None:
        return from_api(api.no_model(slot))
    if version is not None and version != model.version:
        return error(404, f"model {name!r} version {version!r} is not served here; the served version is "
                          f"{model.version!r} (leave /versions/... out of the path to use whichever is served)")
    return model


def model_metadata(slot: ModelSlot, served_name: str, name: str, version: str | None = None) -> Result:
    model = _served(slot, served_name, name, version)
    if isinstance(model, tuple):
        return model
    k = len(model.labels)
    return 200, orjson.dumps({
        "name": served_name, "versions": [model.version], "platform": PLATFORM,
        "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, model.width]}],
        "outputs": [{"name": model.output_names[0], "datatype": "FP32", "shape": [-1, k]}]})


def model_ready(slot: ModelSlot, served_name: str, name: str, version: str | None = None) -> Result:
    served = _served(slot, served_name, name, version)
    return served if isinstance(served, tuple) else (200, orjson.dumps({"name": served_name, "ready": True}))


def _bad(message: str) -> Result:
    return error(400, message)


def _shape(spec: dict[str, Any], model: LoadedModel,
           limits: api.Limits) -> tuple[tuple[int, int] | None, Result | None]:
    shape = spec.get("shape")
    want = f"[rows, {model.width}]"
    if type(shape) is not list or len(shape) != 2 or any(type(d) is not int for d in shape):
        return None, _bad(f"input {model.input_name!r}: \"shape\" must be {want}, 2 integers, "
                          f"got {orjson.dumps(shape).decode()[:60]}")
    rows, width = shape
    if width != model.width:
        return None, _bad(f"input {model.input_name!r} has shape {shape}: the model takes {model.width} values a "
                          f"row{api._describe_width(model)}; send shape {want}")
    if rows < 1:
        return None, _bad(f"input {model.input_name!r} has shape {shape}: send at least one row")
    if rows > limits.max_rows:
        return None, _bad(f"too many rows: {rows} > max_rows {limits.max_rows}; split the request")
    return (rows, width), None


def _from_json(data: object, rows: int, width: int, datatype: str,
               name: str) -> tuple[np.ndarray | None, Result | None]:
    """The values of a JSON `data` array, flat or nested [rows][width], as float64 [rows, width]."""
    if type(data) is not list:
        return None, _bad(f"input {name!r}: \"data\" must be an array of numbers (or use the binary extension), "
                          f"got {api._kind(data)}")
    flat = data
    if len(data) == rows and all(type(r) is list for r in data):  # nested: one array per row
        r = next((i for i, row in enumerate(data) if len(row) != width), None)
        if r is not None:
            return None, _bad(f"input {name!r}: row {r} of \"data\" has {len(data[r])} values, expected {width}")
        flat = [v for row in data for v in row]
    if len(flat) != rows * width:
        return None, _bad(f"input {name!r}: \"data\" has {len(flat)} values but shape [{rows}, {width}] needs "
                          f"{rows * width}; send them flat or nested in row-major order")
    integer = datatype.startswith("INT")
    allowed = {int} if integer else {int, float}
    if not set(map(type, flat)) <= allowed:  # bool is not int here, nor a string a number
        i, value = next((i, v) for i, v in enumerate(flat) if type(v) not in allowed)
        return None, _bad(f"input {name!r}: value {i} (row {i // width}, column {i % width}) is not "
                          f"{'an integer' if integer else 'a number'} ({datatype}): got {api._kind(value)} "
                          f"{orjson.dumps(value).decode()[:60]}")
    try:  # an integer out of its type's range raises; so does one beyond a double
        values = np.array(flat, dtype=DATATYPES[datatype] if integer else np.float64)
    except OverflowError:
        return None, _bad(f"input {name!r}: a value does not fit {datatype}; send values in its range")
    return values.astype(np.float64, copy=False).reshape(rows, width), None


def _to_float32(values: np.ndarray, name: str) -> tuple[np.ndarray | None, Result | None]:
    """float32 C-contiguous [rows, width]; a value that is not finite or beyond float32 is named."""
    bad = ~np.isfinite(values) | (np.abs(values) > _F32_MAX)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        return None, _bad(f"input {name!r}: row {r}, column {c} is {float(values[r, c])!r}, outside the float32 "
                          f"range (|x| <= {_F32_MAX:.6g}); send finite numbers")
    return np.ascontiguousarray(values, dtype=np.float32), None


def _requested(doc: dict[str, Any], model: LoadedModel) -> tuple[bool | None, Result | None]:
    """Whether the output goes as binary data, or the 400 for a bad "outputs"/"parameters"."""
    params = doc.get("parameters")
    if params is None:
        params = {}
    if type(params) is not dict:
        return None, _bad(f"\"parameters\" must be an object, got {api._kind(params)}")
    binary = params.get("binary_data_output", False)
    outputs = doc.get("outputs")
    if outputs is None:
        outputs = []
    if type(outputs) is not list:
        return None, _bad(f"\"outputs\" must be an array of {{\"name\"}} objects, got {api._kind(outputs)}")
    served = model.output_names[0]
    for i, out in enumerate(outputs):
        if type(out) is not dict or out.get("name") != served:
            got = out.get("name") if type(out) is dict else out
            return None, _bad(f"output {i} is {orjson.dumps(got).decode()[:60]}; the model has one output, "
                              f"{served!r}")
        out_params = out.get("parameters") or {}
        if type(out_params) is not dict:
            return None, _bad(f"output {served!r}: \"parameters\" must be an object, got {api._kind(out_params)}")
        binary = out_params.get("binary_data", binary)
    if type(binary) is not bool:
        return None, _bad(f"binary_data / binary_data_output must be true or false, got {api._kind(binary)}")
    return binary, None


def infer(body: bytes | str, slot: ModelSlot, served_name: str, name: str, version: str | None = None,
          limits: api.Limits = api.DEFAULT_LIMITS, header_length: str | None = None,
          content_type: str | None = None) -> Answer:
    """Answer one POST /v2/models/{name}[/versions/{version}]/infer with (status, body, headers)."""
    if isinstance(body, str):
        body = body.encode()
    if len(body) > limits.max_body_bytes:
        return *from_api(api.too_large(len(body), limits.max_body_bytes)), {}
    binary_body = header_length is not None
    if not (api.is_json(content_type) or (binary_body and (content_type or "").split(";")[0].strip().lower()
                                          == "application/octet-stream")):
        return *from_api(api.unsupported_media_type(content_type or "")), {}  # not None here: is_json(None) holds
    model = _served(slot, served_name, name, version)
    if isinstance(model, tuple):
        return *model, {}
    json_part, tail = body, b""
    if header_length is not None:  # a body with binary tensor data
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            return *_bad(f"{HEADER_LENGTH} is {header_length!r} but the body has {len(body)} bytes: it must be "
                         "the size of the JSON part that starts the body"), {}
        json_part, tail = body[:n], body[n:]
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        hint = "" if binary_body else f" (a body with binary tensor data needs the {HEADER_LENGTH} header)"
        return *_bad(f"body is not valid JSON: {exc}{hint}"), {}
    if type(doc) is not dict:
        return *_bad(f'body must be a JSON object like {{"inputs": [...]}}, got {api._kind(doc)}'), {}
    extra = [k for k in doc if k not in REQUEST_KEYS]
    if extra:
        return *_bad(f"unexpected key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(REQUEST_KEYS)}"), {}
    request_id = doc.get("id")
    if request_id is not None and type(request_id) is not str:
        return *_bad(f'"id" must be a string, got {api._kind(request_id)}'), {}
    binary_out, bad = _requested(doc, model)
    if bad:
        return *bad, {}
    X, bad = _input(doc.get("inputs"), tail, model, limits)
    if bad:
        return *bad, {}
    assert X is not None  # _input gives X whenever it gives no error
    probs = model.run(X)
    output: dict[str, Any] = {"name": model.output_names[0], "datatype": "FP32", "shape": list(probs.shape)}
    answer = {"model_name": served_name, "model_version": model.version, "id": request_id or uuid.uuid4().hex,
              "outputs": [output]}
    if not binary_out:
        output["data"] = probs.ravel()
        return 200, orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), {}
    raw = probs.astype("<f4", copy=False).tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = orjson.dumps(answer)
    return 200, head + raw, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def _input(inputs: Any, tail: bytes, model: LoadedModel,
           limits: api.Limits) -> tuple[np.ndarray | None, Result | None]:
    """X float32 [rows, width] from the request's inputs (and the binary part of the body)."""
    want = f"{model.input_name!r} (FP32 [rows, {model.width}])"
    if type(inputs) is not list or len(inputs) != 1 or type(inputs[0]) is not dict:
        got = f"{len(inputs)} inputs" if type(inputs) is list else api._kind(inputs)
        return None, _bad(f'"inputs" must hold one input, {want}; got {got}')
    spec = inputs[0]
    extra = [k for k in spec if k not in INPUT_KEYS]
    if extra:
        return None, _bad(f"input: unexpected key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(INPUT_KEYS)}")
    if spec.get("name") != model.input_name:
        return None, _bad(f"unknown input {orjson.dumps(spec.get('name')).decode()[:60]}; the model takes one "
                          f"input, {want}")
    name, datatype = model.input_name, spec.get("datatype")
    if datatype not in DATATYPES:
        return None, _bad(f"input {name!r}: datatype {orjson.dumps(datatype).decode()[:30]} is not taken; use one "
                          f"of {', '.join(DATATYPES)}")
    shape, bad = _shape(spec, model, limits)
    if shape is None:  # and so bad is not
        return None, bad
    rows, width = shape
    params = spec.get("parameters") or {}
    if type(params) is not dict:
        return None, _bad(f"input {name!r}: \"parameters\" must be an object, got {api._kind(params)}")
    size = params.get("binary_data_size")
    if size is None:
        if tail:
            return None, _bad(f"the body has {len(tail)} bytes after its JSON but input {name!r} has no "
                              "binary_data_size parameter")
        values, bad = _from_json(spec.get("data"), rows, width, datatype, name)
        if values is None:  # and so bad is not
            return None, bad
        return _to_float32(values, name)
    expected = rows * width * DATATYPES[datatype].itemsize
    if "data" in spec:
        return None, _bad(f"input {name!r} has both \"data\" and binary_data_size: send one")
    if type(size) is not int or size != expected or len(tail) != expected:
        return None, _bad(f"input {name!r}: binary_data_size is {orjson.dumps(size).decode()[:30]} and "
                          f"{len(tail)} bytes follow the JSON; shape [{rows}, {width}] of {datatype} needs "
                          f"{expected}, sent after the JSON part, whose size the {HEADER_LENGTH} header gives")
    values = np.frombuffer(tail, dtype=DATATYPES[datatype]).reshape(rows, width)
    if values.dtype == np.float32 and np.isfinite(values).all():  # binary FP32: what the model takes
        return values.copy(), None  # a writable, aligned copy of the body's bytes
    return _to_float32(values.astype(np.float64, copy=False), name)


def openapi_paths(model_name: str, limits: api.Limits) -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, schemas) of the v2 routes for the hosts' OpenAPI document."""
    json = api.CONTENT_TYPE

    def body(ref: str, text: str = "OK") -> dict[str, Any]:
        return {"description": text, "content": {json: {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}

    err = {k: body("V2Error", text) for k, text in (
        ("400", "A bad request; `error` says what is wrong"), ("401", "API keys are configured and none was given"),
        ("404", "No such model or version here"), ("413", f"The body is over {limits.max_body_bytes} bytes"),
        ("415", "The content type is not JSON"), ("503", "No model is loaded yet"))}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": [model_name]},
            "description": "The model's name (INFERENCE_MODEL_NAME)"}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "The served model version (GET /health says which)"}
    tensor: dict[str, Any] = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}}}}
    paths: dict[str, Any] = {
        "/v2": {"get": {"operationId": "v2_server_metadata", "summary": "Server metadata (Open Inference Protocol)",
                        "responses": {"200": body("V2Server")}}},
        "/v2/health/live": {"get": {"operationId": "v2_live", "summary": "Liveness (open)",
                                    "responses": {"200": body("V2Live")}}},
        "/v2/health/ready": {"get": {"operationId": "v2_ready", "summary": "Readiness: a model is loaded (open)",
                                     "responses": {"200": body("V2Ready"), "503": body("V2Ready", "No model yet")}}},
    }
    for prefix, params, suffix in (("/v2/models/{name}", [name], ""),
                                   ("/v2/models/{name}/versions/{version}", [name, version], "_version")):
        paths[prefix] = {"get": {
            "operationId": f"v2_model_metadata{suffix}", "summary": "Model metadata: input and output tensors",
            "parameters": params, "responses": {"200": body("V2Model"), **{k: err[k] for k in ("401", "404", "503")}}}}
        paths[prefix + "/ready"] = {"get": {
            "operationId": f"v2_model_ready{suffix}", "summary": "Model readiness (open)", "parameters": params,
            "responses": {"200": body("V2ModelReady"), **{k: err[k] for k in ("404", "503")}}}}
        paths[prefix + "/infer"] = {"post": {
            "operationId": f"v2_infer{suffix}", "summary": "Inference on a batch of rows", "parameters": params,
            "requestBody": {"required": True, "content": {json: {
                "schema": {"$ref": "#/components/schemas/V2InferRequest"},
                "example": {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                                        "data": [5.1, 3.5, 1.4, 0.2]}]}}}},
            "responses": {"200": body("V2InferResponse"), **err}}}
    schemas: dict[str, Any] = {
        "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "V2Server": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "V2Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "V2Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "V2ModelReady": {"type": "object", "required": ["name", "ready"], "properties": {
            "name": {"type": "string"}, "ready": {"type": "boolean"}}},
        "V2Model": {"type": "object", "required": ["name", "platform", "inputs", "outputs"], "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"}, "inputs": {"type": "array", "items": tensor},
            "outputs": {"type": "array", "items": tensor}}},
        "V2InferRequest": {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
                    "name": {"type": "string"}, "datatype": {"enum": list(DATATYPES)},
                    "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                    "parameters": {"type": "object"}, "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
        "V2InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "items": {**tensor, "properties": {
                **tensor["properties"], "data": {"type": "array", "items": {"type": "number"}}}}}}},
    }
    return paths, schemas
