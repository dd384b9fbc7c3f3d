"""skyfuse.payloads mirrors events/schemas: each TypedDict has its schema's properties, the same
required ones and the same types (nested objects, arrays, maps, enums, nullables) all the way
down, so a schema change that the types do not follow fails here."""
import json
import types
import typing
from pathlib import Path

import pytest

from skyfuse import payloads

SCHEMAS = Path(__file__).parents[2] / "events" / "schemas"
JSON_TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}
PY_TYPES = {str: "str", int: "int", float: "float", bool: "bool", type(None): "None"}


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def from_schema(node: dict, defs: dict) -> frozenset:
    """The shape of a schema node: a set of alternatives, each a name or a (kind, ...) tuple."""
    if "$ref" in node:
        return from_schema(defs[node["$ref"].removeprefix("#/$defs/")], defs)
    if "anyOf" in node:
        return frozenset().union(*(from_schema(n, defs) for n in node["anyOf"]))
    if "enum" in node:
        return frozenset({("enum", frozenset(node["enum"]))})
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    shape = set()
    for kind in kinds:
        if kind == "object" and "properties" in node:
            required = set(node.get("required", ()))
            shape.add(("object", tuple(sorted((name, name in required, from_schema(prop, defs))
                                              for name, prop in node["properties"].items()))))
        elif kind == "object":
            shape.add(("map", from_schema(node["additionalProperties"], defs)))
        elif kind == "array":
            shape.add(("array", from_schema(node["items"], defs)))
        else:
            shape.add(JSON_TYPES[kind])
    return frozenset(shape)


def from_type(hint) -> frozenset:
    """The same shape, read from a TypedDict's annotations."""
    if typing.is_typeddict(hint):
        hints = typing.get_type_hints(hint)  # Required/NotRequired stripped: __required_keys__ says which
        return frozenset({("object", tuple(sorted((name, name in hint.__required_keys__, from_type(h))
                                                  for name, h in hints.items())))})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(from_type(a) for a in args))
    if origin is typing.Literal:
        return frozenset({("enum", frozenset(args))})
    if origin is list:
        return frozenset({("array", from_type(args[0]))})
    if origin is dict:
        assert args[0] is str, f"map keys are strings in JSON, not {args[0]}"
        return frozenset({("map", from_type(args[1]))})
    return frozenset({PY_TYPES[hint]})


def test_every_schema_has_a_payload_type():
    assert set(payloads.BY_TYPE) == {p.name.removesuffix(".json") for p in SCHEMAS.glob("*.json")}


@pytest.mark.parametrize("name", sorted(payloads.BY_TYPE))
def test_the_payload_type_matches_its_schema(name):
    schema = _schema(name)
    assert from_type(payloads.BY_TYPE[name]) == from_schema(schema, schema.get("$defs", {}))


def test_a_difference_is_seen_in_a_nested_object():
    schema = _schema("shard.ready")
    schema["$defs"]["manifest"]["required"].remove("quorum")  # quorum becomes optional in the schema only
    assert from_type(payloads.ShardReady) != from_schema(schema, schema["$defs"])
    schema = _schema("onnx.ready")
    schema["$defs"]["tensor"]["properties"]["dtype"]["enum"].append("bfloat16")
    assert from_type(payloads.OnnxReady) != from_schema(schema, schema["$defs"])
