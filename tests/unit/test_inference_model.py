"""The served model (skyfuse.serving.model): verified loading, the lineage, atomic swaps, and the
pointer watcher that never lets a bad model replace a good one."""
import json
import threading

import numpy as np
import pytest

from skyfuse.serving import testing
from skyfuse.serving.model import (
    POINTER_KEY,
    LoadedModel,
    ModelError,
    ModelSlot,
    Pointer,
    PointerWatcher,
    load_from_pointer,
    model_key,
    publish,
)
from skyfuse.storage import open_store, sha256_of


@pytest.fixture(scope="module")
def model_a():
    return testing.classifier(seed=1)


@pytest.fixture(scope="module")
def model_b():
    return testing.classifier(seed=2, hidden=(8,))


@pytest.fixture
def store(tmp_path):
    return open_store(f"file://{tmp_path}/store")


def test_loaded_model_reads_signature_and_lineage(model_a):
    m = LoadedModel(model_a, "v1", sha256_of(model_a), "file:///x.onnx")
    assert (m.version, m.width, m.input_name, m.output_names) == ("v1", 4, "features", ["prob"])
    assert m.labels == list(testing.IRIS_CLASSES)
    assert m.features == list(testing.IRIS_FEATURES)
    assert m.lineage["members"][0]["shard_id"] == "s0"
    X = np.ones((3, 4), dtype=np.float32)
    np.testing.assert_allclose(m.run(X), testing.reference(model_a, X), rtol=1e-6)


def test_model_without_lineage_gets_numbered_classes():
    import onnx

    proto = onnx.load_from_string(testing.classifier(width=3, classes=("a", "b")))
    del proto.metadata_props[:]
    m = LoadedModel(proto.SerializeToString(), "bare")
    assert m.labels == ["0", "1"] and m.features is None and m.lineage == {}


@pytest.mark.parametrize("mutate, words", [
    (lambda data: data, ["sha256"]),  # right bytes, wrong digest announced
    (lambda data: b"certainly not an onnx model", ["not a loadable ONNX model"]),
    (lambda data: data[: len(data) // 2], ["not a loadable ONNX model"]),
])
def test_bad_model_bytes_raise_model_error(model_a, mutate, words):
    data = mutate(model_a)
    announced = "0" * 64 if data == model_a else sha256_of(data)
    with pytest.raises(ModelError) as info:
        LoadedModel(data, "bad", announced)
    for word in words:
        assert word in str(info.value)


def test_lineage_that_disagrees_with_the_graph_is_refused():
    with pytest.raises(ModelError, match="names 3 features but the model input 'features' takes 4"):
        LoadedModel(testing.classifier(features=["a", "b", "c"]), "bad")
    import onnx

    proto = onnx.load_from_string(testing.classifier())
    proto.metadata_props[0].value = json.dumps({"classes": ["x", "y"]})
    with pytest.raises(ModelError, match="names 2 classes but the model outputs 3"):
        LoadedModel(proto.SerializeToString(), "bad")


def test_pointer_parse_names_what_is_wrong():
    good = {"version": "v1", "uri": "serving/models/v1.onnx", "sha256": "a" * 64}
    assert Pointer.parse(json.dumps(good).encode()) == Pointer("v1", "serving/models/v1.onnx", "a" * 64)
    for bad, words in [(b"nope", "not JSON"), (b"[]", "JSON object"), (b"{}", "lacks version, uri, sha256"),
                       (json.dumps({**good, "version": "a/b"}).encode(), "version"),
                       (json.dumps({**good, "sha256": "xyz"}).encode(), "64 lowercase hex")]:
        with pytest.raises(ModelError, match=words):
            Pointer.parse(bad)


def test_publish_then_load_from_pointer(store, model_a):
    pointer = publish(store, "v1", model_a)
    assert store.exists(model_key("v1")) and pointer.sha256 == sha256_of(model_a)
    assert json.loads(store.read(POINTER_KEY)) == {"version": "v1", "uri": pointer.uri, "sha256": pointer.sha256}
    assert load_from_pointer(store).version == "v1"
    # a pointer may also name a key in the same store
    store.put(POINTER_KEY, Pointer("v1b", model_key("v1"), pointer.sha256).to_json())
    assert load_from_pointer(store).version == "v1b"


def test_swap_is_one_reference_change(model_a, model_b):
    slot = ModelSlot()
    a, b = LoadedModel(model_a, "a"), LoadedModel(model_b, "b")
    assert slot.swap(a) is None
    held = slot.model  # a request in flight keeps its reference ...
    assert slot.swap(b) is a
    assert held is a and held.run(np.zeros((1, 4), np.float32)).shape == (1, 3)  # ... and still runs
    assert slot.model is b and slot.swaps == 2


def test_readers_never_see_half_a_swap(model_a, model_b):
    slot = ModelSlot()
    models = {"a": LoadedModel(model_a, "a"), "b": LoadedModel(model_b, "b")}
    X = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    expected = {v: testing.reference(m, X) for v, m in (("a", model_a), ("b", model_b))}
    slot.swap(models["a"])
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            model = slot.model
            out = model.run(X)
            if not np.allclose(out, expected[model.version], rtol=1e-5):
                bad.append(model.version)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(200):
        slot.swap(models["ab"[i % 2]])
    stop.set()
    for t in threads:
        t.join()
    assert not bad


def test_watcher_loads_then_follows_the_pointer(store, model_a, model_b):
    slot = ModelSlot(store.uri_for(POINTER_KEY))
    watcher = PointerWatcher(slot, store, interval_s=0.01)
    assert watcher.check_once() is False and slot.pointer_seen is False and slot.model is None
    publish(store, "v1", model_a)
    assert watcher.check_once() is True and slot.model.version == "v1"
    assert watcher.check_once() is False  # unchanged pointer: nothing to do
    publish(store, "v2", model_b)
    assert watcher.check_once() is True and slot.model.version == "v2" and slot.swaps == 2


@pytest.mark.parametrize("corruption", ["bytes-changed", "sha256-mismatch", "not-onnx", "missing-object",
                                        "bad-pointer", "wrong-width"])
def test_watcher_keeps_the_old_model_on_a_bad_one(store, model_a, corruption):
    slot = ModelSlot(store.uri_for(POINTER_KEY))
    swapped = []
    watcher = PointerWatcher(slot, store, retry_failed_s=60, on_swap=lambda new, old: swapped.append(new.version))
    publish(store, "good", model_a)
    watcher.check_once()
    if corruption == "bytes-changed":
        publish(store, "bad", testing.classifier(seed=5))
        data = bytearray(store.read(model_key("bad")))
        data[-20] ^= 0xFF
        store.put(model_key("bad"), bytes(data))
    elif corruption == "sha256-mismatch":
        info = store.put(model_key("bad"), testing.classifier(seed=5))
        store.put(POINTER_KEY, Pointer("bad", info.uri, sha256_of(model_a)).to_json())
    elif corruption == "not-onnx":
        publish(store, "bad", b"\x08\x07" + b"garbage" * 50)
    elif corruption == "missing-object":
        store.put(POINTER_KEY, Pointer("bad", model_key("nowhere"), "b" * 64).to_json())
    elif corruption == "bad-pointer":
        store.put(POINTER_KEY, b'{"version": "bad"}')
    elif corruption == "wrong-width":
        publish(store, "bad", testing.classifier(width=5, seed=5))  # a model, but its lineage says 4 features
        import onnx

        proto = onnx.load_from_string(store.read(model_key("bad")))
        proto.metadata_props[0].value = json.dumps({"features": ["a", "b", "c", "d"]})
        publish(store, "bad", proto.SerializeToString())
    assert watcher.check_once() is False
    assert slot.model.version == "good" and swapped == ["good"]
    assert slot.last_error is not None
    if corruption != "bad-pointer":
        assert slot.last_error["version"] == "bad"
    status = slot.status()
    assert status["status"] == "ok" and status["model_version"] == "good" and slot.last_error["error"]
    assert status["last_error"]["error"] == "see GET /metadata"  # what /health shows: no error text
    assert watcher.check_once() is False  # the same bad pointer is not retried at once
    publish(store, "fixed", model_a)  # a good pointer clears the error
    assert watcher.check_once() is True
    assert slot.model.version == "fixed" and slot.last_error is None


def test_watcher_thread_swaps_in_the_background(store, model_a, model_b):
    publish(store, "v1", model_a)
    slot = ModelSlot()
    watcher = PointerWatcher(slot, store, interval_s=0.02)
    watcher.check_once()
    watcher.start()
    try:
        publish(store, "v2", model_b)
        for _ in range(250):
            if slot.model.version == "v2":
                break
            threading.Event().wait(0.02)
        assert slot.model.version == "v2"
    finally:
        watcher.stop()
    assert not watcher.is_alive()


def test_the_pointer_carries_the_deploys_trace_to_the_loaded_model(tmp_path, model_a):
    """So the first prediction by a new model is a span of the run's trace (skyfuse.tracing)."""
    store = open_store(f"file://{tmp_path}")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    pointer = publish(store, "v1", model_a, traceparent=parent)
    assert pointer.traceparent == parent and json.loads(store.get(POINTER_KEY))["traceparent"] == parent
    assert load_from_pointer(store).traceparent == parent
    assert Pointer.parse(publish(store, "v2", model_a).to_json()).traceparent is None  # optional
