"""The embedded log over time: a clock step never reorders it, retention bounds it and offsets
go on across it, and the latest records are read without scanning from offset 0. And as it is
opened: by many processes at once, from an older layout, or damaged."""
import sqlite3
import subprocess
import sys
import threading

import pytest

from skyfuse.bus.embedded import SCHEMA, EmbeddedBus, LogError


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_clock_stepping_back_does_not_reorder_the_log(tmp_path):
    clock = Clock(1_800_000_000.0)
    bus = EmbeddedBus(tmp_path / "bus", default_partitions=3, clock=clock)
    for i in range(6):
        bus.publish("t", str(i).encode(), str(i).encode())  # keys spread over partitions
        clock.t -= 3600 if i == 2 else -1  # NTP steps the clock back an hour once
    assert [r.value for r in bus.read("t")] == [str(i).encode() for i in range(6)]
    assert [r.value for r in bus.tail("t", 10)] == [str(i).encode() for i in range(6)]


def test_retention_deletes_old_records_and_offsets_go_on(tmp_path):
    clock = Clock(1_800_000_000.0)
    bus = EmbeddedBus(tmp_path / "bus", default_partitions=1, retention_ms=3_600_000, clock=clock)
    for i in range(5):
        bus.publish("t", b"old %d" % i)
    clock.t += 7200
    bus.publish("t", b"new")
    assert bus.trim() == 5  # every old record: "new" is now the partition's newest
    assert [r.value for r in bus.read("t")] == [b"new"]
    assert bus.end_offsets("t") == {0: 6}
    clock.t += 7200
    assert bus.trim() == 0  # the partition's newest record is kept, so the next offset is still 6
    assert bus.publish("t", b"next").offset == 6
    with bus.consumer("late-group", ["t"]) as consumer:  # a group that never read starts at the earliest kept
        assert [r.value for r in consumer.poll(1.0, 10)] == [b"new", b"next"]


def test_retention_runs_by_itself_as_the_log_grows(tmp_path):
    clock = Clock(1_800_000_000.0)
    bus = EmbeddedBus(tmp_path / "bus", default_partitions=1, retention_ms=1000, clock=clock)
    for i in range(EmbeddedBus.TRIM_EVERY * 2):
        clock.t += 0.01
        bus.publish("metrics", b"%d" % i)
    assert bus.count("metrics") == EmbeddedBus.TRIM_EVERY * 2  # offsets are dense ...
    assert len(bus.read("metrics", 10_000)) <= EmbeddedBus.TRIM_EVERY  # ... but the log is bounded


def test_an_idle_consumer_reads_one_count_and_misses_no_append(tmp_path):
    """A consumer that read every partition to its end asks only how many appends its topics had
    since; any append, a topic's first one or one by another connection, it then reads, and a
    batch cut short by max_records is followed by the rest."""
    bus = EmbeddedBus(tmp_path / "bus", default_partitions=3)
    with bus.consumer("g", ["a", "b"]) as consumer:
        assert consumer.poll(0, 10) == []  # neither topic was ever published
        statements: list[str] = []
        consumer._conn.set_trace_callback(statements.append)
        assert consumer.poll(0, 10) == []
        assert len(statements) == 1 and "topic_clock" in statements[0]  # not the six partitions
        bus.publish("b", b"first of b")
        assert [r.value for r in consumer.poll(1.0, 10)] == [b"first of b"]
        other = EmbeddedBus(tmp_path / "bus")  # another process's connection to the log
        for i in range(5):
            other.publish("a", b"%d" % i, b"%d" % i)
        got = consumer.poll(1.0, 3)
        assert len(got) == 3
        got += consumer.poll(0, 10)  # the rest, though nothing was appended in between
        assert sorted(r.value for r in got) == [b"0", b"1", b"2", b"3", b"4"]
        assert consumer.poll(0, 10) == []
        other.close()


def test_an_append_in_this_process_wakes_only_its_topics_idle_consumers(tmp_path):
    """An idle consumer sleeps until this process appends to one of its topics, not until its next
    look for other processes' appends (an hour here): the poll ends with the record."""
    bus = EmbeddedBus(tmp_path / "bus")
    bus.OTHER_PROCESSES_S = 3600.0
    got: list[bytes] = []
    with bus.consumer("g", ["a"]) as waiting, bus.consumer("h", ["b"]) as other_topic:
        assert waiting.poll(0, 10) == [] and other_topic.poll(0, 10) == []
        poller = threading.Thread(target=lambda: got.extend(r.value for r in waiting.poll(600, 10)))
        poller.start()
        bus.publish("a", b"x")
        poller.join(120)
        assert not poller.is_alive() and got == [b"x"]
        assert not other_topic._appended.is_set()  # an append to "a" woke no consumer of "b"
        bus.publish("b", b"y")
        assert other_topic._appended.is_set()


def test_another_process_append_is_seen_at_the_next_look(tmp_path):
    bus = EmbeddedBus(tmp_path / "bus")
    bus.OTHER_PROCESSES_S = 0.05
    code = ("import sys; from skyfuse.bus.embedded import EmbeddedBus; "
            "EmbeddedBus(sys.argv[1]).publish('a', b'from another process')")
    with bus.consumer("g", ["a"]) as consumer:
        assert consumer.poll(0, 10) == []
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "bus")], check=True, timeout=120)
        assert [r.value for r in consumer.poll(120, 10)] == [b"from another process"]


def test_many_open_a_fresh_log_at_once(tmp_path):
    # `skyfuse up` and `skyfuse status` started together: each readies the new file (WAL, tables)
    errors: list[Exception] = []

    def open_log(path, start):
        start.wait()
        try:
            EmbeddedBus(path).publish("t", b"x")
        except Exception as error:  # noqa: BLE001 - what the test is looking for
            errors.append(error)

    for round_ in range(30):
        path, start = tmp_path / str(round_), threading.Barrier(4)
        openers = [threading.Thread(target=open_log, args=(path, start)) for _ in range(4)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(120)
        assert errors == [] and len(EmbeddedBus(path).read("t")) == 4


def test_a_log_from_before_seq_opens_and_orders_new_records(tmp_path):
    (tmp_path / "bus").mkdir()
    old = sqlite3.connect(tmp_path / "bus" / "log.sqlite")
    old.executescript(SCHEMA.replace(" seq INTEGER,", ""))
    old.execute("INSERT INTO topics VALUES ('t', 1)")
    old.execute("INSERT INTO records VALUES ('t', 0, 0, 1, NULL, CAST('old' AS BLOB), '[]')")
    old.commit()
    old.close()
    bus = EmbeddedBus(tmp_path / "bus")
    bus.publish("t", b"new")
    assert [(r.offset, r.value) for r in bus.read("t")] == [(0, b"old"), (1, b"new")]


def test_a_damaged_log_is_an_error_that_says_what_to_do(tmp_path):
    (tmp_path / "bus").mkdir()
    (tmp_path / "bus" / "log.sqlite").write_bytes(b"not a log, " * 100)
    with pytest.raises(LogError, match=r"log\.sqlite \(file is not a database\): .*move it aside"):
        EmbeddedBus(tmp_path / "bus")
