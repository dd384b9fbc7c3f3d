"""The inference API, independent of any HTTP framework: bytes in, (status, JSON bytes) out.

POST /predict
    request   {"instances": [[x11, ..., x1d], ...], "format": "records"}   ("format" optional)
    200       {"model_version": "v1",
               "predictions": [{"class": "setosa", "probabilities": {"setosa": 0.91, ...}}, ...]}
    with "format": "compact" (one array per field, cheaper for big batches):
    200       {"model_version": "v1", "classes": ["setosa", ...],
               "predictions": ["setosa", ...], "probabilities": [[0.91, ...], ...]}
    Class labels are strings (the lineage's `classes`, else "0".."k-1"); probabilities are the
    model's float32 outputs, written at float32 precision. Rows come back in request order.
GET /health     200 {"status": "ok", "model_version", ...}; 503 {"status": "no_model", ...}
GET /metadata   200 {"model_name", "model_version", "sha256", "input": {"width", "features"},
                     "output": {"classes"}, "lineage", "limits"}; 503 before a model is loaded
GET /openapi.json   the OpenAPI 3.1 document of these endpoints, the Open Inference Protocol v2
                    routes (`skyfuse.serving.oip`) and GET /metrics (Prometheus text)

Both formats answer TF-Serving's way: `predictions` holds one entry per instance, in order (a
record of named outputs per row, or the row's label).

Every error is `{"error": "<what is wrong, in words>", "detail": {"code": "<stable code>", ...}}`:
400 for a bad body (the message names the key, row and column at fault), 413 when the body is
over `max_body_bytes`, 503 while no model is loaded.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np
import orjson

from skyfuse.serving import routes
from skyfuse.serving.model import LoadedModel, ModelSlot

MAX_ROWS = 1000
MAX_BODY_BYTES = 1 << 20
FORMATS = ("records", "compact")
KEYS = ("instances", "format")
MODEL_NAME = "skyfuse"  # the name the Open Inference Protocol routes serve the model under, unless configured
CONTENT_TYPE = "application/json"
_NUMERIC: frozenset[type] = frozenset((int, float))
_KINDS: dict[type, str] = {str: "string", list: "array", dict: "object"}
_F32_MAX = float(np.finfo(np.float32).max)
_DUMP = orjson.OPT_SERIALIZE_NUMPY

Result = tuple[int, bytes]
Header = Callable[[str], str | None]  # a request header by name (any case), None when absent


@dataclass(frozen=True)
class Limits:
    max_rows: int = MAX_ROWS
    max_body_bytes: int = MAX_BODY_BYTES


DEFAULT_LIMITS = Limits()


def _kind(value: object) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return _KINDS.get(type(value), type(value).__name__)


def error(status: int, message: str, code: str, **detail: object) -> Result:
    return status, orjson.dumps({"error": message, "detail": {"code": code, **detail}})


def body_size(body: bytes | str) -> int:
    if isinstance(body, str) and not body.isascii():
        return len(body.encode())
    return len(body)


def too_large(size: int | None, limit: int = MAX_BODY_BYTES) -> Result:
    said = f"{size} bytes" if size is not None else "larger than the limit"
    return error(413, f"body is {said}; the limit is {limit} bytes (max_body_bytes): send fewer rows per request",
                 "body_too_large", size=size, max_body_bytes=limit)


def key_hash(key: str) -> str:
    """The digest of an API key, as `INFERENCE_API_KEY_HASHES` lists it."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_hashes(text: str) -> tuple[str, ...]:
    hashes = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    bad = [i for i, h in enumerate(hashes, 1) if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:  # never echo the value: it may be a key pasted by mistake
        raise ValueError(f"INFERENCE_API_KEY_HASHES: entry {bad[0]} is not a sha256 hex digest (64 hex "
                         "characters); list sha256(key) digests, never the keys")
    return hashes


def authorize(key_hashes: tuple[str, ...], header: Header) -> Result | None:
    """None when no keys are configured or the request carries one of them (compared in constant
    time, by digest); otherwise 401."""
    if not key_hashes:
        return None
    presented = header("x-api-key") or ""
    if not presented:
        scheme, _, token = (header("authorization") or "").partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else ""
    digest = key_hash(presented) if presented else ""
    matched = False
    for known in key_hashes:  # no early exit: the time does not tell which key came close
        matched |= hmac.compare_digest(digest, known)
    if matched:
        return None
    return error(401, "a valid API key is needed: send it in X-API-Key or as Authorization: Bearer KEY",
                 "unauthorized")


def is_json(content_type: str | None) -> bool:
    """JSON or no content type at all (many clients send none); anything else is refused."""
    if not content_type or content_type == CONTENT_TYPE:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def unsupported_media_type(content_type: str) -> Result:
    return error(415, f"content type {content_type!r} is not accepted; send the body as application/json",
                 "unsupported_media_type", content_type=content_type, accepted="application/json")


def no_model(slot: ModelSlot) -> Result:
    last = slot.last_error
    message = f"no model is loaded yet: this instance serves the model named by the pointer {slot.source}"
    if slot.pointer_seen is False:
        message += ", which does not exist yet"
    if last:
        message += f"; the last load failed: {last['error']}"
    return error(503, message, "no_model", pointer=slot.source, last_error=last)


def _describe_width(model: LoadedModel) -> str:
    if model.features:
        shown = ", ".join(model.features[:12]) + (", …" if len(model.features) > 12 else "")
        return f" (features: {shown})"
    return ""


def _locate(instances: list[Any], model: LoadedModel) -> Result:
    """The first bad row or value, named (slow path: only runs on a request already known bad)."""
    width = model.width
    for r, row in enumerate(instances):
        if type(row) is not list:
            return error(400, f"row {r} must be an array of {width} numbers, got {_kind(row)}", "bad_row",
                         row=r, got=_kind(row))
        if len(row) != width:
            return error(400, f"row {r} has {len(row)} values, expected {width}{_describe_width(model)}",
                         "row_width", row=r, expected=width, got=len(row))
        for c, value in enumerate(row):
            if type(value) not in _NUMERIC:
                shown = orjson.dumps(value).decode()[:60]
                return error(400, f"row {r}, column {c} is not a number: got {_kind(value)} {shown}",
                             "not_a_number", row=r, column=c, got=_kind(value))
            if not math.isfinite(value) or abs(value) > _F32_MAX:
                return error(400, f"row {r}, column {c} is {value!r}, outside the float32 range "
                                  f"(|x| <= {_F32_MAX:.6g}); send finite numbers", "non_finite",
                             row=r, column=c, got=repr(value))
    return error(400, "the instances are not a rectangular array of numbers", "bad_instances")


class _NonFinite(float):
    """A NaN/Infinity literal found by the stdlib parser, remembered as written."""

    literal: str

    def __new__(cls, literal: str) -> Self:
        self = super().__new__(cls, literal.replace("Infinity", "inf"))
        self.literal = literal
        return self


def _not_json(body: bytes | str, exc: orjson.JSONDecodeError) -> Result:
    """400 for a body orjson rejects; names NaN/Infinity (not JSON, yet often sent) by row and column."""
    try:
        doc = json.loads(body, parse_constant=_NonFinite)
    except (ValueError, TypeError, RecursionError):
        doc = None
    rows = doc.get("instances") if isinstance(doc, dict) else None
    if isinstance(rows, list):
        for r, row in enumerate(rows):
            for c, value in enumerate(row if isinstance(row, list) else ()):
                if isinstance(value, _NonFinite):
                    return error(400, f"row {r}, column {c} is {value.literal}: NaN and Infinity are not numbers "
                                      "in JSON; send finite numbers", "non_finite", row=r, column=c, got=value.literal)
                if isinstance(value, float) and not math.isfinite(value):
                    return error(400, f"row {r}, column {c} overflows a double (|x| > 1.8e308); send finite "
                                      f"numbers within the float32 range (|x| <= {_F32_MAX:.6g})", "non_finite",
                                 row=r, column=c, got="overflow")
    return error(400, f"body is not valid JSON: {exc}", "invalid_json", position=exc.pos)


def parse(body: bytes | str, model: LoadedModel,
          limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray | None, str, Result | None]:
    """(X float32 [n, width], format, None) or (None, "", the 400 to answer)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return None, "", _not_json(body, exc)
    if type(doc) is not dict:
        return None, "", error(400, 'body must be a JSON object like {"instances": [[...], ...]}, '
                                    f"got {_kind(doc)}", "not_object", got=_kind(doc))
    fmt = "records"
    if len(doc) != 1 or "instances" not in doc:
        extra = [k for k in doc if k not in KEYS]
        if extra:
            shown = ", ".join(orjson.dumps(k).decode() for k in extra)
            return None, "", error(400, f"unexpected key(s) {shown}; allowed: "
                                        f"{', '.join(KEYS)}", "unexpected_keys", keys=extra, allowed=list(KEYS))
        if "instances" not in doc:
            return None, "", error(400, 'body lacks the key "instances" (a non-empty array of rows)',
                                   "missing_key", missing=["instances"])
        fmt = doc["format"]
        if fmt not in FORMATS:
            return None, "", error(400, f'"format" must be one of {", ".join(map(repr, FORMATS))}, got '
                                        f"{orjson.dumps(fmt).decode()[:60]}", "bad_format",
                                   allowed=list(FORMATS))
    instances = doc["instances"]
    if type(instances) is not list:
        return None, "", error(400, f'"instances" must be a non-empty array of rows, got {_kind(instances)}',
                               "bad_instances", got=_kind(instances))
    n = len(instances)
    if n == 0:
        return None, "", error(400, '"instances" is empty: send at least one row', "empty_instances")
    if n > limits.max_rows:
        return None, "", error(400, f"too many rows: {n} > max_rows {limits.max_rows}; split the request",
                               "too_many_rows", got=n, max_rows=limits.max_rows)
    width = model.width
    seen: set[type] = set()
    for row in instances:
        if type(row) is not list or len(row) != width:
            return None, "", _locate(instances, model)
        seen.update(map(type, row))
    if not seen <= _NUMERIC:
        return None, "", _locate(instances, model)
    # orjson parses only finite doubles, so a value beyond float32 is all that can make X non-finite:
    # its cast raises here (no scan of X afterwards), and the slow path names it
    try:
        with np.errstate(over="raise"):
            X = np.array(instances, dtype=np.float32)
    except FloatingPointError:
        return None, "", _locate(instances, model)
    return X, fmt, None


def encode(model: LoadedModel, probs: np.ndarray, fmt: str = "records") -> bytes:
    labels = model.labels
    if fmt == "compact":
        best = probs.argmax(axis=1).tolist()
        return orjson.dumps({"model_version": model.version, "classes": labels,
                             "predictions": [labels[i] for i in best], "probabilities": probs}, option=_DUMP)
    # the probabilities as Python floats that write as the float32 values do: orjson writes each as
    # its shortest decimal, which reads back as a double that writes the same (a numpy scalar per
    # value, the other way, costs more than the rest of the answer)
    predictions = []
    for r, row in enumerate(orjson.loads(orjson.dumps(probs, option=_DUMP))):
        try:
            best = row.index(max(row))  # the first largest, as argmax picks it
        except TypeError:  # a NaN or an infinity, written null: numpy's pick
            best = int(probs[r].argmax())
        predictions.append({"class": labels[best], "probabilities": dict(zip(labels, row, strict=True))})
    return orjson.dumps({"model_version": model.version, "predictions": predictions})


def predict(body: bytes | str, slot: ModelSlot, limits: Limits = DEFAULT_LIMITS) -> Result:
    """Answer one POST /predict body with (status, JSON bytes)."""
    if len(body) > limits.max_body_bytes or (type(body) is str and len(body) * 4 > limits.max_body_bytes):
        size = body_size(body)
        if size > limits.max_body_bytes:
            return too_large(size, limits.max_body_bytes)
    model = slot.model  # one reference for the whole request: a swap never shows half a model
    if model is None:
        return no_model(slot)
    X, fmt, bad = parse(body, model, limits)
    if bad is not None:
        return bad
    assert X is not None  # parse gives X whenever it gives no error
    return 200, encode(model, model.run(X), fmt)


def health(slot: ModelSlot) -> Result:
    doc = slot.status()
    doc["pid"] = os.getpid()
    return (200 if slot.model is not None else 503), orjson.dumps(doc)


def metadata(slot: ModelSlot, limits: Limits = DEFAULT_LIMITS, model_name: str = MODEL_NAME) -> Result:
    model = slot.model
    if model is None:
        return no_model(slot)
    return 200, orjson.dumps({"model_name": model_name, **model.describe(), "formats": list(FORMATS),
                              "limits": asdict(limits), "last_error": slot.last_error})


def openapi(server_url: str | None = None, limits: Limits = DEFAULT_LIMITS, model_name: str = MODEL_NAME) -> Result:
    return 200, _openapi(server_url, limits, model_name)


def _error_response(text: str) -> dict[str, Any]:
    return {"description": text, "content": {CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _paths(limits: Limits) -> dict[str, dict[str, Any]]:
    """The paths of `routes.ROUTES`: method, operationId and summary from the table, the request and
    responses of each route from here (a route without them, or them without a route, fails)."""
    bodies: dict[str, dict[str, Any]] = {
        "predict": {
            "requestBody": {"required": True, "content": {CONTENT_TYPE: {
                "schema": {"$ref": "#/components/schemas/PredictRequest"},
                "example": {"instances": [[5.1, 3.5, 1.4, 0.2]]}}}},
            "responses": {
                "200": {"description": "One prediction per row, in order", "content": {CONTENT_TYPE: {
                    "schema": {"oneOf": [{"$ref": "#/components/schemas/PredictRecords"},
                                         {"$ref": "#/components/schemas/PredictCompact"}]}}}},
                "400": _error_response("The body is not a valid request; `error` says what is wrong"),
                "413": _error_response(f"The body is over {limits.max_body_bytes} bytes"),
                "415": _error_response("The content type is not JSON"),
                "503": _error_response("No model is loaded yet"),
            }},
        "health": {
            "responses": {"200": {"description": "A model is being served", "content": {CONTENT_TYPE: {
                              "schema": {"$ref": "#/components/schemas/Health"}}}},
                          "503": {"description": "No model loaded yet", "content": {CONTENT_TYPE: {
                              "schema": {"$ref": "#/components/schemas/Health"}}}}}},
        "metadata": {
            "responses": {"200": {"description": "The served model", "content": {CONTENT_TYPE: {
                              "schema": {"$ref": "#/components/schemas/Metadata"}}}},
                          "503": _error_response("No model is loaded yet")}},
        "openapi": {
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {CONTENT_TYPE: {
                "schema": {"type": "object"}}}}}},
        "metrics": {
            "responses": {"200": {"description": "Prometheus text exposition format", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}},
    }
    names = [route.name for route in routes.ROUTES]
    if sorted(bodies) != sorted(names):
        raise RuntimeError(f"the OpenAPI bodies {sorted(bodies)} and the routes {sorted(names)} differ")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes.ROUTES:
        operation = {"operationId": route.name, "summary": route.summary, **bodies[route.name]}
        if route.auth:
            operation["responses"] = {**operation["responses"],
                                      "401": _error_response("API keys are configured and none was given")}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return paths


@functools.lru_cache(maxsize=8)
def _openapi(server_url: str | None, limits: Limits, model_name: str = MODEL_NAME) -> bytes:
    from skyfuse.serving import oip  # oip builds on this module

    number = {"type": "number"}
    labels = {"type": "array", "items": {"type": "string"}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "skyfuse inference", "version": "1",
                 "description": "Class probabilities from the fused ONNX model this cloud serves."},
        "paths": _paths(limits),
        "components": {"schemas": {
            "PredictRequest": {
                "type": "object", "required": ["instances"], "additionalProperties": False,
                "properties": {
                    "instances": {"type": "array", "minItems": 1, "maxItems": limits.max_rows,
                                  "description": "Rows of the model's input width (see /metadata), finite numbers",
                                  "items": {"type": "array", "items": number}},
                    "format": {"type": "string", "enum": list(FORMATS), "default": "records"}}},
            "PredictRecords": {
                "type": "object", "required": ["model_version", "predictions"],
                "properties": {"model_version": {"type": "string"}, "predictions": {"type": "array", "items": {
                    "type": "object", "required": ["class", "probabilities"],
                    "properties": {"class": {"type": "string"},
                                   "probabilities": {"type": "object", "additionalProperties": number}}}}}},
            "PredictCompact": {
                "type": "object", "required": ["model_version", "classes", "predictions", "probabilities"],
                "properties": {"model_version": {"type": "string"}, "classes": labels, "predictions": labels,
                               "probabilities": {"type": "array", "items": {"type": "array", "items": number}}}},
            "Error": {
                "type": "object", "required": ["error", "detail"],
                "properties": {"error": {"type": "string", "description": "What is wrong, in words"},
                               "detail": {"type": "object", "required": ["code"],
                                          "properties": {"code": {"type": "string"}}}}},
            "Health": {
                "type": "object", "required": ["status", "model_version", "last_error"],
                "properties": {"status": {"type": "string", "enum": ["ok", "no_model"]},
                               "model_version": {"type": ["string", "null"]},
                               "swaps": {"type": "integer"}, "pointer": {"type": "string"},
                               "last_error": {"type": ["object", "null"]}}},
            "Metadata": {
                "type": "object", "required": ["model_name", "model_version", "sha256", "input", "output", "lineage"],
                "properties": {
                    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "sha256": {"type": "string"},
                    "input": {"type": "object", "properties": {
                        "name": {"type": "string"}, "dtype": {"const": "float32"}, "width": {"type": "integer"},
                        "features": {"type": ["array", "null"], "items": {"type": "string"}}}},
                    "output": {"type": "object", "properties": {"name": {"type": "string"}, "classes": labels}},
                    "lineage": {"type": "object"},
                    "limits": {"type": "object", "properties": {"max_rows": {"type": "integer"},
                                                                 "max_body_bytes": {"type": "integer"}}}}},
        }},
    }
    paths, schemas = oip.openapi_paths(model_name, limits)
    doc["paths"].update(paths)
    doc["components"]["schemas"].update(schemas)
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return orjson.dumps(doc)
