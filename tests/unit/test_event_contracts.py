"""Contract tests for the CloudEvent `data` schemas in events/.

Checks that events/catalog.toml, events/schemas/ and events/samples/ agree, that every
schema is a valid JSON Schema 2020-12 following the project conventions, that every
sample validates, and that typical mistakes (missing field, unknown field, wrong type,
bad digest, ...) are rejected.

`format: date-time` is only enforced by jsonschema when `rfc3339-validator` is
installed (skyfuse installs it: `jsonschema[format-nongpl]`).
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

EVENTS = Path(__file__).parents[2] / "events"
SCHEMAS = EVENTS / "schemas"
SAMPLES = EVENTS / "samples"
CATALOG = EVENTS / "catalog.toml"

FUNCTIONS = {"trainer", "exporter", "fuser", "scheduler", "deployer", "inference", "monitor", "router"}
PRODUCERS = FUNCTIONS | {"cli"}
DRAFT = "https://json-schema.org/draft/2020-12/schema"
FORMAT_CHECKER = Draft202012Validator.FORMAT_CHECKER
UNKNOWN = "unexpected_field"


def _load_dir(folder: Path) -> dict[str, Any]:
    return {p.name[: -len(".json")]: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _load_catalog() -> dict[str, Any]:
    with CATALOG.open("rb") as f:
        return tomllib.load(f)


SCHEMA_DOCS = _load_dir(SCHEMAS)
SAMPLE_DOCS = _load_dir(SAMPLES)
CATALOG_DOC = _load_catalog()
TYPES = sorted(CATALOG_DOC)


def validator(event_type: str) -> Draft202012Validator:
    return Draft202012Validator(SCHEMA_DOCS[event_type], format_checker=FORMAT_CHECKER)


def errors(event_type: str, data: Any) -> list[str]:
    return [e.message for e in validator(event_type).iter_errors(data)]


def sample(event_type: str) -> dict[str, Any]:
    return copy.deepcopy(SAMPLE_DOCS[event_type])


def assert_rejected(event_type: str, data: Any) -> None:
    assert errors(event_type, data), f"{event_type}: mutated sample was accepted: {data!r}"


def _object_paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths (tuples of keys/indexes) of every JSON object inside value, value included."""
    if isinstance(value, dict):
        yield path
        for k, v in value.items():
            yield from _object_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _object_paths(v, path + (i,))


def _get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "true"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 12345
    if isinstance(value, list):
        return {"items": value}
    if isinstance(value, dict):
        return [value]
    return 12345  # None


def _cases(per_type: Callable[[str], list]) -> list:
    return [pytest.param(t, x, id=f"{t}-{x}") for t in TYPES if t in SCHEMA_DOCS for x in per_type(t)]


# --------------------------------------------------------------------------- catalog


def test_catalog_types_match_schemas_and_samples() -> None:
    assert TYPES, "catalog.toml lists no event types"
    assert set(TYPES) == set(SCHEMA_DOCS), "catalog and events/schemas/ disagree"
    assert set(TYPES) == set(SAMPLE_DOCS), "catalog and events/samples/ disagree"


def schema_required(event_type: str) -> list[str]:
    return SCHEMA_DOCS[event_type]["required"]


@pytest.mark.parametrize("event_type", TYPES)
def test_catalog_entry(event_type: str) -> None:
    entry = CATALOG_DOC[event_type]
    assert {"topic", "key", "consumers", "description"} <= set(entry)
    assert entry["topic"] == f"skyfuse.{event_type}"
    assert isinstance(entry["consumers"], list) and entry["consumers"]
    assert set(entry["consumers"]) <= FUNCTIONS, entry["consumers"]
    producers = entry["producers"]
    assert producers and {p.removesuffix("@control") for p in producers} <= PRODUCERS, producers
    if "cloud_field" in entry:  # the field that names the producer's own cloud
        assert entry["cloud_field"] in schema_required(event_type), entry["cloud_field"]
    assert isinstance(entry["description"], str) and entry["description"].strip()
    assert "\n" not in entry["description"]
    schema = SCHEMA_DOCS[event_type]
    if "dataschema" in entry:
        assert entry["dataschema"] == schema["$id"]
    # The Kafka key must always be present and be a plain (non-null) string.
    key = entry["key"]
    assert key in schema["required"], f"key {key!r} is not a required field"
    data = sample(event_type)
    assert isinstance(data[key], str) and data[key]
    data[key] = None
    assert_rejected(event_type, data)


def test_catalog_consumers_as_specified() -> None:
    consumers = {t: CATALOG_DOC[t]["consumers"] for t in TYPES}
    assert consumers == {
        "shard.ready": ["trainer"],
        "round.started": ["trainer"],
        "model.ready": ["exporter"],
        "onnx.ready": ["fuser"],
        "fused.ready": ["scheduler"],
        "metrics.sampled": ["scheduler"],
        "placement.changed": ["deployer", "router"],
        "deployment.status": ["scheduler"],
    }


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("event_type", sorted(SCHEMA_DOCS))
def test_schema_is_valid_json_schema(event_type: str) -> None:
    Draft202012Validator.check_schema(SCHEMA_DOCS[event_type])


def _walk_annotated(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Yield (path, subschema) for the schema's own structure, skipping if/then/else/not
    branches (those only tighten rules and need no descriptions)."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            if k in {"if", "then", "else", "not", "allOf"}:
                continue
            if k == "properties":
                for name, sub in v.items():
                    yield from _walk_annotated(sub, f"{path}/properties/{name}")
            else:
                yield from _walk_annotated(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_annotated(v, f"{path}/{i}")


@pytest.mark.parametrize("event_type", sorted(SCHEMA_DOCS))
def test_schema_conventions(event_type: str) -> None:
    schema = SCHEMA_DOCS[event_type]
    assert schema["$schema"] == DRAFT
    assert schema["$id"] == f"urn:skyfuse:events:{event_type}:v1"
    assert schema.get("title") and schema.get("description")
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] and set(schema["required"]) <= set(schema["properties"])
    for path, node in _walk_annotated(schema, "#"):
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: must set additionalProperties: false"
            assert set(node.get("required", [])) <= set(node["properties"]), path
            for name, prop in node["properties"].items():
                assert prop.get("description"), f"{path}/properties/{name}: missing description"
        ref = node.get("$ref")
        if ref is not None:
            assert ref.startswith("#/$defs/"), f"{path}: only local $defs references allowed, got {ref}"
            assert ref.split("/")[-1] in schema.get("$defs", {}), f"{path}: dangling {ref}"


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("event_type", sorted(SAMPLE_DOCS))
def test_sample_is_valid(event_type: str) -> None:
    assert event_type in SCHEMA_DOCS
    assert errors(event_type, SAMPLE_DOCS[event_type]) == []


def test_samples_tell_one_story() -> None:
    s = SAMPLE_DOCS
    run_ids = {d["run_id"] for d in s.values() if "run_id" in d}
    assert len(run_ids) == 1
    manifests = [d["manifest"] for d in s.values() if "manifest" in d]
    assert all(m == manifests[0] for m in manifests)
    clouds = set(manifests[0]["clouds"])
    assert clouds == {"aws", "gcp", "azure"}
    version = s["fused.ready"]["version"]
    assert s["placement.changed"]["model_version"] == version
    assert s["deployment.status"]["model_version"] == version
    assert s["metrics.sampled"]["model_version"] == version
    assert s["placement.changed"]["sha256"] == s["fused.ready"]["sha256"]
    assert s["deployment.status"]["decision_id"] == s["placement.changed"]["decision_id"]
    assert s["onnx.ready"]["source_sha256"] == s["model.ready"]["sha256"]
    for d in s.values():
        for key in ("cloud", "source_cloud"):
            if key in d:
                assert d[key] in clouds


# --------------------------------------------------------------------------- mutations


@pytest.mark.parametrize("event_type,field", _cases(lambda t: SCHEMA_DOCS[t]["required"]))
def test_missing_required_field_rejected(event_type: str, field: str) -> None:
    data = sample(event_type)
    del data[field]
    assert_rejected(event_type, data)


@pytest.mark.parametrize(
    "event_type,path",
    _cases(lambda t: ["/".join(map(str, p)) or "<top>" for p in _object_paths(SAMPLE_DOCS[t])]),
)
def test_unknown_field_rejected(event_type: str, path: str) -> None:
    data = sample(event_type)
    steps = () if path == "<top>" else tuple(int(s) if s.isdigit() else s for s in path.split("/"))
    _get(data, steps)[UNKNOWN] = "surprise"
    assert_rejected(event_type, data)


@pytest.mark.parametrize("event_type,field", _cases(lambda t: list(SAMPLE_DOCS[t])))
def test_wrong_type_rejected(event_type: str, field: str) -> None:
    data = sample(event_type)
    data[field] = _wrong_type(data[field])
    assert_rejected(event_type, data)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    steps = tuple(int(s) if s.isdigit() else s for s in path.split("/"))

    def mutate(data: dict) -> None:
        _get(data, steps[:-1])[steps[-1]] = value

    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    steps = tuple(int(s) if s.isdigit() else s for s in path.split("/"))

    def mutate(data: dict) -> None:
        del _get(data, steps[:-1])[steps[-1]]

    return mutate


def _both(*fns: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        for fn in fns:
            fn(data)

    return mutate


# (event type, case id, mutation) — each must make the sample invalid.
TARGETED = [
    ("shard.ready", "sha256-uppercase", _set("sha256", "A" * 64)),
    ("shard.ready", "sha256-short", _set("sha256", "a" * 63)),
    ("shard.ready", "cloud-uppercase", _set("cloud", "AWS")),
    ("shard.ready", "cloud-too-long", _set("cloud", "a" * 33)),
    ("shard.ready", "uri-relative", _set("uri", "runs/r1/shards/0.csv")),
    ("shard.ready", "run-id-empty", _set("run_id", "")),
    ("shard.ready", "run-id-slash", _set("run_id", "r1/evil")),
    ("shard.ready", "round-negative", _set("round", -1)),
    ("shard.ready", "rows-zero", _set("rows", 0)),
    ("shard.ready", "features-empty", _set("features", [])),
    ("shard.ready", "features-duplicate", _set("features", ["a", "a"])),
    ("shard.ready", "one-class", _set("classes", ["setosa"])),
    ("shard.ready", "binary-three-classes", _set("task", "binary")),
    ("shard.ready", "class-label-float", _set("classes", [0.5, 1])),
    ("shard.ready", "partition-unknown", _set("partition", "random")),
    ("shard.ready", "manifest-fusion-unknown", _set("manifest/fusion", "mean")),
    ("shard.ready", "manifest-timeout-zero", _set("manifest/timeout_s", 0)),
    ("shard.ready", "manifest-quorum-zero", _set("manifest/quorum", 0)),
    ("shard.ready", "manifest-clouds-empty", _set("manifest/clouds", [])),
    ("shard.ready", "manifest-missing-rounds", _drop("manifest/rounds")),
    ("shard.ready", "model-lr-zero", _set("model/learning_rate", 0)),
    ("shard.ready", "model-hidden-zero", _set("model/hidden", [0])),
    ("round.started", "round-zero", _set("round", 0)),
    ("round.started", "clouds-empty", _set("clouds", [])),
    ("round.started", "epochs-zero", _set("epochs", 0)),
    ("model.ready", "accuracy-above-one", _set("validation/accuracy", 1.5)),
    ("model.ready", "loss-negative", _set("validation/loss", -0.1)),
    ("model.ready", "samples-zero", _set("samples", 0)),
    ("model.ready", "validation-missing-rows", _drop("validation/rows")),
    ("onnx.ready", "opset-12", _set("opset", 12)),
    ("onnx.ready", "opset-19", _set("opset", 19)),
    ("onnx.ready", "inputs-empty", _set("inputs", [])),
    ("onnx.ready", "dtype-unknown", _set("inputs/0/dtype", "float")),
    ("onnx.ready", "shape-dim-zero", _set("inputs/0/shape", [0, 4])),
    ("onnx.ready", "parity-negative", _set("parity_max_abs_diff", -1e-6)),
    ("fused.ready", "strategy-auto", _set("strategy", "auto")),
    ("fused.ready", "members-empty", _set("members", [])),
    ("fused.ready", "member-weight-above-one", _set("members/0/weight", 1.2)),
    ("fused.ready", "strategies-unknown-name", _set("strategies/mean", 0.5)),
    ("fused.ready", "strategies-empty", _set("strategies", {})),
    ("fused.ready", "metrics-missing-validation", _drop("metrics/validation_accuracy")),
    ("metrics.sampled", "source-unknown", _set("source", "trainer")),
    ("metrics.sampled", "window-zero", _set("window_s", 0)),
    ("metrics.sampled", "error-rate-above-one", _set("error_rate", 1.01)),
    ("metrics.sampled", "load-negative", _set("load", -0.1)),
    ("metrics.sampled", "latency-negative", _set("latency_ms/p99", -1)),
    ("metrics.sampled", "latency-without-requests", _both(_set("requests", 0), _set("requests_per_s", 0))),
    ("metrics.sampled", "capacity-zero", _set("capacity_rps", 0)),
    ("metrics.sampled", "currency-lowercase", _set("price/currency", "usd")),
    ("metrics.sampled", "price-negative", _set("price/per_hour", -0.01)),
    ("placement.changed", "placements-empty", _set("placements", [])),
    ("placement.changed", "weight-above-one", _set("placements/0/weight", 1.5)),
    ("placement.changed", "traffic-without-replicas", _set("placements/0/replicas", 0)),
    ("placement.changed", "lambda-negative", _set("lambda", -0.5)),
    ("placement.changed", "scores-empty", _set("scores", [])),
    ("placement.changed", "score-eligible-string", _set("scores/0/eligible", "yes")),
    ("placement.changed", "reason-empty", _set("reason", "")),
    ("deployment.status", "state-unknown", _set("state", "running")),
    ("deployment.status", "failed-without-reason", _both(_set("state", "failed"), _drop("reason"))),
    ("deployment.status", "endpoint-not-uri", _set("endpoint", "gcp endpoint")),
    ("deployment.status", "warm-negative", _set("warm_ms", -1)),
]


@pytest.mark.parametrize("event_type,mutate", [pytest.param(t, m, id=f"{t}-{i}") for t, i, m in TARGETED])
def test_targeted_mutation_rejected(event_type: str, mutate: Callable[[dict], None]) -> None:
    data = sample(event_type)
    mutate(data)
    assert_rejected(event_type, data)


# (event type, case id, mutation) — each must keep the sample valid.
ACCEPTED = [
    ("shard.ready", "integer-classes", _set("classes", [0, 1, 2])),
    ("shard.ready", "binary-two-classes", _both(_set("task", "binary"), _set("classes", [0, 1]))),
    ("shard.ready", "no-model-block", _drop("model")),
    ("shard.ready", "linear-model", _set("model/hidden", [])),
    ("shard.ready", "file-uri", _set("uri", "file:///tmp/skyfuse/runs/r1/shards/0.csv")),
    ("onnx.ready", "unknown-dim", _set("inputs/0/shape", [None, 4])),
    ("fused.ready", "no-test-accuracy", _drop("metrics/test_accuracy")),
    ("metrics.sampled", "idle-window", _both(
        _set("requests", 0), _set("requests_per_s", 0), _set("latency_ms", {"p50": None, "p99": None}))),
    ("metrics.sampled", "no-model", _set("model_version", None)),
    ("metrics.sampled", "currency-default", _drop("price/currency")),
    ("metrics.sampled", "custom-cloud", _set("cloud", "oci-eu-1")),
    ("placement.changed", "first-decision", _set("previous", [])),
    ("placement.changed", "standby-cloud", _set("placements/1/weight", 0)),
    ("deployment.status", "failed-with-reason", _set("state", "failed")),
    ("deployment.status", "minimal",
     lambda d: [d.pop(k) for k in ("sha256", "endpoint", "replicas", "reason", "warm_ms")]),
]


@pytest.mark.parametrize("event_type,mutate", [pytest.param(t, m, id=f"{t}-{i}") for t, i, m in ACCEPTED])
def test_legitimate_variant_accepted(event_type: str, mutate: Callable[[dict], None]) -> None:
    data = sample(event_type)
    mutate(data)
    assert errors(event_type, data) == []


def test_date_time_format_is_enforced() -> None:
    """skyfuse installs jsonschema[format-nongpl], which brings rfc3339-validator: without it
    jsonschema would accept any string as a date-time."""
    assert "date-time" in FORMAT_CHECKER.checkers


@pytest.mark.parametrize(
    "event_type,field",
    [("metrics.sampled", "sampled_at"), ("placement.changed", "decided_at"), ("deployment.status", "at")],
)
@pytest.mark.parametrize("bad", ["yesterday", "2025-01-14 10:06:00", "2025-01-14T10:06:00"])
def test_bad_timestamp_rejected(event_type: str, field: str, bad: str) -> None:
    data = sample(event_type)
    data[field] = bad
    assert_rejected(event_type, data)
