"""The Kafka bus: Apache Kafka through kafka-python.

Producer with acks=all (a publish returns once the record is durably in the log); consumers with
auto-commit off, committing only what the host says is done; session timeout at least 6 s, the
broker's minimum.
"""
from __future__ import annotations

import threading
from typing import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from skyfuse.bus.base import Bus, Consumer, Headers, Record, RevokeListener, TopicPartition


class KafkaBus(Bus):
    backend = "kafka"

    def __init__(self, bootstrap_servers: str, *, client_id: str = "skyfuse", session_timeout_ms: int = 10_000,
                 request_timeout_ms: int = 30_000, default_partitions: int = 3):
        self.bootstrap = bootstrap_servers
        self.client_id = client_id
        self.session_timeout_ms = session_timeout_ms
        self.request_timeout_ms = request_timeout_ms
        self.default_partitions = default_partitions
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()
        self._admin_lock = threading.RLock()  # KafkaAdminClient is not safe to share between threads

    @property
    def producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all",
                    linger_ms=0, request_timeout_ms=self.request_timeout_ms,
                )
            return self._producer

    @property
    def admin(self) -> KafkaAdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=f"{self.client_id}-admin",
                                               request_timeout_ms=self.request_timeout_ms)
            return self._admin

    def ensure_topics(self, topics: Iterable[str], partitions: int | None = None) -> None:
        with self._admin_lock:
            self._create_missing(list(topics), partitions)

    def _create_missing(self, topics: list[str], partitions: int | None) -> None:
        missing = set(topics) - set(self.admin.list_topics())
        if not missing:
            return
        try:
            self.admin.create_topics(
                [NewTopic(t, partitions or self.default_partitions, 1) for t in sorted(missing)],
                timeout_ms=self.request_timeout_ms,
            )
        except TopicAlreadyExistsError:  # another process won the race
            pass

    def publish(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> Record:
        future = self.producer.send(topic, value=value, key=key, headers=list(headers or []))
        meta = future.get(timeout=self.request_timeout_ms / 1000)
        return Record(topic, meta.partition, meta.offset, key, value, list(headers or []), meta.timestamp)

    def consumer(self, group: str, topics: list[str], on_revoke: RevokeListener | None = None) -> Consumer:
        self.ensure_topics(topics)
        return KafkaGroupConsumer(self, group, topics, on_revoke)

    def topics(self) -> dict[str, int]:
        with self._admin_lock:
            described = {t["name"]: len(t["partitions"]) for t in self.admin.describe_topics()}
        return {name: described[name] for name in sorted(described) if not name.startswith("__")}

    def _reader(self) -> KafkaConsumer:
        return KafkaConsumer(bootstrap_servers=self.bootstrap, client_id=f"{self.client_id}-reader",
                             enable_auto_commit=False, request_timeout_ms=self.request_timeout_ms)

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self.end_offsets_of([topic])[topic]

    def end_offsets_of(self, topics: Iterable[str]) -> dict[str, dict[int, int]]:
        reader = self._reader()
        try:
            topics = list(topics)
            reader.topics()  # one metadata request for all of them
            partitions = [KafkaTP(t, p) for t in topics for p in sorted(reader.partitions_for_topic(t) or ())]
            ends = reader.end_offsets(partitions) if partitions else {}
        finally:
            reader.close()
        out: dict[str, dict[int, int]] = {t: {} for t in topics}
        for tp, offset in ends.items():
            out[tp.topic][tp.partition] = offset
        return out

    def committed(self, group: str, topic: str) -> dict[int, int]:
        with self._admin_lock:
            offsets = self.admin.list_group_offsets(group).get(group, {})
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}

    def read(self, topic: str, limit: int = 1000) -> list[Record]:
        reader = self._reader()
        try:
            partitions = [KafkaTP(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
            reader.assign(partitions)
            reader.seek_to_beginning()
            ends = reader.end_offsets(partitions)
            out: list[Record] = []
            while len(out) < limit and any(reader.position(tp) < ends[tp] for tp in partitions):
                for batch in reader.poll(timeout_ms=1000, max_records=limit - len(out)).values():
                    out.extend(_record(r) for r in batch)
            return sorted(out, key=lambda r: (r.timestamp_ms, r.partition, r.offset))[:limit]
        finally:
            reader.close()

    def tail(self, topic: str, per_partition: int = 100) -> list[Record]:
        reader = self._reader()
        try:
            partitions = [KafkaTP(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
            reader.assign(partitions)
            starts, ends = reader.beginning_offsets(partitions), reader.end_offsets(partitions)
            for tp in partitions:
                reader.seek(tp, max(starts[tp], ends[tp] - per_partition))
            out: list[Record] = []
            while any(reader.position(tp) < ends[tp] for tp in partitions):
                for batch in reader.poll(timeout_ms=1000).values():
                    out.extend(_record(r) for r in batch if r.offset < ends[KafkaTP(r.topic, r.partition)])
            return sorted(out, key=lambda r: (r.timestamp_ms, r.partition, r.offset))
        finally:
            reader.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
        if self._admin is not None:
            self._admin.close()


def _record(r) -> Record:
    return Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []), r.timestamp)


class _Revoke(ConsumerRebalanceListener):
    def __init__(self, callback: RevokeListener | None):
        self.callback = callback

    def on_partitions_revoked(self, revoked):
        if self.callback and revoked:
            self.callback([TopicPartition(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned):
        pass


class KafkaGroupConsumer(Consumer):
    def __init__(self, bus: KafkaBus, group: str, topics: list[str], on_revoke: RevokeListener | None):
        self._consumer = KafkaConsumer(
            bootstrap_servers=bus.bootstrap,
            client_id=f"{bus.client_id}-{group}",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=max(6000, bus.session_timeout_ms),
            heartbeat_interval_ms=max(6000, bus.session_timeout_ms) // 3,
            request_timeout_ms=bus.request_timeout_ms,
        )
        self._join_timeout_s = max(6000, bus.session_timeout_ms) / 1000
        self._consumer.subscribe(topics, listener=_Revoke(on_revoke))

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        # While a (re)join is under way, give poll() time to finish it. kafka-python 3.0 drops a
        # JoinGroup/SyncGroup that completes between two short polls and sends a new one; seen
        # here, the member then stopped heartbeating and was expelled without noticing.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None and coordinator.need_rejoin():
            timeout_s = max(timeout_s, self._join_timeout_s)
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [_record(r) for batch in batches.values() for r in batch]

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if offsets:
            self._consumer.commit({
                KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()
            })

    def close(self) -> None:
        self._consumer.close(autocommit=False)
