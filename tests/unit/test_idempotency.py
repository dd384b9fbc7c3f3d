"""The idempotency layer: an in-progress claim with an expiry, released when the work raises,
completed (with its result) only after the work returned; and the file store's atomic create."""
import threading

import pytest

from skyfuse import files
from skyfuse.runtime.idempotency import Idempotency, InProgress
from skyfuse.storage.file import FileStore


class Clock:
    def __init__(self, t=1_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def store(tmp_path):
    return FileStore(f"file://{tmp_path}/store")


def layer(store, clock, owner="a"):
    return Idempotency(store, "exporter", owner, expires_after_s=60, clock=clock)


def test_work_runs_once_and_a_duplicate_gets_the_recorded_result(store):
    clock, runs = Clock(), []
    for _ in range(3):
        with layer(store, clock).once("export/r1/round-0/aws-0") as claim:
            if not claim.done:
                runs.append(1)
                claim.result = {"onnx_uri": "file:///x.onnx"}
    assert runs == [1]
    with layer(store, clock).once("export/r1/round-0/aws-0") as claim:
        assert claim.done and claim.result == {"onnx_uri": "file:///x.onnx"}
    assert layer(store, clock).status("export/r1/round-0/aws-0")["status"] == "completed"


def test_work_that_raises_leaves_nothing_that_blocks_its_retry(store):
    clock = Clock()
    with pytest.raises(TimeoutError):
        with layer(store, clock).once("k"):
            raise TimeoutError("store timed out half-way")
    assert layer(store, clock).status("k") is None
    with layer(store, clock).once("k") as claim:
        assert not claim.done


def test_a_claim_held_elsewhere_makes_the_caller_wait_until_it_expires(store):
    clock = Clock()
    holder = layer(store, clock, owner="host-1").once("k")
    holder.__enter__()
    clock.t += 20
    with pytest.raises(InProgress, match="handled by host-1; its claim expires in 40 s") as caught:
        with layer(store, clock, owner="host-2").once("k"):
            pass
    assert caught.value.retry_after_s == 40
    clock.t += 41  # host-1 died holding it: the claim expired, host-2 takes the work over
    with layer(store, clock, owner="host-2").once("k") as claim:
        assert not claim.done
    assert layer(store, clock).status("k")["by"] == "host-2"


def test_an_unreadable_record_is_taken_over(store):
    clock = Clock()
    idem = layer(store, clock)
    path = store.root / idem.record_key("k")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # left by an older, non-atomic writer
    with idem.once("k") as claim:
        assert not claim.done
    assert idem.status("k")["status"] == "completed"


def test_long_keys_make_bounded_distinct_record_names(store):
    idem = layer(store, Clock())
    a, b = idem.record_key("x" * 300 + "a"), idem.record_key("x" * 300 + "b")
    assert a != b and len(a) < 200


def test_file_store_create_is_atomic_and_has_one_winner(store):
    wins, barrier = [], threading.Barrier(8)

    def race(i):
        barrier.wait()
        if store.create("runs/r1/opened.json", b"%d" % i * 10_000):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.read("runs/r1/opened.json") == b"%d" % wins[0] * 10_000  # whole, never empty or mixed
    assert [p.name for p in (store.root / "runs/r1").iterdir()] == ["opened.json"]  # no temporary left


def test_file_store_create_of_a_taken_key_writes_nothing(store, monkeypatch):
    assert store.create("runs/r1/opened.json", b"first")
    monkeypatch.setattr(files, "staged", lambda *a: pytest.fail("staged a copy of a key that exists"))
    assert store.create("runs/r1/opened.json", b"second") is False
    assert store.read("runs/r1/opened.json") == b"first"


def test_file_store_delete_is_quiet_for_a_missing_key(store):
    store.put("a/b", b"1")
    store.delete("a/b")
    store.delete("a/b")
    assert not store.exists("a/b")
