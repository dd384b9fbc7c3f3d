"""One contract, two backends: the embedded log and Apache Kafka."""
import subprocess
import sys
import time

from skyfuse.bus.base import TopicPartition, partition_for


def drain(consumer, count, timeout=30.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(consumer.poll(0.5, count - len(got)))
    return got


def test_same_key_same_partition_in_order(bus, uid):
    topic = f"contract-order-{uid}"
    bus.ensure_topics([topic], 3)
    sent = [bus.publish(topic, f"{key}:{i}".encode(), key.encode()) for i in range(20) for key in "abcde"]
    for key in "abcde":
        partitions = {r.partition for r in sent if r.key == key.encode()}
        assert partitions == {partition_for(key.encode(), 3)}  # Kafka's murmur2 on both backends
    with bus.consumer(f"g-{uid}", [topic]) as consumer:
        got = drain(consumer, 100)
    assert len(got) == 100
    for key in "abcde":
        values = [r.value.decode() for r in got if r.key == key.encode()]
        assert values == [f"{key}:{i}" for i in range(20)]
    offsets = {}
    for r in got:
        assert r.offset == offsets.get(r.partition, -1) + 1  # dense offsets, in order
        offsets[r.partition] = r.offset


def test_group_resumes_from_its_committed_offset(bus, uid):
    topic, group = f"contract-resume-{uid}", f"g-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(10):
        bus.publish(topic, str(i).encode(), b"k")
    with bus.consumer(group, [topic]) as consumer:
        got = drain(consumer, 10)
        assert [r.value for r in got] == [str(i).encode() for i in range(10)]
        consumer.commit({TopicPartition(topic, 0): 6})  # finished 0..5
    assert bus.committed(group, topic) == {0: 6}
    assert bus.lag(group, topic) == 4
    with bus.consumer(group, [topic]) as consumer:
        again = drain(consumer, 4)
    assert [r.value for r in again] == [b"6", b"7", b"8", b"9"]


def test_each_group_reads_everything(bus, uid):
    topic = f"contract-groups-{uid}"
    bus.ensure_topics([topic], 2)
    for i in range(6):
        bus.publish(topic, str(i).encode(), str(i).encode())
    for group in ("one", "two"):
        with bus.consumer(f"{group}-{uid}", [topic]) as consumer:
            assert sorted(int(r.value) for r in drain(consumer, 6)) == list(range(6))


def test_headers_keys_and_empty_keys_survive(bus, uid):
    topic = f"contract-headers-{uid}"
    bus.ensure_topics([topic], 1)
    bus.publish(topic, b"v1", None, [("ce_id", b"1"), ("bin", bytes(range(256)))])
    (record,) = bus.read(topic)
    assert record.key is None and record.value == b"v1"
    assert record.headers == [("ce_id", b"1"), ("bin", bytes(range(256)))]


def test_status_views(bus, uid):
    topic, group = f"contract-status-{uid}", f"g-{uid}"
    bus.ensure_topics([topic], 2)
    for i in range(5):
        bus.publish(topic, b"x", str(i).encode())
    assert bus.topics()[topic] == 2
    assert bus.count(topic) == 5 and sum(bus.end_offsets(topic).values()) == 5
    assert bus.committed(group, topic) == {} and bus.lag(group, topic) == 5


PUBLISH_THEN_DIE = """
import os, sys
from skyfuse.bus.embedded import EmbeddedBus
bus = EmbeddedBus(sys.argv[1])
for i in range(200):
    bus.publish("restart", str(i).encode(), str(i % 7).encode())
print("published", flush=True)
os.kill(os.getpid(), 9)  # no close, no cleanup
"""


def test_embedded_log_survives_a_killed_process(tmp_path):
    from skyfuse.bus.embedded import EmbeddedBus

    path = tmp_path / "bus"
    run = subprocess.run([sys.executable, "-c", PUBLISH_THEN_DIE, str(path)], capture_output=True, text=True)
    assert run.returncode == -9 and "published" in run.stdout
    bus = EmbeddedBus(path)
    assert bus.count("restart") == 200
    with bus.consumer("after-restart", ["restart"]) as consumer:
        assert sorted(int(r.value) for r in drain(consumer, 200)) == list(range(200))


def test_embedded_group_has_one_active_member_and_a_standby_takes_over(tmp_path):
    from skyfuse.bus.embedded import EmbeddedBus

    bus = EmbeddedBus(tmp_path / "bus")
    bus.ensure_topics(["standby"], 1)
    for i in range(4):
        bus.publish("standby", str(i).encode(), b"k")
    first = bus.consumer("g", ["standby"])
    second = bus.consumer("g", ["standby"])
    assert len(drain(first, 4)) == 4
    first.commit({TopicPartition("standby", 0): 2})
    assert second.poll(0.3, 10) == []  # the first member is alive: the second waits
    first.close()
    assert [r.value for r in drain(second, 2)] == [b"2", b"3"]  # takes over at the committed offset
    second.close()


def test_tail_gives_the_latest_records_of_each_partition_oldest_first(bus, uid):
    topic = f"contract-tail-{uid}"
    bus.ensure_topics([topic], 2)
    keys = [b"a", next(k for k in (b"b", b"c", b"d", b"e") if partition_for(k, 2) != partition_for(b"a", 2))]
    sent = [bus.publish(topic, str(i).encode(), key) for i in range(30) for key in keys]
    tail = bus.tail(topic, 5)
    assert sorted(r.value for r in tail) == sorted(r.value for r in sent if int(r.value) >= 25)
    assert [int(r.value) for r in tail if r.key == b"a"] == list(range(25, 30))  # oldest first
