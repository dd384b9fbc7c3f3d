"""The event contracts in `events/`: which event types exist, their topics, keys, consumers and
the JSON Schema of each one's `data`. The folder is data; this module only reads it."""
from __future__ import annotations

import importlib.util
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyfuse.errors import InvalidInput

if TYPE_CHECKING:
    import jsonschema_rs
    from jsonschema import Draft202012Validator

TYPE_PREFIX = "skyfuse."  # CloudEvent `type` attribute = prefix + event type name


def events_dir() -> Path:
    """`SKYFUSE_EVENTS_DIR`, else the folder of the data package `skyfuse._events`: the repo's
    `events/` (their single source) in an editable install, the wheel's copy in an installed one."""
    override = os.environ.get("SKYFUSE_EVENTS_DIR")
    return Path(override) if override else _packaged_events()


@cache
def _packaged_events() -> Path:
    spec = importlib.util.find_spec("skyfuse._events")  # mapped in by pyproject.toml's package-dir
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent / "_events"


@dataclass(frozen=True)
class EventType:
    name: str  # e.g. "shard.ready"
    topic: str
    key: str  # the data field that becomes the Kafka key (same key: same partition, in order)
    consumers: tuple[str, ...]
    description: str
    producers: tuple[str, ...] = ()  # "function" (any cloud's), "function@control" (the control cloud's), "cli"
    cloud_field: str | None = None  # data field naming the cloud the event speaks for: the signer's own

    @property
    def ce_type(self) -> str:
        return TYPE_PREFIX + self.name


class ContractError(InvalidInput):
    """Data that breaks its event type's contract; `errors` holds one line per violation."""

    def __init__(self, event_type: str, errors: list[str]):
        self.event_type = event_type
        self.errors = errors
        super().__init__(f"{event_type}: " + "; ".join(errors))


@cache
def catalog() -> dict[str, EventType]:
    path = events_dir() / "catalog.toml"
    raw = tomllib.loads(path.read_text())
    return {
        name: EventType(
            name=name,
            topic=entry["topic"],
            key=entry["key"],
            consumers=tuple(entry.get("consumers", ())),
            description=entry.get("description", ""),
            producers=tuple(entry.get("producers", ())),
            cloud_field=entry.get("cloud_field"),
        )
        for name, entry in raw.items()
    }


def event_type(name: str) -> EventType:
    """Look up an event type by name (`shard.ready`) or CloudEvent type (`skyfuse.shard.ready`)."""
    name = name.removeprefix(TYPE_PREFIX)
    types = catalog()
    if name not in types:
        raise ContractError(name, [f"unknown event type; expected one of: {', '.join(sorted(types))}"])
    return types[name]


def producer_error(name: str, signer: str, data: Mapping[str, Any] | None, control_cloud: str) -> str | None:
    """Why `signer` (`cloud/function` or `cli`, a verified signer) may not emit this event, or None."""
    kind = event_type(name)
    cloud, _, function = signer.rpartition("/")  # "cli": no cloud
    allowed = {p for p in kind.producers if p.partition("@")[0] == function}
    if not allowed:
        return f"{signer} may not emit {kind.name}: events/catalog.toml allows only {', '.join(kind.producers)}"
    if cloud and allowed == {f"{function}@control"} and cloud != control_cloud:
        return f"{signer} may not emit {kind.name}: only the control cloud's ({control_cloud}) {function} may"
    claimed = (data or {}).get(kind.cloud_field) if cloud and kind.cloud_field else cloud
    if claimed != cloud:
        return f"{signer} may not speak for cloud {str(claimed)[:40]!r} ({kind.cloud_field}): only for its own"
    return None


def topics_for(function: str) -> list[str]:
    """The topics that trigger `function`, in catalog order."""
    return [t.topic for t in catalog().values() if function in t.consumers]


def event_functions() -> list[str]:
    """The functions events trigger, in the order the catalog first names them."""
    seen: list[str] = []
    for event_type in catalog().values():
        seen.extend(f for f in event_type.consumers if f not in seen)
    return seen


def dlq_topic(function: str) -> str:
    return f"{function}.dlq"


@cache
def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((events_dir() / "schemas" / f"{name}.json").read_text())
    return schema


@cache
def _validator(name: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator  # here: not every process validates (cold start)

    return Draft202012Validator(_schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER)


@cache
def _fast_validator(name: str) -> jsonschema_rs.Validator:
    """jsonschema-rs (compiled; ~100x faster) for the yes/no every delivered event needs; the
    errors of a no are worded by `jsonschema` (`validation_errors`)."""
    import jsonschema_rs

    return jsonschema_rs.validator_for(_schema(name), validate_formats=True)


def validation_errors(name: str, data: object) -> list[str]:
    """Every way `data` breaks the schema, as `field: rule` lines ("(root)" for the object)."""
    errors = sorted(_validator(event_type(name).name).iter_errors(data), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path.removeprefix('$.') if e.absolute_path else '(root)'}: {e.message}" for e in errors]


def validate(name: str, data: object) -> None:
    name = event_type(name).name
    fast = _fast_validator(name)
    try:
        if fast.is_valid(data):
            return
    except (ValueError, TypeError):  # a Python value JSON has no type for: the full check words it
        pass
    errors = validation_errors(name, data)
    if not errors:  # the compiled checker is the stricter here: say what it saw
        errors = [f"{e.instance_path and '.'.join(map(str, e.instance_path)) or '(root)'}: {e.message}"
                  for e in fast.iter_errors(data)] or ["does not match the schema"]
    raise ContractError(name, errors)


def sample(name: str) -> dict[str, Any]:
    """The valid example of `name`'s data shipped in `events/samples/`."""
    data: dict[str, Any] = json.loads((events_dir() / "samples" / f"{event_type(name).name}.json").read_text())
    return data
