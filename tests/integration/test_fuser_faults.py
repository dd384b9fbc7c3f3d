"""The fuser under faults: a fusion that fails after it started is fused by its retry (never
turned into a silent success), a broken round never blocks the quorum timer for the others, and
long run ids still make valid model versions."""
import orjson
import pytest

from skyfuse import config, contracts
from skyfuse.runtime.function import Runtime
from skyfuse.storage import keys
from tests.conftest import fleet_env


@pytest.fixture
def runtime(tmp_path):
    env = fleet_env("embedded", tmp_path)
    env.update({f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}"
                for c in ("aws", "gcp", "azure")})
    return Runtime("aws", "fuser", config.load(environ=env))


def open_round(runtime, run_id, members=1, timeout_s=0.0, opened=None):
    store = runtime.store()
    manifest = {**contracts.sample("onnx.ready")["manifest"], "quorum": 1, "timeout_s": timeout_s}
    for i in range(members):
        store.put(keys.member_record(run_id, 0, "aws", str(i)), orjson.dumps({"manifest": manifest}))
    if opened is None:
        opened = orjson.dumps({"at": 0, "manifest": manifest})
    store.put(keys.round_opened(run_id, 0), opened)


def test_a_fusion_that_fails_half_way_is_done_by_its_retry(runtime, monkeypatch):
    from services.fuser import handler

    calls = []

    def fuse(rt, run_id, round_, caused_by, key):
        calls.append(run_id)
        if len(calls) == 1:
            raise TimeoutError("store timed out reading run.json")

    monkeypatch.setattr(handler, "_fuse", fuse)
    with pytest.raises(TimeoutError):
        handler.complete_round(runtime, "r1", 0, caused_by=None)
    assert not runtime.done("fuse/r1/round-0")  # nothing left that would make the retry a no-op
    handler.complete_round(runtime, "r1", 0, caused_by=None)
    handler.complete_round(runtime, "r1", 0, caused_by=None)  # a duplicate after success: no-op
    assert calls == ["r1", "r1"] and runtime.done("fuse/r1/round-0")


def test_an_unreadable_round_does_not_block_the_quorum_timer_for_other_runs(runtime, monkeypatch, caplog):
    from services.fuser import handler

    fused = []
    monkeypatch.setattr(handler, "_fuse", lambda rt, run_id, round_, caused_by, key: fused.append(run_id))
    open_round(runtime, "a-broken", opened=b"")  # an empty file left by a crash
    open_round(runtime, "b-good")
    handler.on_timer(runtime)
    handler.on_timer(runtime)
    assert fused == ["b-good"]
    assert any("quorum check of runs/a-broken/round-0/opened.json failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("length", [1, 100, 110, 128])
def test_model_versions_stay_valid_ids_for_long_run_ids(length):
    from services.fuser.handler import model_version

    run_id = "r" * length
    version = model_version(run_id, "confidence", "ab" * 32)
    contracts.validate("fused.ready", {**contracts.sample("fused.ready"), "version": version})
    assert version.endswith("-confidence-ababab") and len(version) <= 128


def test_long_run_ids_sharing_a_prefix_get_distinct_versions():
    from services.fuser.handler import model_version

    assert model_version("r" * 127 + "x", "wavg", "ab" * 32) != model_version("r" * 127 + "y", "wavg", "ab" * 32)
