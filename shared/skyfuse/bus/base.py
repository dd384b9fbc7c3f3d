"""The bus contract every backend keeps.

Topics have partitions; a record's partition comes from its key (Kafka's murmur2 partitioner, so
a key lands in the same partition on every backend); a consumer group reads each partition in
offset order and resumes from its committed offset. Commits name the *next* offset to read, as
Kafka's do.
"""
from __future__ import annotations

import abc
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Self

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}-{self.partition}"


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    timestamp_ms: int = 0

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"") + sum(len(k) + len(v) for k, v in self.headers)


def partition_for(key: bytes | None, partitions: int) -> int:
    """Kafka's default partitioner: murmur2 of the key, or any partition for no key."""
    from kafka.partitioner.default import murmur2  # here: importing kafka-python costs ~0.1 s of a cold start

    if key is None:
        return random.randrange(partitions)
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


# Called with the partitions a consumer is about to lose, before it loses them.
RevokeListener = Callable[[list[TopicPartition]], None]


class Consumer(abc.ABC):
    """One member of a consumer group; use from one thread."""

    @abc.abstractmethod
    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Records after the last one returned, in offset order per partition."""

    @abc.abstractmethod
    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Store, for each partition, the next offset the group should read."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bus(abc.ABC):
    """A backend: producer, consumer factory and the read-only views `status` needs."""

    backend: str = "?"

    @abc.abstractmethod
    def ensure_topics(self, topics: Iterable[str], partitions: int | None = None) -> None:
        """Create the topics that do not exist yet (idempotent), with `partitions` each (default: the
        backend's)."""

    @abc.abstractmethod
    def publish(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> Record:
        """Append durably (acks=all on Kafka); returns the stored record with its offset."""

    @abc.abstractmethod
    def consumer(self, group: str, topics: list[str], on_revoke: RevokeListener | None = None) -> Consumer:
        """A group member reading `topics` from the group's committed offsets (earliest if none)."""

    @abc.abstractmethod
    def topics(self) -> dict[str, int]:
        """Every topic with its partition count."""

    @abc.abstractmethod
    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the next record will get."""

    @abc.abstractmethod
    def committed(self, group: str, topic: str) -> dict[int, int]:
        """Per partition, the group's committed offset (absent where it has none)."""

    @abc.abstractmethod
    def read(self, topic: str, limit: int = 1000) -> list[Record]:
        """The first `limit` records of `topic` from the beginning, outside any group."""

    @abc.abstractmethod
    def tail(self, topic: str, per_partition: int = 100) -> list[Record]:
        """The last `per_partition` records of each partition of `topic`, oldest first: the
        latest state without reading the log from its beginning."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's connections and files."""

    def end_offsets_of(self, topics: Iterable[str]) -> dict[str, dict[int, int]]:
        """`end_offsets` of several topics (a backend may fetch them in one round trip)."""
        return {topic: self.end_offsets(topic) for topic in topics}

    def lag(self, group: str, topic: str, ends: dict[int, int] | None = None) -> int:
        ends = self.end_offsets(topic) if ends is None else ends
        done = self.committed(group, topic)
        return sum(end - done.get(p, 0) for p, end in ends.items())

    def count(self, topic: str) -> int:
        return sum(self.end_offsets(topic).values())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
