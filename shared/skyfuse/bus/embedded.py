"""The embedded bus: a durable log in one SQLite file, no server needed.

SQLite in WAL mode gives what a log needs: appends that survive a crash (synchronous=FULL), readers
that never block the writer, and several processes on one file (`skyfuse up` in one terminal,
`skyfuse publish` in another). Offsets are dense per partition, as on Kafka.

Each record also has its topic's append number (`seq`), which orders `read` and `tail`, and its
timestamp never goes back within a topic (taken inside the append's transaction, at least the
topic's last), so a clock step cannot reorder the log. Records older than `retention_ms` are
deleted now and then, except the newest of each partition, so offsets stay dense and go on.

A consumer group has one active member at a time: it holds an exclusive `flock` on the group's lock
file. The OS drops that lock the moment the holder dies, so a restarted host takes over at once,
while a second live member waits as a standby. Scale out with the Kafka backend.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from skyfuse.bus.base import Bus, Consumer, Headers, Record, RevokeListener, TopicPartition, partition_for
from skyfuse.errors import Failure

SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL, key BLOB, value BLOB, headers BLOB NOT NULL, seq INTEGER,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS topic_clock (topic TEXT PRIMARY KEY, last_ms INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
"""


class LogError(Failure):
    """The log file cannot be opened: what is wrong with it, and what to do."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _open_log(db_path: Path) -> sqlite3.Connection:
    """A connection to the log, made ready (WAL, tables, columns) under an exclusive `flock`: processes
    opening a fresh log at once (`skyfuse up` and `skyfuse status`) would otherwise race, and SQLite
    answers "database is locked" to a second switch to WAL without waiting for the first."""
    with open(db_path.with_name("log.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        try:
            conn = _connect(db_path)
            conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: later connections are in WAL too
            conn.executescript(SCHEMA)
            if "seq" not in {row[1] for row in conn.execute("PRAGMA table_info(records)")}:
                conn.execute("ALTER TABLE records ADD COLUMN seq INTEGER")  # a log from before seq
        except sqlite3.DatabaseError as exc:
            damaged = not isinstance(exc, sqlite3.OperationalError)  # not locked, not a folder we cannot write
            raise LogError(f"cannot open the embedded bus log {db_path} ({exc})" + (
                ": it is damaged, or not a skyfuse log; move it aside (a new, empty log is made in its place) "
                "or set bus.embedded.path to another folder" if damaged else "")) from None
        return conn


def _pack_headers(headers: Headers) -> bytes:
    return orjson.dumps([[k, base64.b64encode(v).decode()] for k, v in headers])


class _Appends:
    """This process's appends to one log file, announced to this process's consumers of the topic:
    an idle consumer sleeps until one (or until it next looks for other processes' appends, which
    SQLite cannot announce), and only the topic's consumers wake."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consumers: dict[str, set[threading.Event]] = {}

    def note(self, topic: str) -> None:
        with self._lock:
            for appended in self._consumers.get(topic, ()):
                appended.set()

    def watch(self, topics: Iterable[str], appended: threading.Event) -> None:
        with self._lock:
            for topic in topics:
                self._consumers.setdefault(topic, set()).add(appended)

    def unwatch(self, topics: Iterable[str], appended: threading.Event) -> None:
        with self._lock:
            for topic in topics:
                self._consumers.get(topic, set()).discard(appended)


# per log file: every bus object on it in this process shares one, kept while any of them lives
_APPENDS: weakref.WeakValueDictionary[Path, _Appends] = weakref.WeakValueDictionary()
_APPENDS_LOCK = threading.Lock()


def _appends(db_path: Path) -> _Appends:
    key = db_path.resolve()
    with _APPENDS_LOCK:
        found = _APPENDS.get(key)
        if found is None:
            found = _APPENDS[key] = _Appends()
        return found


def _unpack_headers(raw: bytes) -> Headers:
    return [(k, binascii.a2b_base64(v)) for k, v in orjson.loads(raw)]  # b64decode without its wrapper: every read


class EmbeddedBus(Bus):
    backend = "embedded"

    TRIM_EVERY = 1000  # publishes between two retention passes (per process)
    # how soon an idle consumer sees another process's append; one of this process wakes it at once
    # (polling more often only takes the GIL from the busy threads of a fleet in one process)
    OTHER_PROCESSES_S = 0.1

    def __init__(self, path: str | os.PathLike[str], default_partitions: int = 3,
                 retention_ms: int = 7 * 86_400_000, clock: Callable[[], float] = time.time):
        self.retention_ms, self.clock = retention_ms, clock
        self._since_trim = 0
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "groups").mkdir(exist_ok=True)
        self.db_path = self.dir / "log.sqlite"
        self.appends = _appends(self.db_path)
        self.default_partitions = default_partitions
        self._lock = threading.Lock()
        self._conn = _open_log(self.db_path)
        self.trim()

    def ensure_topics(self, topics: Iterable[str], partitions: int | None = None) -> None:
        with self._lock:
            self._conn.executemany(
                "INSERT OR IGNORE INTO topics VALUES (?, ?)",
                [(t, partitions or self.default_partitions) for t in topics],
            )

    def _partitions(self, topic: str) -> int:
        row = self._conn.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
        if row:
            count: int = row[0]
            return count
        self._conn.execute("INSERT OR IGNORE INTO topics VALUES (?, ?)", (topic, self.default_partitions))
        return self.default_partitions

    def publish(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> Record:
        headers = list(headers or [])
        with self._lock:
            partition = partition_for(key, self._partitions(topic))
            self._conn.execute("BEGIN IMMEDIATE")  # serialises appenders across processes
            try:
                (offset,) = self._conn.execute(
                    "SELECT COALESCE(MAX(offset) + 1, 0) FROM records WHERE topic = ? AND partition = ?",
                    (topic, partition),
                ).fetchone()
                self._conn.execute(
                    "INSERT INTO topic_clock VALUES (?, ?, 0) "
                    "ON CONFLICT (topic) DO UPDATE SET last_ms = MAX(last_ms, excluded.last_ms), seq = seq + 1",
                    (topic, int(self.clock() * 1000)))
                now, seq = self._conn.execute("SELECT last_ms, seq FROM topic_clock WHERE topic = ?",
                                              (topic,)).fetchone()
                self._conn.execute(
                    "INSERT INTO records (topic, partition, offset, timestamp_ms, key, value, headers, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (topic, partition, offset, now, key, value, _pack_headers(headers), seq),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._since_trim += 1
        self.appends.note(topic)
        if self._since_trim >= self.TRIM_EVERY:
            self.trim()
        return Record(topic, partition, offset, key, value, headers, now)

    def trim(self) -> int:
        """Delete records past retention, keeping each partition's newest; returns how many."""
        cutoff = int(self.clock() * 1000) - self.retention_ms
        with self._lock:
            self._since_trim = 0
            deleted = self._conn.execute(
                "DELETE FROM records WHERE timestamp_ms < ? AND offset < (SELECT MAX(r.offset) FROM records r "
                "WHERE r.topic = records.topic AND r.partition = records.partition)", (cutoff,)).rowcount
        return deleted

    def consumer(self, group: str, topics: list[str], on_revoke: RevokeListener | None = None) -> Consumer:
        self.ensure_topics(topics)
        return EmbeddedConsumer(self, group, topics)

    def topics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT name, partitions FROM topics ORDER BY name").fetchall())

    def end_offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            partitions = self._partitions(topic)
            rows = dict(self._conn.execute(
                "SELECT partition, MAX(offset) + 1 FROM records WHERE topic = ? GROUP BY partition", (topic,)
            ).fetchall())
        return {p: rows.get(p, 0) for p in range(partitions)}

    def committed(self, group: str, topic: str) -> dict[int, int]:
        with self._lock:
            return dict(self._conn.execute(
                "SELECT partition, offset FROM offsets WHERE grp = ? AND topic = ?", (group, topic)
            ).fetchall())

    def read(self, topic: str, limit: int = 1000) -> list[Record]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT topic, partition, offset, key, value, headers, timestamp_ms FROM records "
                "WHERE topic = ? ORDER BY seq, timestamp_ms, partition, offset LIMIT ?", (topic, limit)
            ).fetchall()
        return [_record(row) for row in rows]

    def tail(self, topic: str, per_partition: int = 100) -> list[Record]:
        rows = []
        with self._lock:
            for partition in range(self._partitions(topic)):  # range scans on the primary key
                (end,) = self._conn.execute("SELECT MAX(offset) FROM records WHERE topic = ? AND partition = ?",
                                            (topic, partition)).fetchone()
                if end is not None:
                    rows += self._conn.execute(
                        "SELECT topic, partition, offset, key, value, headers, timestamp_ms, seq FROM records "
                        "WHERE topic = ? AND partition = ? AND offset > ?", (topic, partition, end - per_partition),
                    ).fetchall()
        rows.sort(key=lambda row: (row[7] if row[7] is not None else -1, row[6], row[1], row[2]))
        return [_record(row[:7]) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _record(row: Sequence[Any]) -> Record:
    topic, partition, offset, key, value, headers, ts = row
    return Record(topic, partition, offset, key, value, _unpack_headers(headers), ts)


class EmbeddedConsumer(Consumer):
    def __init__(self, bus: EmbeddedBus, group: str, topics: list[str]):
        self.bus, self.group, self.topics = bus, group, list(topics)
        self._conn = _connect(bus.db_path)
        self._lock_file = open(bus.dir / "groups" / f"{group}.lock", "a+")
        self._active = False
        self._positions: dict[TopicPartition, int] = {}
        # the topics' appends so far (topic_clock) when a fetch last read every partition to its end:
        # while that count stands, nothing new is there to read
        self._drained_at: int | None = None
        self._short = True  # the last read found less than a batch (as good as, before the first)
        self._appended = threading.Event()  # set by this process's appends to the topics
        bus.appends.watch(self.topics, self._appended)

    def _claim(self) -> bool:
        """Become the group's active member if no live process is."""
        if not self._active:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._active = True
            self._positions, self._drained_at, self._short = {}, None, True
            rows = self._conn.execute(
                "SELECT topic, partition, offset FROM offsets WHERE grp = ? "
                f"AND topic IN ({','.join('?' * len(self.topics))})",
                (self.group, *self.topics),
            ).fetchall()
            self._positions = {TopicPartition(t, p): o for t, p, o in rows}
        return True

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._appended.clear()  # before the read: an append after it ends the wait below
            records = self._fetch(max_records) if self._claim() else []
            if records or time.monotonic() >= deadline:
                return records
            self._appended.wait(min(self.bus.OTHER_PROCESSES_S, max(0.0, deadline - time.monotonic())))

    def _fetch(self, max_records: int) -> list[Record]:
        # Once a read came back short of a batch, the next polls count the topics' appends first and
        # read only when the count moved: an idle consumer (most of a fleet's hosts) runs one query a
        # poll instead of one per partition (each query hands the GIL to the other threads and back).
        # A busy one (full batches) never counts. The count is taken before the read: none missed.
        appends = None
        if self._short:
            (appends,) = self._conn.execute(
                "SELECT COALESCE(SUM(seq), 0) + COUNT(*) FROM topic_clock "
                f"WHERE topic IN ({','.join('?' * len(self.topics))})", self.topics).fetchone()
            if appends == self._drained_at:
                return []
        out = self._read(max_records)
        self._short = len(out) < max_records
        self._drained_at = appends if self._short else None
        return out

    def _read(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for topic in self.topics:
            partitions = self._conn.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
            for partition in range(partitions[0] if partitions else 0):
                tp = TopicPartition(topic, partition)
                if len(out) >= max_records:
                    return out
                rows = self._conn.execute(
                    "SELECT topic, partition, offset, key, value, headers, timestamp_ms FROM records "
                    "WHERE topic = ? AND partition = ? AND offset >= ? ORDER BY offset LIMIT ?",
                    (topic, partition, self._positions.get(tp, 0), max_records - len(out)),
                ).fetchall()
                if rows:
                    out.extend(_record(r) for r in rows)
                    self._positions[tp] = rows[-1][2] + 1
        return out

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        if not self._active:
            raise RuntimeError(f"consumer of group {self.group!r} is not the active member and cannot commit")
        with self._conn:  # one transaction: all partitions or none
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT INTO offsets VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, topic, partition) DO UPDATE SET offset = excluded.offset",
                [(self.group, tp.topic, tp.partition, offset) for tp, offset in offsets.items()],
            )

    def close(self) -> None:
        self.bus.appends.unwatch(self.topics, self._appended)
        self._conn.close()
        self._lock_file.close()  # releases the flock: a standby may take over
        self._active = False
