"""The delivery bookkeeping: lanes, retries, and commits that never pass an unfinished record."""
import pytest

from skyfuse.bus.base import Record
from skyfuse.runtime.tracker import Backoff, Pending, Tracker, lane


def rec(offset, partition=0, key=b"k"):
    return Record("t", partition, offset, key, b"{}")


def fill(tracker, *records):
    pendings = [Pending(r) for r in records]
    for p in pendings:
        tracker.add(p)
    return pendings


def test_commit_stops_at_the_first_unfinished_record():
    tracker = Tracker("unordered")
    ps = fill(tracker, *(rec(o) for o in range(6)))
    for p in ps[:2] + ps[3:]:  # offset 2 is still failing
        tracker.finish(p)
    assert tracker.commit_positions() == {rec(0).tp: 2}
    tracker.committed_to({rec(0).tp: 2})
    tracker.finish(ps[2])
    assert tracker.commit_positions() == {rec(0).tp: 6}
    tracker.committed_to({rec(0).tp: 6})
    assert len(tracker) == 0


def test_a_commit_the_bus_refused_is_offered_again_until_confirmed():
    tracker = Tracker("partition")
    ps = fill(tracker, rec(0), rec(1))
    for p in ps:
        tracker.finish(p)
    assert tracker.commit_positions() == {rec(0).tp: 2}  # ... and the commit failed
    assert tracker.commit_positions() == {rec(0).tp: 2}  # so the next step tries it again
    tracker.committed_to({rec(0).tp: 2})
    assert tracker.commit_positions() == {} and len(tracker) == 0


def test_a_finished_prefix_is_forgotten_at_once_and_its_position_waits_for_the_commit():
    tracker = Tracker("unordered")
    ps = fill(tracker, *(rec(o) for o in range(4)))
    tracker.finish(ps[1])
    tracker.forget_finished()  # 1 is behind an unfinished record: kept
    assert len(tracker) == 4 and tracker.commit_positions() == {}
    tracker.finish(ps[0])
    tracker.forget_finished()  # 0 and 1 forgotten: they no longer take room in the host's buffer
    assert len(tracker) == 2 and tracker.commit_positions() == {rec(0).tp: 2}
    assert [[p.record.offset for p in lane] for lane in tracker.ready(now=0)] == [[2], [3]]
    tracker.drop([rec(0).tp])  # the partition went to another host: nothing of it is offered
    assert len(tracker) == 0 and tracker.commit_positions() == {}


def test_partition_ordering_offers_only_the_head_and_what_follows():
    tracker = Tracker("partition")
    ps = fill(tracker, rec(0), rec(1), rec(2), rec(0, partition=1))
    lanes = tracker.ready(now=0)
    assert [[p.record.offset for p in lane] for lane in lanes] == [[0, 1, 2], [0]]
    ps[0].not_before = 10  # head waits for its retry: the partition waits with it
    assert [lane[0].record.partition for lane in tracker.ready(now=5)] == [1]
    assert [lane[0].record.partition for lane in tracker.ready(now=10)] == [0, 1]


def test_key_ordering_lets_other_keys_pass_a_failing_record():
    tracker = Tracker("key")
    ps = fill(tracker, rec(0, key=b"a"), rec(1, key=b"b"), rec(2, key=b"a"))
    ps[0].not_before = 10
    assert [[p.record.offset for p in lane] for lane in tracker.ready(now=0)] == [[1]]


def test_unordered_lanes_are_single_records():
    tracker = Tracker("unordered")
    fill(tracker, rec(0), rec(1))
    assert [[p.record.offset for p in lane] for lane in tracker.ready(now=0)] == [[0], [1]]


def test_in_flight_records_are_not_offered_twice():
    tracker = Tracker("partition")
    ps = fill(tracker, rec(0), rec(1))
    ps[0].in_flight = True
    assert tracker.ready(now=0) == []


def test_invalid_head_is_reported_for_dead_lettering_and_blocks_its_lane():
    tracker = Tracker("partition")
    ps = fill(tracker, rec(0), rec(1))
    ps[0].invalid = "not JSON"
    assert tracker.invalid() == [ps[0]]
    assert tracker.ready(now=0) == []


def test_next_due_is_the_earliest_waiting_retry():
    tracker = Tracker("unordered")
    ps = fill(tracker, rec(0), rec(1), rec(2))
    ps[0].attempts, ps[0].not_before = 1, 7.0
    ps[1].attempts, ps[1].not_before = 2, 3.0
    assert tracker.next_due() == 3.0


def test_drop_forgets_revoked_partitions():
    tracker = Tracker("partition")
    fill(tracker, rec(0), rec(0, partition=1))
    tracker.drop([rec(0).tp])
    assert {lane[0].record.partition for lane in tracker.ready(now=0)} == {1}


def test_backoff_grows_exponentially_within_the_cap_with_full_jitter():
    backoff = Backoff(initial_s=0.1, max_s=1.0)
    for attempts, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (12, 1.0)]:
        delays = [backoff.delay(attempts) for _ in range(300)]
        assert 0 <= min(delays) and max(delays) <= cap
        assert max(delays) > cap * 0.8  # jitter spans the whole range


def test_the_lane_rule():
    assert lane("partition", "t", 0, b"a", 5) == lane("partition", "t", 0, b"b", 6)
    assert lane("partition", "t", 0, b"a", 5) != lane("partition", "t", 1, b"a", 5)
    assert lane("key", "t", 0, b"a", 5) == lane("key", "t", 0, b"a", 6) != lane("key", "t", 0, b"b", 5)
    assert lane("key", "t", 0, b"a", 5) != lane("key", "t", 1, b"a", 5)
    assert lane("unordered", "t", 0, b"a", 5) != lane("unordered", "t", 0, b"a", 6)
    with pytest.raises(ValueError, match="'fifo' is not one of"):
        lane("fifo", "t", 0, b"a", 5)


@pytest.mark.parametrize("ordering, tried, failed", [("partition", [0, 3], [0, 1, 2]), ("key", [0, 1, 3], [0, 2]),
                                                     ("unordered", [0, 1, 2, 3], [0])])
def test_a_lambda_kafka_batch_skips_what_waits_behind_a_failure_in_its_lane(tmp_path, ordering, tried, failed):
    """The Lambda side keeps the same lanes as the local host: offset 0 (key a) fails; offset 2
    (key a) waits behind it under "key" and "partition", offset 1 (key b) only under "partition"."""
    from skyfuse import config, contracts, events
    from skyfuse.runtime.clouds.aws import LambdaContext, kafka_event, process_kafka_batch
    from skyfuse.runtime.function import Runtime, hosted

    fleet = config.load(environ={"SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus"),
                                 "SKYFUSE_SIGNING__ENABLED": "false"})
    records, ids = [], {}
    for offset, (partition, key) in enumerate([(0, b"a"), (0, b"b"), (0, b"a"), (1, b"a")]):
        event = events.new_event("placement.changed", contracts.sample("placement.changed"),
                                 source="skyfuse://aws/scheduler")
        _, value, headers = events.encode(event)
        records.append(Record("t", partition, offset, key, value, headers))
        ids[event["id"]] = offset
    seen = []

    def handle(event, runtime):
        seen.append(ids[event["id"]])
        if ids[event["id"]] == 0:
            raise RuntimeError("fails")

    runtime = Runtime("aws", "deployer", fleet, settings=config.Function(ordering=ordering))
    with hosted(runtime):
        response = process_kafka_batch("deployer", handle, kafka_event(records, "127.0.0.1:9092"),
                                       LambdaContext("deployer"))
    assert seen == tried
    assert sorted(f["itemIdentifier"]["offset"] for f in response["batchItemFailures"]) == failed
