"""CloudEvents 1.0 for skyfuse: build a validated event, and carry it on Kafka.

On the bus an event is written in binary content mode (`ce_*` headers, JSON `data` as the value,
the contract's key field as the record key); structured mode (one JSON document with
`specversion`) is accepted on input. Validation happens on both sides: `new_event` refuses data
that breaks the schema, and `decode` reports it so the host can dead-letter it.

The local host decodes each record as it arrives (a malformed one is dead-lettered at once), then
calls the entry point in the same process, which decodes it again as it does in a cloud. Around that
call the host says which exact records it has checked (`checked`), and the entry point's `decode`
then only reads them: the checks of the same bytes could not come out otherwise. In a cloud no host
runs before the entry point, and `decode` checks everything.
"""
from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from cloudevents.http import CloudEvent
from cloudevents.kafka import to_binary

from skyfuse import contracts
from skyfuse.errors import InvalidInput

Headers = list[tuple[str, bytes]]


class MalformedEvent(InvalidInput):
    """A record that is not a valid skyfuse CloudEvent; the message says why."""


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def new_event(
    type_name: str,
    data: Mapping[str, Any],
    *,
    source: str,
    subject: str | None = None,
    caused_by: CloudEvent | None = None,
    event_id: str | None = None,
    traceparent: str | None = None,
) -> CloudEvent:
    """A CloudEvent of `type_name` (`shard.ready` or `skyfuse.shard.ready`) carrying `data`.

    Raises `contracts.ContractError` naming each failing field and rule. `caused_by` passes its
    trace on, so every event of one run shares a trace id. `event_id`: a deterministic id (see
    `derived_id`); a fresh uuid4 otherwise.
    """
    kind = contracts.event_type(type_name)
    contracts.validate(kind.name, data)
    attributes = {
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": kind.ce_type,
        "specversion": "1.0",
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "traceparent": traceparent or (caused_by.get("traceparent") if caused_by else None) or new_traceparent(),
    }
    if subject:
        attributes["subject"] = subject
    return CloudEvent(attributes, data)


_IDS = uuid.UUID("5b2f3c1e-8a47-4d0c-9a51-2f6c0e7d9b13")  # namespace of derived event ids


def derived_id(source: str, type_name: str, key: str) -> str:
    """The same id for the same output of the same function, however often it is produced: a
    retried effect publishes a redelivery, never a new event (uuid5 of source, type and key)."""
    return str(uuid.uuid5(_IDS, f"{source}\n{contracts.event_type(type_name).ce_type}\n{key}"))


def topic_of(event: CloudEvent) -> str:
    return contracts.event_type(event["type"]).topic


def key_of(event: CloudEvent) -> bytes | None:
    value = (event.get_data() or {}).get(contracts.event_type(event["type"]).key)
    return None if value is None else str(value).encode()


def encode(event: CloudEvent) -> tuple[bytes | None, bytes, Headers]:
    """(key, value, headers) of the Kafka record for `event`, in binary content mode."""
    message = to_binary(event, data_marshaller=orjson.dumps, key_mapper=lambda _: None)
    value = message.value
    assert isinstance(value, bytes)  # typed str | bytes, but to_binary encodes a str value to UTF-8
    return key_of(event), value, list(message.headers.items())


def decode(key: bytes | None, value: bytes | None, headers: Headers) -> CloudEvent:
    """The CloudEvent in a Kafka record, validated against its contract (unless `checked` says this
    exact record was, a moment ago).

    Raises `MalformedEvent` with a reason a person can act on.
    """
    header_map = {name.lower(): val for name, val in headers}
    known_good = _was_checked(key, value, headers)
    try:
        if "ce_specversion" in header_map:
            if not known_good:
                _require(header_map, "ce_")
            event = _from_binary(header_map, key, value)
        elif value and value.lstrip().startswith(b"{") and b"specversion" in value:
            event = _from_structured(value)
        else:
            raise MalformedEvent(
                "not a CloudEvent: no ce_specversion header (binary mode) and the value is not a "
                "structured-mode JSON CloudEvent"
            )
    except MalformedEvent:
        raise
    except Exception as exc:  # the SDK raises several types for broken envelopes
        raise MalformedEvent(f"not a valid CloudEvent: {exc}") from exc
    if known_good:
        return event
    if event.get("specversion") != "1.0":
        raise MalformedEvent(f"unsupported CloudEvents specversion {event.get('specversion')!r}; expected '1.0'")
    try:
        kind = contracts.event_type(event["type"])
        contracts.validate(kind.name, event.get_data())
    except contracts.ContractError as exc:
        raise MalformedEvent(f"data breaks the {exc.event_type} schema: {'; '.join(exc.errors)}") from exc
    return event


Fingerprint = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]  # a record's exact bytes
# The records whose checks `decode` may skip in this thread (set by `checked`).
_checked: ContextVar[frozenset[Fingerprint] | None] = ContextVar("skyfuse_checked_records", default=None)


@contextlib.contextmanager
def checked(records: Iterable[tuple[bytes | None, bytes | None, Headers]]) -> Iterator[None]:
    """For the block, in this thread: these exact records (key, value, headers) have been decoded
    with every check passed, so `decode` reads them again without repeating the checks."""
    token = _checked.set(frozenset((key, value, tuple(headers)) for key, value, headers in records))
    try:
        yield
    finally:
        _checked.reset(token)


def _was_checked(key: bytes | None, value: bytes | None, headers: Headers) -> bool:
    known = _checked.get()
    if not known:
        return False
    try:
        return (key, value, tuple(headers)) in known
    except TypeError:  # a header that is not a (name, bytes) pair: not one the host checked
        return False


REQUIRED = ("id", "source", "type", "specversion")


def _require(found: Mapping[str, Any], prefix: str = "") -> None:
    """Every required attribute must be in the record itself: the SDK invents a fresh id for a
    record without one, which would give each redelivery another id and defeat deduplication."""
    missing = [name for name in REQUIRED if found.get(prefix + name) in (None, "", b"")]
    if missing:
        raise MalformedEvent(f"not a valid CloudEvent: missing required attribute(s) {', '.join(missing)} "
                             "(binary mode: ce_<name> headers; structured mode: top-level fields)")


def _from_binary(header_map: Mapping[str, bytes], key: bytes | None, value: bytes | None) -> CloudEvent:
    """A binary-mode record, read as the SDK's `cloudevents.kafka.from_binary` reads it (`ce_<name>`
    headers, content-type as datacontenttype, the key as partitionkey), without its per-call wrapping:
    every record is read here, by the host and by the entry point."""
    attributes: dict[str, Any] = {}
    for name, raw in header_map.items():  # names in lower case
        if name == "content-type":
            attributes["datacontenttype"] = raw.decode()
        elif name.startswith("ce_"):
            attributes[name[3:]] = raw.decode()
    if key is not None:
        attributes["partitionkey"] = key
    try:
        data = _json(value)
    except MalformedEvent as exc:
        raise MalformedEvent(f"not a valid CloudEvent: {exc}") from exc
    return CloudEvent(attributes, data)


def _from_structured(value: bytes) -> CloudEvent:
    """A structured-mode record, read from its own JSON envelope (the SDK's reader would let the
    Kafka content-type header, application/cloudevents+json, replace the event's datacontenttype)."""
    envelope = _json(value)
    if not isinstance(envelope, dict):
        raise MalformedEvent("structured-mode value is not a JSON object")
    _require(envelope)
    data = envelope.pop("data", None)
    if "data_base64" in envelope:
        raise MalformedEvent("data_base64 is not accepted: skyfuse events carry JSON data")
    envelope.setdefault("datacontenttype", "application/json")
    if envelope["datacontenttype"] != "application/json":
        raise MalformedEvent(f"datacontenttype {envelope['datacontenttype']!r}: skyfuse events carry application/json")
    return CloudEvent(envelope, data)


def _json(raw: bytes | str | None) -> Any:  # any JSON value
    if raw in (None, b"", ""):
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"value is not JSON: {exc}") from exc


@dataclass(frozen=True)
class EventInfo:
    """What logs and the CLI show of an event."""

    id: str
    type: str
    trace_id: str | None

    @classmethod
    def of(cls, event: CloudEvent) -> EventInfo:
        parent = event.get("traceparent") or ""
        parts = parent.split("-")
        return cls(event["id"], event["type"].removeprefix(contracts.TYPE_PREFIX),
                   parts[1] if len(parts) == 4 else None)
