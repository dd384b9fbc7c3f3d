"""Dead letters: the original record (key, value, headers) plus `skyfuse_dlq_*` headers saying
where it came from and why it was given up; written by the host or by a function that rejects an
event it can never handle."""
from __future__ import annotations

from skyfuse import contracts
from skyfuse.bus.base import Bus, Headers
from skyfuse.redact import redact

PREFIX = "skyfuse_dlq_"


def write(bus: Bus, function: str, cloud: str, key: bytes | None, value: bytes | None, headers: Headers,
          reason: str, *, topic: str = "", partition: int | None = None, offset: int | None = None,
          attempts: int = 0) -> None:
    context = {"reason": redact(reason), "function": function, "cloud": cloud, "topic": topic,
               "partition": "" if partition is None else str(partition),
               "offset": "" if offset is None else str(offset), "attempts": str(attempts)}
    extra = [(PREFIX + name, text.encode()) for name, text in context.items()]
    bus.publish(contracts.dlq_topic(function), value or b"", key, [*headers, *extra])


def describe(headers: Headers) -> dict[str, str]:
    """The `skyfuse_dlq_*` context of a dead letter, without the prefix, plus its event id."""
    out = {k.removeprefix(PREFIX): v.decode(errors="replace") for k, v in headers if k.startswith(PREFIX)}
    out["event_id"] = next((v.decode() for k, v in headers if k == "ce_id"), "")
    return out


def summary(headers: Headers) -> dict[str, str | int | None]:
    """One dead letter as `skyfuse dlq` lists it: cloud, where it came from, event id, attempts, reason."""
    d = describe(headers)
    where = (f"{d.get('topic')}[{d.get('partition')}]@{d.get('offset')}" if d.get("topic")
             else "rejected by the function")
    return {"cloud": d.get("cloud"), "from": where, "event_id": d["event_id"], "attempts": int(d.get("attempts") or 0),
            "reason": d.get("reason")}
