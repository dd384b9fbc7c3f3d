"""The fuser with a server optimiser: a fedadam run keeps its state per round in the store, emits
round.started with the FedAdam global model, then fused.ready with the fedadam candidate scored; a
retried round writes exactly the state the first try wrote; auto scores fedadam and fedyogi beside
fedavg from the second round on."""
import contextlib

import numpy as np
import orjson
import pytest

from skyfuse import config, signing
from skyfuse.bus import open_bus
from skyfuse.ml import data as D
from skyfuse.ml import export as E
from skyfuse.ml import federated as FL
from skyfuse.ml import fusion as F
from skyfuse.ml import model as M
from skyfuse.runtime.function import Runtime
from skyfuse.storage import keys
from tests.conftest import fleet_env

CLOUDS = ("aws", "gcp", "azure")
SPEC = M.ModelSpec(hidden=(8,), epochs=20, learning_rate=1e-2, seed=0)


@contextlib.contextmanager
def fuser_runtime(tmp_path, **settings):
    """The control cloud's fuser runtime on an embedded bus, each cloud's store under tmp_path."""
    env = fleet_env("embedded", tmp_path, SKYFUSE_SIGNING__KEYS_DIR=tmp_path / "keys", **settings)
    env.update({f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}" for c in CLOUDS})
    fleet = config.load(environ=env)
    signing.ensure_local_keys(fleet)
    bus = open_bus(fleet)
    try:
        yield Runtime("aws", "fuser", fleet, bus_factory=lambda: bus)
    finally:
        bus.close()


@pytest.fixture
def runtime(tmp_path):
    with fuser_runtime(tmp_path, SKYFUSE_TRAINING__SERVER_LR=0.02) as fuser:
        yield fuser


@pytest.fixture(scope="module")
def task():
    ds = D.sample_dataset("breast_cancer")
    train, validation, _ = D.split(ds, seed=0)
    shards = D.partition(train, 3, "iid", seed=0)
    return ds, validation, shards, D.pooled_stats([s.summary() for s in shards])


def _start_run(runtime, run_id, ds, validation):
    store = runtime.store()
    store.put(keys.run_info(run_id), orjson.dumps({"target": ds.target, "classes": ds.classes,
                                                  "features": ds.features, "task": "binary"}))
    store.put(keys.validation(run_id), D.to_csv_bytes(validation))


def _member(runtime, run_id, round_, cloud, shard_id, result, manifest):
    """What the trainer and exporter leave in the member's cloud, and the onnx.ready the fuser records."""
    store = runtime.store(cloud)
    keras_obj = store.put(keys.member_model(run_id, round_, cloud, shard_id), M.to_bytes(result.model))
    onnx_obj = store.put(keys.member_onnx(run_id, round_, cloud, shard_id), E.to_onnx(result.model))
    data = {"run_id": run_id, "round": round_, "shard_id": shard_id, "cloud": cloud, "onnx_uri": onnx_obj.uri,
            "sha256": onnx_obj.sha256, "model_uri": keras_obj.uri, "source_sha256": keras_obj.sha256, "opset": 17,
            "samples": result.samples, "validation": result.validation, "manifest": manifest}
    runtime.store().put(keys.member_record(run_id, round_, cloud, shard_id), orjson.dumps(data))


def _round(runtime, run_id, round_, shards, manifest, stats, initial=None):
    for i, (cloud, shard) in enumerate(zip(CLOUDS, shards, strict=True)):
        result = M.train(SPEC, shard, 2, stats=stats, initial=initial, epochs=2 if initial is not None else None)
        _member(runtime, run_id, round_, cloud, str(i), result, manifest)
    from services.fuser import handler

    handler.complete_round(runtime, run_id, round_, caused_by=None)


def _global(runtime, started):
    return M.from_bytes(runtime.fetch(started["global_model_uri"], started["sha256"]))


def _members(runtime, run_id, round_):
    """(ONNX bytes, rows) of each member of a round, as the fuser read them."""
    store = runtime.store()
    records = [orjson.loads(store.get(k)) for k in store.list(keys.round_members(run_id, round_))]
    return [runtime.fetch(m["onnx_uri"], m["sha256"]) for m in records], [m["samples"] for m in records]


def test_a_fedadam_run_steps_its_state_and_announces_the_fedadam_model(runtime, task):
    from services.fuser import handler

    ds, validation, shards, stats = task
    manifest = {"expected_members": 3, "clouds": list(CLOUDS), "quorum": 2, "timeout_s": 60, "fusion": "fedadam",
                "rounds": 2}
    store = runtime.store()
    _start_run(runtime, "adam", ds, validation)
    _round(runtime, "adam", 0, shards, manifest, stats)
    [started] = [e.get_data() for e in runtime.emitted if e["type"].endswith("round.started")]
    assert started["round"] == 1
    state0 = FL.loads(store.get(keys.server_state("adam", 0)))
    assert state0["chosen"] == "fedadam" and sorted(state0["states"]) == ["fedadam"]
    # round 0 is the warm start: the global model the trainers get is the members' mean
    global0 = _global(runtime, started)
    mean = F.parameters(F.fuse("fedavg", *_members(runtime, "adam", 0)))
    np.testing.assert_allclose(global0.get_layer("dense_0").kernel.numpy(), mean["dense_0.kernel"], atol=1e-6)

    _round(runtime, "adam", 1, shards, manifest, stats, initial=global0)
    [fused] = [e.get_data() for e in runtime.emitted if e["type"].endswith("fused.ready")]
    assert fused["strategy"] == "fedadam" and set(fused["strategies"]) == {"fedadam"}
    assert 0.85 <= fused["strategies"]["fedadam"] <= 1.0 and fused["metrics"]["validation_accuracy"] > 0.85
    # fused.ready names the best round's fedadam model (the warm start may beat one step)
    best = fused["round"]
    assert fused["candidates"]["fedadam"].endswith(keys.round_fused("adam", best, "fedadam"))
    scores = [orjson.loads(store.get(keys.round_scores("adam", r)))["fedadam"]["accuracy"] for r in (0, 1)]
    assert fused["strategies"]["fedadam"] == max(scores) == scores[best]
    candidate = store.get(keys.round_fused("adam", 1, "fedadam"))
    assert F.metadata(candidate)["skyfuse.strategy"] == "fedadam"
    assert F.accuracy(candidate, validation) == scores[1]
    raw1 = store.get(keys.server_state("adam", 1))
    state1 = FL.loads(raw1)["states"]["fedadam"]
    assert state1["round"] == 1 and any(np.abs(m).max() > 0 for m in state1["m"])
    # round 1's model is the FedAdam step from the round-0 global model, not the members' mean
    stepped = F.parameters(candidate)
    mean1 = F.parameters(F.fuse("fedavg", *_members(runtime, "adam", 1)))
    assert not np.allclose(stepped["dense_0.kernel"], mean1["dense_0.kernel"])
    names = FL.loads(raw1)["names"]
    np.testing.assert_array_equal(stepped["dense_0.kernel"], state1["global"][names.index("dense_0.kernel")])

    # a retried round 1 (its completed record lost) recomputes exactly the state the first try wrote
    handler._fuse(runtime, "adam", 1, None, "fuse/adam/round-1")
    assert store.get(keys.server_state("adam", 1)) == raw1


def test_auto_scores_each_server_step_and_continues_from_the_best(runtime, task):
    ds, validation, shards, stats = task
    manifest = {"expected_members": 3, "clouds": list(CLOUDS), "quorum": 2, "timeout_s": 60, "fusion": "auto",
                "rounds": 2}
    _start_run(runtime, "auto", ds, validation)
    _round(runtime, "auto", 0, shards, manifest, stats)
    scores0 = orjson.loads(runtime.store().get(keys.round_scores("auto", 0)))
    assert set(scores0) == {"wavg", "vote", "confidence", "fedavg"}  # round 0: one warm start for all three
    [started] = [e.get_data() for e in runtime.emitted if e["type"].endswith("round.started")]
    _round(runtime, "auto", 1, shards, manifest, stats, initial=_global(runtime, started))
    scores1 = orjson.loads(runtime.store().get(keys.round_scores("auto", 1)))
    assert set(scores1) == {"wavg", "vote", "confidence", "fedavg", "fedadam", "fedyogi"}
    server = FL.loads(runtime.store().get(keys.server_state("auto", 1)))
    best = max(FL.AUTO_SERVER, key=lambda s: (scores1[s]["accuracy"], -FL.AUTO_SERVER.index(s)))
    assert server["chosen"] == best
    [fused] = [e.get_data() for e in runtime.emitted if e["type"].endswith("fused.ready")]
    assert {"fedadam", "fedyogi", "fedavg", "wavg"} <= set(fused["strategies"])
    assert fused["strategies"][fused["strategy"]] == max(fused["strategies"].values())


@pytest.mark.parametrize("round0_accuracy, next_event", [(1.0, "fused.ready"), (0.0, "round.started")])
def test_rounds_stop_early_once_validation_stops_improving(tmp_path, task, round0_accuracy, next_event):
    """rounds_patience = 1: after round 1, the run goes on only if round 1 scored better than round
    0 (whose scores are set here to the best and the worst there can be)."""
    with fuser_runtime(tmp_path, SKYFUSE_TRAINING__ROUNDS_PATIENCE=1) as runtime:
        ds, validation, shards, stats = task
        manifest = {"expected_members": 3, "clouds": list(CLOUDS), "quorum": 2, "timeout_s": 60, "fusion": "fedavg",
                    "rounds": 5}
        _start_run(runtime, "early", ds, validation)
        _round(runtime, "early", 0, shards, manifest, stats)
        [started] = [e.get_data() for e in runtime.emitted if e["type"].endswith("round.started")]
        store = runtime.store()
        scores0 = orjson.loads(store.get(keys.round_scores("early", 0)))
        store.put(keys.round_scores("early", 0),
                  orjson.dumps({s: {**v, "accuracy": round0_accuracy} for s, v in scores0.items()}))
        runtime.emitted.clear()
        _round(runtime, "early", 1, shards, manifest, stats, initial=_global(runtime, started))
        [emitted] = [e for e in runtime.emitted if not e["type"].endswith("metrics.sampled")]
        assert emitted["type"] == f"skyfuse.{next_event}"
        if next_event == "fused.ready":  # round 0's perfect score is the pick, four rounds before the last
            assert emitted.get_data()["round"] == 0 and emitted.get_data()["metrics"]["validation_accuracy"] == 1.0
        else:
            assert emitted.get_data()["round"] == 2
