"""The delivery bookkeeping: lanes, retries, and commits that never pass an unfinished record."""
from skyfuse.bus.base import Record
from skyfuse.runtime.tracker import Backoff, Pending, Tracker


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
