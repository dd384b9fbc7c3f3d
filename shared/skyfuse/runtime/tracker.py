"""Which records a host may deliver next, and how far it may commit. Pure logic, no I/O.

Records wait in *lanes*: a partition (ordering "partition"), a key within a partition ("key"), or
each record alone ("unordered"). Only the head of a lane may be tried; when it fails, the records
behind it wait. The commit position of a partition is its first record not yet finished
(succeeded or dead-lettered), so a later success never commits past an earlier failure.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from skyfuse.bus.base import Record, TopicPartition

if TYPE_CHECKING:
    from cloudevents.http import CloudEvent

Ordering = Literal["partition", "key", "unordered"]
# a partition; a key within a partition; one record alone (its offset)
Lane = tuple[str, int] | tuple[str, int, bytes | None] | tuple[str, int, int]


def lane(ordering: Ordering, topic: str, partition: int, key: bytes | None, offset: int) -> Lane:
    """The lane of a record: its partition, its key within the partition, or itself alone. Every
    place that keeps records in order (the local host's tracker, the Lambda Kafka batch) asks here."""
    if ordering == "partition":
        return topic, partition
    if ordering == "key":
        return topic, partition, key
    if ordering == "unordered":
        return topic, partition, offset
    raise ValueError(f"ordering {ordering!r} is not one of partition, key, unordered")


@dataclass
class Pending:
    record: Record
    event: CloudEvent | None = None  # the decoded CloudEvent (None when it could not be decoded)
    invalid: str | None = None  # set when the record cannot be delivered at all (malformed)
    arrived: float = 0.0  # monotonic time the host received it
    cost: int = 0  # bytes it adds to the cloud's native event (the invoker's `cost`)
    attempts: int = 0
    first_failed: float | None = None  # monotonic time of the first failure (the record's age for max_record_age_s)
    not_before: float = 0.0
    last_error: str = ""
    done: bool = False
    in_flight: bool = False


@dataclass
class Backoff:
    """Exponential backoff with full jitter (the AWS architecture blog's recommendation)."""

    initial_s: float = 0.2
    max_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempts: int) -> float:
        return self.rng.uniform(0, min(self.max_s, self.initial_s * 2 ** (attempts - 1)))


class Tracker:
    def __init__(self, ordering: Ordering = "partition"):
        self.ordering = ordering
        # per partition, in offset order: the records not finished yet, and finished ones behind them
        self.partitions: dict[TopicPartition, dict[int, Pending]] = {}
        self.finished: dict[TopicPartition, int] = {}  # the position after each partition's finished prefix
        self.committed: dict[TopicPartition, int] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.partitions.values())

    def add(self, pending: Pending) -> None:
        record = pending.record
        self.partitions.setdefault(record.tp, {})[record.offset] = pending

    def lane(self, pending: Pending) -> Lane:
        r = pending.record
        return lane(self.ordering, r.topic, r.partition, r.key, r.offset)

    def lanes(self) -> dict[Lane, list[Pending]]:
        """Unfinished records per lane, in offset order."""
        out: dict[Lane, list[Pending]] = {}
        for records in self.partitions.values():
            for pending in records.values():
                if not pending.done:
                    out.setdefault(self.lane(pending), []).append(pending)
        return out

    def ready(self, now: float) -> list[list[Pending]]:
        """For each lane whose head may go now: the head and every record behind it."""
        out = []
        for queue in self.lanes().values():
            head = queue[0]
            if not head.in_flight and head.invalid is None and head.not_before <= now:
                out.append(queue)
        return out

    def invalid(self) -> list[Pending]:
        """Malformed records at the head of their lane: dead-letter them now, in order."""
        return [queue[0] for queue in self.lanes().values() if queue[0].invalid is not None]

    def next_due(self) -> float | None:
        """When the earliest waiting retry becomes due."""
        heads = [q[0].not_before for q in self.lanes().values() if q[0].attempts and not q[0].in_flight]
        return min(heads, default=None)

    def finish(self, pending: Pending) -> None:
        pending.done, pending.in_flight = True, False

    def forget_finished(self) -> None:
        """Forget each partition's finished prefix, keeping only its position: that is all a commit
        needs, and a commit may come a while later (the host calls this once a step)."""
        for tp, records in self.partitions.items():
            prefix = []
            for offset, pending in records.items():
                if not pending.done:
                    break
                prefix.append(offset)
            if prefix:
                for offset in prefix:
                    del records[offset]
                self.finished[tp] = prefix[-1] + 1

    def commit_positions(self) -> dict[TopicPartition, int]:
        """Partitions whose finished prefix grew past the last commit, with the new position. They
        are offered until `committed_to` confirms the commit, so a failed commit is tried again."""
        self.forget_finished()
        return {tp: position for tp, position in self.finished.items() if position > self.committed.get(tp, -1)}

    def committed_to(self, positions: dict[TopicPartition, int]) -> None:
        """The bus has these positions committed."""
        for tp, position in positions.items():
            self.committed[tp] = max(position, self.committed.get(tp, -1))

    def drop(self, partitions: list[TopicPartition]) -> None:
        """Forget partitions this host no longer owns (after a rebalance)."""
        for tp in partitions:
            self.partitions.pop(tp, None)
            self.finished.pop(tp, None)
            self.committed.pop(tp, None)
