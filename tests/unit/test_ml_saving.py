"""skyfuse.ml.saving and skyfuse.ml.compiled: .keras files written and read without Keras' walk
(and, once an architecture's file is known, without HDF5) are the files Keras writes and reads;
a model's weights and forward pass in one call give Keras' own values."""
import gc
import io
import threading
import weakref
import zipfile

import keras
import numpy as np
import pytest

from skyfuse.ml import compiled as C
from skyfuse.ml import data as D
from skyfuse.ml import model as M
from skyfuse.ml import saving as S

SPEC = M.ModelSpec(hidden=(8, 4), epochs=3, seed=2)


@pytest.fixture(scope="module")
def cancer():
    return D.sample_dataset("breast_cancer")


@pytest.fixture(scope="module")
def models(cancer):
    return [M.train(M.ModelSpec(**{**SPEC.to_dict(), "seed": s}), cancer.subset(np.arange(s * 50, s * 50 + 80)),
                    2).model for s in range(4)]


def _same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


def _keras_load(raw: bytes, tmp_path, name: str):
    path = tmp_path / f"{name}.keras"
    path.write_bytes(raw)
    return keras.models.load_model(path, compile=False)


def test_files_written_without_the_walk_are_the_files_keras_reads(models, tmp_path):
    for i, model in enumerate(models):  # the first one recorded the layout; the next ones use the image
        raw = M.to_bytes(model)
        assert zipfile.ZipFile(io.BytesIO(raw)).namelist() == ["metadata.json", "config.json", "model.weights.h5"]
        assert _same_weights(_keras_load(raw, tmp_path, f"m{i}"), model)
        target = keras.models.clone_model(model)
        (tmp_path / f"w{i}.keras").write_bytes(raw)
        target.load_weights(tmp_path / f"w{i}.keras")  # Keras' own weights-only loader reads them too
        assert _same_weights(target, model)


def test_an_image_write_equals_an_hdf5_write_byte_for_byte(models):
    layout = S.Layout.of(models[0])
    assert layout is not None and [len(entries) for _, _, entries in layout.groups if entries] == [2, 2, 2, 2]
    image = S.Image.of(layout, layout.h5(models[0].get_weights()))
    assert image is not None
    for model in models[1:]:
        assert image.with_values(model.get_weights()) == layout.h5(model.get_weights())


def test_a_kept_model_reads_files_keras_wrote_and_files_laid_out_otherwise(models, tmp_path):
    keras_files = []
    for i, model in enumerate(models):
        keras_files.append(M.save(model, tmp_path / f"k{i}.keras").read_bytes())  # written by Keras itself
    for raw, model in zip(keras_files + [M.to_bytes(m) for m in models], models + models, strict=True):
        assert _same_weights(M.from_bytes(raw, keep=True), model)
    kept = M._thread_state.models[zipfile.ZipFile(io.BytesIO(keras_files[0])).read("config.json").decode()]
    assert kept.known is not None and kept.known.image is not None  # read by slicing, after the first


def test_a_file_that_differs_outside_the_weights_is_read_by_keras_rules(models):
    layout = S.Layout.of(models[0])
    known = S._Known(layout)
    known.read(layout.h5(models[0].get_weights()))
    image = known.image
    assert image is not None
    data = bytearray(layout.h5(models[1].get_weights()))
    first = min(offset for offset, _ in image.spans)
    data[first - 1] ^= 0xFF  # a byte of the structure, not of a weight
    assert image.values(bytes(data), layout.signature) is None
    same = image.values(layout.h5(models[1].get_weights()), layout.signature)
    assert same is not None and all(np.array_equal(a, b) for a, b in zip(same, models[1].get_weights(), strict=True))


def test_a_model_whose_walk_stores_more_than_its_weights_is_saved_by_keras(models, tmp_path):
    compiled_model = keras.models.clone_model(models[0])
    compiled_model.set_weights(models[0].get_weights())
    compiled_model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    compiled_model.optimizer.build(compiled_model.trainable_variables)
    assert S.Layout.of(compiled_model) is None  # the optimizer's variables are not model.weights
    back = _keras_load(M.to_bytes(compiled_model), tmp_path, "compiled")
    assert _same_weights(back, models[0])


def test_one_call_reads_sets_and_runs_a_model_as_keras_does(models, cancer):
    model = keras.models.clone_model(models[0])
    X = cancer.X[:7]
    for use in range(3):  # the first use is Keras' own; compiled from the second
        C.assign_weights(model, models[use].get_weights())
        assert _same_weights(model, models[use])
        assert all(np.array_equal(a, b) for a, b in zip(C.read_weights(model), models[use].get_weights(),
                                                         strict=True))
        np.testing.assert_allclose(C.forward(model, X), np.asarray(model(X.astype(np.float32), training=False)),
                                   rtol=1e-6, atol=1e-7)
    assert C._SEEN[model] is not None
    with pytest.raises(ValueError, match="3 values"):
        C.assign_weights(model, models[0].get_weights()[:3])


def test_compiled_functions_do_not_keep_a_model_alive(models):
    model = keras.models.clone_model(models[0])
    for _ in range(2):
        C.read_weights(model)
        C.forward(model, np.zeros((2, models[0].inputs[0].shape[-1])))
    assert C._SEEN[model] is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_threads_write_and_read_files_of_one_architecture(models):
    got: dict[int, bool] = {}

    def worker(i: int) -> None:
        ok = True
        for model in models:
            ok &= _same_weights(M.from_bytes(M.to_bytes(model), keep=True), model)
        got[i] = ok

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {0: True, 1: True, 2: True, 3: True}
