"""What a running function instance has: its cloud, the fleet config, a way to emit events, a logger.

In a real cloud it is built from the environment (`SKYFUSE_CLOUD`, the bus settings as
`SKYFUSE_BUS__*`); under the local function host, the host provides it for the duration of each
invocation, so one process can host the same entry point for several clouds.

Emitting, signing and dead-lettering are imported where they are used: a server that only answers
requests (inference) starts without loading cloudevents, cryptography or the bus (cold start).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from skyfuse import config as fleet_config
from skyfuse import tracing
from skyfuse.errors import SkyfuseError
from skyfuse.redact import redact
from skyfuse.storage import Store, open_store

if TYPE_CHECKING:
    from cloudevents.http import CloudEvent

    from skyfuse import signing
    from skyfuse.bus import Bus
    from skyfuse.runtime.idempotency import Claim, Idempotency

T = TypeVar("T")


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with whatever `extra=` fields the call site gave."""

    skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {"level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in self.skip})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(doc, default=str).decode())


KEEP = 1000  # recent events a runtime remembers (`Runtime.keep`): a long-running host must not grow without bound


@dataclass
class Runtime:
    cloud: str
    function: str
    fleet: fleet_config.Fleet
    bus_factory: Callable[[], Bus] | None = None
    emitted: list[CloudEvent] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)  # ids of events this instance received
    settings: fleet_config.Function | None = None  # default: the fleet config's [functions.<name>]
    # event id → seconds until another instance's idempotency claim on its work expires; the local
    # host waits that long instead of spending attempts (a real cloud retries on its own policy)
    claimed_elsewhere: dict[str, float] = field(default_factory=dict)
    # event id → why this function dead-lettered it itself (untrusted, or refused by the core), one
    # reason per record (a batch may hold the same id twice): the local host reports those
    # deliveries as "rejected", not "ok"
    rejected: dict[str, list[str]] = field(default_factory=dict)
    keep: int = KEEP  # the most entries each of emitted, handled, claimed_elsewhere and rejected holds

    @property
    def function_settings(self) -> fleet_config.Function:
        return self.settings or self.fleet.function(self.function)

    @cached_property
    def bus(self) -> Bus:
        from skyfuse.bus import open_bus

        return self.bus_factory() if self.bus_factory else open_bus(self.fleet)

    @cached_property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"skyfuse.{self.cloud}.{self.function}")

    @property
    def principal(self) -> str:
        from skyfuse import signing

        return signing.principal(self.cloud, self.function)

    @property
    def source(self) -> str:
        from skyfuse import signing

        return signing.source_of(self.principal)

    @cached_property
    def signer(self) -> signing.Signer | None:
        from skyfuse import signing

        return signing.signer_for(self.fleet, self.principal)

    def emit(self, type_name: str, data: Mapping[str, Any], caused_by: CloudEvent | None = None,
             dedupe_key: str | None = None, traceparent: str | None = None) -> CloudEvent:
        """Validate, then publish an event; returns it. With `dedupe_key` (what the output is, e.g.
        its idempotency key) its id is derived from it, so doing the same work again publishes the
        same event again, which consumers drop as a redelivery; without, a fresh id.

        It is published in a PRODUCER span (`skyfuse.tracing.producing`) and its traceparent names
        that span: the trace of `traceparent`, else of `caused_by`, else of the event being handled,
        goes on (a fresh one only with none of them)."""
        from skyfuse import events

        event_id = events.derived_id(self.source, type_name, dedupe_key) if dedupe_key is not None else None
        event = events.new_event(type_name, data, source=self.source, subject=data.get("cloud"), caused_by=caused_by,
                                 event_id=event_id, traceparent=traceparent)
        parent = traceparent or (caused_by.get("traceparent") if caused_by is not None else None)
        with tracing.producing(event, self.fleet, self.function, self.cloud, parent=parent):
            if self.signer:  # after the traceparent is set; it is not part of the signed bytes
                self.signer.sign(event)
            key, value, headers = events.encode(event)
            self.bus.publish(events.topic_of(event), value, key, headers)
        _append_bounded(self.emitted, event, self.keep)
        return event

    def idempotency(self) -> Idempotency:
        """The idempotency layer (`skyfuse.runtime.idempotency`), kept in this cloud's store."""
        from skyfuse.runtime.idempotency import Idempotency

        owner = f"{self.cloud}.{self.function}@{os.uname().nodename}:{os.getpid()}"
        return Idempotency(self.store(), self.function, owner, self.fleet.delivery.claim_timeout_s)

    def once(self, key: str) -> contextlib.AbstractContextManager[Claim]:
        """`with runtime.once(key) as claim:` the work of `key`, done once (see `idempotency`)."""
        return self.idempotency().once(key)

    def done(self, key: str) -> bool:
        """Whether the work of `key` completed."""
        return (self.idempotency().status(key) or {}).get("status") == "completed"

    @cached_property
    def store_roots(self) -> dict[str, str]:
        from skyfuse.storage.confine import store_root

        return {name: store_root(c.store) for name, c in self.fleet.clouds.items()}

    def fetch(self, uri: str, sha256: str | None) -> bytes:
        """The object at `uri`, a URI from an event: refused unless it lies inside one of the fleet's
        stores and comes with the digest it must have (`skyfuse.storage.confine`)."""
        from skyfuse.storage import StoreError
        from skyfuse.storage.confine import locate

        if not sha256:
            raise StoreError(f"{uri}: no sha256 came with it, so it cannot be checked; refused")
        _, root, key = locate(uri, self.store_roots)
        return open_store(root).get(key, sha256)

    def store(self, cloud: str | None = None) -> Store:
        """The object store of `cloud` (default: the cloud this function runs in)."""
        return open_store(self.fleet.clouds[cloud or self.cloud].store)

    @property
    def control_cloud(self) -> str:
        """Where the run-wide functions (fuser, scheduler) act and keep their state."""
        return self.fleet.control_cloud or next(iter(self.fleet.clouds))

    def reject(self, event: CloudEvent, reason: str) -> None:
        """Dead-letter an event this function can never handle, with the reason; the delivery
        then counts as done, so the trigger does not retry it."""
        from skyfuse import events
        from skyfuse.runtime import deadletter

        key, value, headers = events.encode(event)
        deadletter.write(self.bus, self.function, self.cloud, key, value, headers, reason)
        if len(self.rejected) >= self.keep:  # in a real cloud nothing reads them back
            self.rejected.clear()
        self.rejected.setdefault(event["id"], []).append(reason)
        self.log.warning("rejected", extra={"event_id": event["id"], "reason": reason, "cloud": self.cloud,
                                            "function": self.function})

    def received(self, event: CloudEvent, note: str = "handled") -> None:
        from skyfuse import events

        info = events.EventInfo.of(event)
        _append_bounded(self.handled, info.id, self.keep)
        self.log.info(note, extra={"event_id": info.id, "event_type": info.type, "trace_id": info.trace_id,
                                   "cloud": self.cloud, "function": self.function})


def _append_bounded(items: list[T], item: T, keep: int) -> None:
    items.append(item)
    if len(items) > keep:
        del items[: len(items) - keep]


_current: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("skyfuse_runtime", default=None)


@contextlib.contextmanager
def hosted(runtime: Runtime) -> Iterator[Runtime]:
    """Make `runtime` the one `current()` returns, in this thread, for the block."""
    token = _current.set(runtime)
    try:
        yield runtime
    finally:
        _current.reset(token)


_from_env: dict[str, Runtime] = {}


def current(function: str) -> Runtime:
    """The runtime of this invocation: the host's, else one built once from the environment."""
    runtime = _current.get()
    if runtime is not None:
        return runtime
    if function not in _from_env:
        cloud = os.environ.get("SKYFUSE_CLOUD")
        if not cloud:
            raise RuntimeError(f"{function}: set SKYFUSE_CLOUD to the name of the cloud this function runs in "
                               "(one of the [clouds] of the fleet config)")
        _from_env[function] = Runtime(cloud=cloud, function=function, fleet=fleet_config.load())
    return _from_env[function]


Handler = Callable[["CloudEvent", Runtime], None]


class Rejected(SkyfuseError):
    """Raised by a handler core for an event that will never succeed (bad shard, failed parity):
    the entry point dead-letters it with this reason instead of letting the trigger retry it."""


def run_handler(handle: Handler, event: CloudEvent, runtime: Runtime) -> None:
    """What every entry point does with one event: check who sent it, run the core; dead-letter
    what is untrusted or what the core rejects. All of it in a CONSUMER span, child of the span
    that published the event (`skyfuse.tracing.consuming`), with its outcome."""
    from skyfuse import signing
    from skyfuse.runtime.idempotency import InProgress

    try:
        signing.check(runtime.fleet, event)
        untrusted = None
    except signing.Untrusted as exc:
        untrusted = exc
    with tracing.consuming(event, runtime.fleet, runtime.function, runtime.cloud, trusted=untrusted is None) as span:
        if untrusted is not None:
            tracing.outcome(span, "untrusted", f"untrusted: {untrusted}")
            runtime.reject(event, f"untrusted: {untrusted}")
            return
        try:
            handle(event, runtime)
        except Rejected as exc:
            tracing.outcome(span, "rejected", str(exc))
            runtime.reject(event, str(exc))
            return
        except InProgress as exc:
            tracing.outcome(span, "deferred", str(exc))
            if len(runtime.claimed_elsewhere) >= runtime.keep:  # in a real cloud no local host reads them back
                runtime.claimed_elsewhere.clear()
            runtime.claimed_elsewhere[event["id"]] = exc.retry_after_s
            raise
        except BaseException as exc:
            tracing.outcome(span, "failed", exc)
            raise
        tracing.outcome(span, "handled")
