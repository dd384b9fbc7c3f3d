"""What the host needs of a cloud: its batch limits and how to invoke an entry point with a batch.

One file per cloud beside this one holds both sides of that cloud's Kafka trigger: the host side
(build the native event, call the entry point, read back which records failed) and the function
side (turn the native event back into neutral CloudEvents for the handler core).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

from cloudevents.http import CloudEvent

from skyfuse.bus.base import Record


@dataclass(frozen=True)
class Limits:
    max_records: int  # records per invocation
    max_wait_s: float  # how long to gather a batch before invoking anyway
    max_bytes: int  # invocation payload limit, as the native event is encoded


@dataclass
class Outcome:
    """Which records of a batch failed (by index), and why.

    `untried` marks records the invoker stopped short of. `whole` marks an invocation that failed as
    a whole (the entry point raised): the failure cannot be pinned on one record, so the host
    retries the records one at a time to find it.
    """

    failed: dict[int, str] = field(default_factory=dict)
    whole: bool = False
    untried: set[int] = field(default_factory=set)  # not delivered at all: they go again, no attempt counted
    permanent: set[int] = field(default_factory=set)  # failed in a way no retry can fix: dead-letter at once

    @classmethod
    def all_failed(cls, size: int, reason: str) -> Outcome:
        return cls({i: reason for i in range(size)}, whole=True)


class Invoker(abc.ABC):
    provider: str
    shape: str  # what the native event is called, for logs and the CLI
    limits: Limits

    def cost(self, record: Record) -> int:
        """Bytes `record` adds to the native event."""
        return record.size

    @abc.abstractmethod
    def invoke(self, batch: list[tuple[Record, CloudEvent]]) -> Outcome:
        """Call the entry point once with `batch` in the cloud's native shape."""
