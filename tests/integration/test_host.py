"""The function host on both buses, with real Lambda / functions-framework / Azure entry points:
exact commits, retries, dead letters, ordering."""
import threading
import time
from pathlib import Path

import pytest

from skyfuse import config, contracts, events
from skyfuse.bus import open_bus
from skyfuse.config import Function
from skyfuse.runtime.clouds.aws import LambdaInvoker
from skyfuse.runtime.clouds.azure import KafkaTriggerInvoker
from skyfuse.runtime.clouds.gcp import CloudEventInvoker
from skyfuse.runtime.function import hosted
from skyfuse.runtime.host import FunctionHost
from tests.conftest import fleet_env, signed_event
from tests.functions import probe, probe_state

PROVIDERS = ["aws", "gcp", "azure"]


@pytest.fixture(autouse=True)
def clean_probe():
    probe_state.reset()
    yield
    probe_state.reset()


def probe_invoker(provider, topic):
    if provider == "aws":
        return LambdaInvoker("tests.functions.probe:lambda_handler", "skyfuse-probe", "us-east-1", "test")
    if provider == "gcp":
        return CloudEventInvoker(str(Path(probe.__file__)), "probe")
    return KafkaTriggerInvoker(probe.azure_app(topic))


def shard_event(shard_id, run_id="r1"):
    data = {**contracts.sample("shard.ready"), "shard_id": shard_id, "run_id": run_id}
    return signed_event("shard.ready", data, "cli")


def publish(bus, topic, event):
    key, value, headers = events.encode(event)
    return bus.publish(topic, value, key, headers)


def handled_in_order(provider):
    """Shards in the order the core first saw them. Lambda and Cloud Run report per record, so each
    success happens once; Azure's trigger fails a batch as a whole, so what ran before the failing
    record in that batch runs again (at-least-once; the cores are idempotent)."""
    handled = [s for s, _ in probe_state.HANDLED]
    if provider == "azure":
        return list(dict.fromkeys(handled))
    assert len(handled) == len(set(handled)), f"{provider} handled a record twice: {handled}"
    return handled


class Running:
    """A host in a thread, with every delivery it reports."""

    def __init__(self, bus, fleet, provider, topic, uid, ordering="partition", max_attempts=4, concurrency=1):
        fleet = config.replace(fleet, delivery=config.replace(fleet.delivery, max_attempts=max_attempts))
        self.deliveries = []
        self.host = FunctionHost(bus, fleet, provider, f"probe-{uid}", probe_invoker(provider, topic),
                                 self.deliveries.append, topics=[topic],
                                 settings=Function(ordering=ordering, concurrency=concurrency))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.host.run, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)

    def wait(self, condition, timeout=45.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        raise AssertionError(f"timed out; deliveries: {[(d.record.offset, d.result) for d in self.deliveries]}")

    def results(self, result):
        return [d for d in self.deliveries if d.result == result]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_malformed_event_is_dead_lettered_and_the_next_one_handled(bus, fleet, provider, uid):
    topic = f"host-malformed-{uid}"
    bus.ensure_topics([topic], 1)
    bus.publish(topic, b"{this is not an event", b"r1", [("ce_specversion", b"1.0")])
    good = publish(bus, topic, shard_event("good"))
    with Running(bus, fleet, provider, topic, uid) as run:
        run.wait(lambda: run.results("ok"))
    assert probe_state.HANDLED == [("good", provider)]
    (dead,) = bus.read(f"probe-{uid}.dlq")
    headers = {k: v.decode() for k, v in dead.headers}
    assert dead.value == b"{this is not an event" and "not a valid CloudEvent" in headers["skyfuse_dlq_reason"]
    assert headers["skyfuse_dlq_topic"] == topic and headers["skyfuse_dlq_offset"] == "0"
    assert bus.committed(f"{provider}.probe-{uid}", topic) == {0: good.offset + 1}


@pytest.mark.parametrize("provider", ["aws", "azure"])
def test_the_entry_point_reads_each_record_again_and_the_host_alone_checks_it(bus, fleet, provider, uid,
                                                                              monkeypatch):
    topic = f"host-checked-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(3):
        publish(bus, topic, shard_event(f"s{i}"))
    checked, validate = [], contracts.validate
    monkeypatch.setattr(contracts, "validate", lambda name, data: (checked.append(data["shard_id"]),
                                                                   validate(name, data))[1])
    with Running(bus, fleet, provider, topic, uid) as run:
        run.wait(lambda: len(run.results("ok")) == 3)
    assert handled_in_order(provider) == ["s0", "s1", "s2"]
    assert checked == ["s0", "s1", "s2"]  # once each, by the host; the entry point's decode found them checked
    probe_state.reset()
    (record, *_) = bus.read(topic)  # the entry point without the host before it checks in full
    with hosted(run.host.runtime):
        outcome = run.host.invoker.invoke([(record, events.decode(record.key, record.value, record.headers))])
    assert not outcome.failed and probe_state.HANDLED == [("s0", provider)]
    assert checked == ["s0", "s1", "s2", "s0", "s0"]  # the decode just above, then the entry point's


@pytest.mark.parametrize("provider", PROVIDERS)
def test_poison_record_is_retried_then_dead_lettered_and_its_partition_goes_on_in_order(bus, fleet, provider, uid):
    topic = f"host-poison-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(6):
        publish(bus, topic, shard_event(f"s{i}"))
    probe_state.FAILING["s2"] = -1
    with Running(bus, fleet, provider, topic, uid, max_attempts=3) as run:
        run.wait(lambda: len(run.results("ok")) == 5)
    assert handled_in_order(provider) == ["s0", "s1", "s3", "s4", "s5"]  # in order, past the poison
    assert len(run.results("retry")) == 2 and len(run.results("dead-lettered")) == 1
    (dead,) = bus.read(f"probe-{uid}.dlq")
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["skyfuse_dlq_offset"] == "2" and headers["skyfuse_dlq_attempts"] == "3"
    assert "gave up after 3 attempts" in headers["skyfuse_dlq_reason"]
    assert events.decode(dead.key, dead.value, dead.headers).get_data()["shard_id"] == "s2"  # the original record
    assert bus.committed(f"{provider}.probe-{uid}", topic) == {0: 6}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_transient_failure_is_retried_until_it_succeeds(bus, fleet, provider, uid):
    topic = f"host-transient-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(3):
        publish(bus, topic, shard_event(f"s{i}"))
    probe_state.FAILING["s1"] = 2
    with Running(bus, fleet, provider, topic, uid, max_attempts=5) as run:
        run.wait(lambda: len(run.results("ok")) == 3)
    assert handled_in_order(provider) == ["s0", "s1", "s2"] and not run.results("dead-lettered")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_commit_never_passes_a_failing_record_and_a_restart_redelivers_from_it(bus, fleet, provider, uid):
    """Records 0..9 unordered; record 4 keeps failing while the later ones succeed."""
    topic, n, k = f"host-exact-{uid}", 10, 4
    group = f"{provider}.probe-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(n):
        publish(bus, topic, shard_event(f"s{i}"))
    probe_state.FAILING[f"s{k}"] = -1
    with Running(bus, fleet, provider, topic, uid, ordering="unordered", max_attempts=1000) as run:
        run.wait(lambda: len(run.results("ok")) == n - 1 and len(run.results("retry")) >= 3)
        run.wait(lambda: bus.committed(group, topic) == {0: k})  # up to the failing record ...
        run.wait(lambda: len(run.results("retry")) >= 6)
        assert bus.committed(group, topic) == {0: k}  # ... and never past it
    # the host is gone (as after a crash); a new one must start again at record k, never after it
    probe_state.reset()
    with Running(bus, fleet, provider, topic, f"{uid}", ordering="unordered") as run:
        run.wait(lambda: len(run.results("ok")) == n - k)
    assert sorted(d.record.offset for d in run.results("ok")) == list(range(k, n))
    assert bus.committed(group, topic) == {0: n}


class CommitsNoted:
    """A bus whose consumers note every position they commit."""

    def __init__(self, bus):
        self.bus, self.commits = bus, []

    def __getattr__(self, name):
        return getattr(self.bus, name)

    def consumer(self, group, topics, on_revoke=None):
        consumer = self.bus.consumer(group, topics, on_revoke)
        commit = consumer.commit

        def noted(offsets):
            commit(offsets)
            self.commits.append({tp.partition: position for tp, position in offsets.items()})

        consumer.commit = noted
        return consumer


@pytest.mark.parametrize(("interval_s", "expected"), [(0, [100, 200, 300]), (3600, [100, 300])])
def test_a_busy_host_commits_at_most_every_commit_interval_and_an_idle_one_at_once(tmp_path, uid, interval_s,
                                                                                   expected):
    """Three Lambda batches of 100 back to back: with no interval each is committed; with an hour,
    the first is (no commit yet), then none until the host runs out of work."""
    fleet = config.load(environ=fleet_env("embedded", tmp_path, SKYFUSE_DELIVERY__COMMIT_INTERVAL_S=interval_s))
    bus = open_bus(fleet)
    try:
        topic = f"host-commits-{uid}"
        bus.ensure_topics([topic], 1)
        for i in range(300):
            publish(bus, topic, shard_event(f"s{i}"))
        noted = CommitsNoted(bus)
        with Running(noted, fleet, "aws", topic, uid) as run:
            run.wait(lambda: bus.committed(run.host.group, topic) == {0: 300})
            assert noted.commits == [{0: position} for position in expected]
        assert handled_in_order("aws") == [f"s{i}" for i in range(300)]
    finally:
        bus.close()


def test_whole_batch_failure_is_pinned_on_the_poison_record(bus, fleet, uid):
    """An Azure batch fails as a whole; the host isolates the culprit, the rest are handled once."""
    topic = f"host-bisect-{uid}"
    bus.ensure_topics([topic], 3)
    for i in range(9):
        publish(bus, topic, shard_event(f"s{i}", run_id=f"run{i}"))  # spread over partitions
    probe_state.FAILING["s4"] = -1
    with Running(bus, fleet, "azure", topic, uid, max_attempts=2) as run:
        run.wait(lambda: len(run.results("ok")) == 8 and run.results("dead-lettered"))
    assert sorted(set(s for s, _ in probe_state.HANDLED)) == [f"s{i}" for i in range(9) if i != 4]
    (dead,) = run.results("dead-lettered")
    assert events.decode(dead.record.key, dead.record.value, dead.record.headers).get_data()["shard_id"] == "s4"


def test_key_ordering_lets_other_keys_pass_a_retrying_record(bus, fleet, uid):
    topic = f"host-keys-{uid}"
    bus.ensure_topics([topic], 1)
    for i, run_id in enumerate(["a", "b", "a", "b"]):
        publish(bus, topic, shard_event(f"s{i}", run_id=run_id))
    probe_state.FAILING["s0"] = 3  # key a is stuck for a while
    with Running(bus, fleet, "aws", topic, uid, ordering="key", max_attempts=10) as run:
        run.wait(lambda: len(run.results("ok")) == 4)
    order = [s for s, _ in probe_state.HANDLED]
    assert order.index("s1") < order.index("s0") and order.index("s3") < order.index("s0")  # b passed a
    assert order.index("s0") < order.index("s2")  # a kept its order
