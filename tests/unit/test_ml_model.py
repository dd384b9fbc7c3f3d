"""skyfuse.ml.model and skyfuse.ml.export: tiny models on a slice of breast_cancer, ONNX parity,
deterministic names and initial weights, refusals with reasons, fine-tuning, save/load."""
import numpy as np
import onnx
import pytest

from skyfuse.ml import data as D
from skyfuse.ml import export as E
from skyfuse.ml import fusion as F
from skyfuse.ml import model as M

TINY = M.ModelSpec(hidden=(8,), epochs=15, batch_size=16, learning_rate=3e-3, seed=0)


@pytest.fixture(scope="module")
def cancer():
    return D.sample_dataset("breast_cancer")


@pytest.fixture(scope="module")
def shard(cancer):
    return cancer.subset(np.arange(200))


@pytest.fixture(scope="module")
def trained(shard):
    return M.train(TINY, shard, 2)


@pytest.fixture(scope="module")
def exported(trained):
    return E.to_onnx(trained.model)


def test_spec_round_trips_through_a_dict():
    spec = M.ModelSpec.from_dict({"hidden": [4, 2], "epochs": 3, "learning_rate": 0.01, "seed": 9})
    assert spec.hidden == (4, 2) and spec.batch_size == 16
    assert spec.to_dict() == {"hidden": [4, 2], "epochs": 3, "batch_size": 16, "learning_rate": 0.01, "seed": 9,
                              "optimizer": "adam", "init": "glorot", "early_stopping": True, "proximal_mu": 0.0}
    assert M.ModelSpec.from_dict(spec.to_dict()) == spec
    assert M.ModelSpec.from_dict(None) == M.ModelSpec()
    with pytest.raises(ValueError, match="unknown model spec keys \\['layers'\\]"):
        M.ModelSpec.from_dict({"layers": 2})


def test_build_names_layers_and_outputs_probabilities():
    m = M.build(M.ModelSpec(hidden=(4, 3)), 5, 2, np.zeros(5), np.ones(5))
    assert [layer.name for layer in m.layers] == ["features", "standardize", "dense_0", "dense_1", "out"]
    assert [v.path for v in m.weights] == ["standardize/mean", "standardize/variance", "dense_0/kernel",
                                            "dense_0/bias", "dense_1/kernel", "dense_1/bias", "out/kernel", "out/bias"]
    p = M.predict_proba(m, np.random.default_rng(0).normal(size=(7, 5)))
    assert p.shape == (7, 2)  # binary: two softmax units
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)


def test_standardization_is_fixed_and_handles_zero_variance():
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.0, 9.0])
    m = M.build(M.ModelSpec(hidden=(2,)), 3, 3, mean, var)
    got_mean, got_var = M.standardization(m)
    np.testing.assert_allclose(got_mean, mean)
    np.testing.assert_allclose(got_var, [4.0, 1.0, 9.0])  # zero variance -> 1
    assert m.get_layer("standardize").trainable_weights == []
    x = np.array([[1.0, 1e6, 3.0]], np.float32)
    assert np.isfinite(M.predict_proba(m, x)).all()


def test_same_seed_same_initial_weights_and_onnx_names():
    spec = M.ModelSpec(hidden=(6, 4), seed=5)
    a = M.build(spec, 4, 3, np.zeros(4), np.ones(4))
    b = M.build(spec, 4, 3, np.zeros(4), np.ones(4))
    c = M.build(M.ModelSpec(hidden=(6, 4), seed=6), 4, 3, np.zeros(4), np.ones(4))
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert not np.array_equal(a.get_weights()[2], c.get_weights()[2])
    ga, gc = (onnx.load_from_string(E.to_onnx(m)).graph for m in (a, c))
    assert [t.name for t in ga.initializer] == [t.name for t in gc.initializer]
    assert {t.name for t in ga.initializer} == {"standardize.mean", "standardize.variance", "dense_0.kernel",
                                                 "dense_0.bias", "dense_1.kernel", "dense_1.bias", "out.kernel",
                                                 "out.bias"}
    # zero biases and unit variances are not folded away: the graph depends on the spec only
    assert [(n.op_type, list(n.input)) for n in ga.node] == [(n.op_type, list(n.input)) for n in gc.node]


def test_training_reports_validation_and_learns(trained, shard, cancer):
    assert trained.samples == len(shard) == 200
    assert trained.validation["rows"] == 40 == len(trained.validation_rows)
    assert abs(trained.validation_rows.y.mean() - shard.y.mean()) <= 1 / 40  # stratified
    assert 0.8 <= trained.validation["accuracy"] <= 1.0 and trained.validation["loss"] > 0
    assert 1 <= trained.epochs <= TINY.epochs and trained.seconds > 0
    held_out = cancer.subset(np.arange(200, 569))
    acc = np.mean(M.predict_proba(trained.model, held_out.X).argmax(1) == held_out.y)
    assert acc > 0.85
    mean, var = M.standardization(trained.model)  # the shard's own statistics by default
    np.testing.assert_allclose(mean, shard.X.astype(np.float64).mean(0), rtol=1e-5)


def test_training_is_deterministic_and_stops_early(shard):
    spec = M.ModelSpec(hidden=(8,), epochs=400, learning_rate=1e-2, seed=1)
    a, b = M.train(spec, shard, 2), M.train(spec, shard, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a.model.get_weights(), b.model.get_weights(), strict=True))
    assert a.epochs < 400 and a.validation == b.validation  # validation loss stopped improving


@pytest.mark.parametrize("epochs_per_call", [1, 7])
def test_a_run_split_over_calls_trains_as_one_call(shard, monkeypatch, epochs_per_call):
    """A big shard's shuffles go to the loop a few epochs at a time: early stopping carries over
    from one call to the next, so the run stops at the same epoch with the same weights."""
    spec = M.ModelSpec(hidden=(8,), epochs=400, learning_rate=1e-2, seed=1)
    whole = M.train(spec, shard, 2)
    monkeypatch.setattr(M, "_ORDER_ENTRIES", epochs_per_call * len(shard))  # > the training rows: that many epochs
    split = M.train(spec, shard, 2)
    assert split.epochs == whole.epochs < 400 and split.validation == whole.validation
    for a, b in zip(split.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_onnx_export_parity_and_signature(trained, exported, shard):
    X_val = shard.X[-40:]
    assert E.parity(trained.model, exported, X_val) <= 1e-5
    d = E.describe(exported)
    assert d["opset"] == 17
    assert d["inputs"] == [{"name": "features", "shape": ["N", 30], "dtype": "float32"}]
    assert d["outputs"] == [{"name": "prob", "shape": ["N", 2], "dtype": "float32"}]
    p = F.predict(exported, X_val)
    assert p.dtype == np.float32 and p.shape == (40, 2)


def test_export_other_opsets(trained, shard):
    for opset in (13, 18):
        raw = E.to_onnx(trained.model, opset=opset)
        assert E.describe(raw)["opset"] == opset
        assert E.parity(trained.model, raw, shard.X[:20]) <= 1e-5


def test_training_refuses_a_single_class_shard(cancer):
    one = cancer.subset(np.flatnonzero(cancer.y == 1)[:50])
    with pytest.raises(M.TrainingError, match=r"all have the same class \(1\).*at least 2 classes"):
        M.train(TINY, one, 2)


def test_training_refuses_a_tiny_shard(cancer):
    tiny = cancer.subset([0, 1, 2, 19])
    with pytest.raises(M.TrainingError, match="4 rows; training needs at least 5"):
        M.train(TINY, tiny, 2)
    assert issubclass(M.TrainingError, ValueError)


def test_rare_class_falls_back_to_a_random_validation_split(cancer):
    rows = np.concatenate([np.flatnonzero(cancer.y == 0)[:1], np.flatnonzero(cancer.y == 1)[:29]])
    result = M.train(M.ModelSpec(hidden=(4,), epochs=2), cancer.subset(rows), 2)
    assert result.validation["rows"] == 6


def test_a_small_shards_split_is_kept_and_cannot_be_changed(cancer):
    y = cancer.y[:120]
    first, again = M._validation_split(y, 0.2, 3), M._validation_split(y.copy(), 0.2, 3)
    assert again[1] is first[1]  # made once: the shard trains again every round
    fresh = M._split(y, 0.2, 3)
    assert np.array_equal(first[0], fresh[0]) and np.array_equal(first[1], fresh[1])
    with pytest.raises(ValueError, match="read-only"):
        first[0][0] = 1


def test_shared_stats_replace_the_shard_statistics(shard):
    mean, var = np.full(30, 2.0), np.full(30, 3.0)
    result = M.train(M.ModelSpec(hidden=(4,), epochs=1), shard, 2, stats=(mean, var))
    got = M.standardization(result.model)
    np.testing.assert_allclose(got[0], mean) and np.testing.assert_allclose(got[1], var)


def test_fine_tuning_starts_from_the_initial_model(trained, cancer):
    other = cancer.subset(np.arange(300, 400))
    frozen = M.ModelSpec(hidden=(8,), epochs=1, learning_rate=1e-12, seed=3)
    tuned = M.train(frozen, other, 2, initial=trained.model).model
    for before, after in zip(trained.model.get_weights(), tuned.get_weights(), strict=True):
        np.testing.assert_allclose(after, before, atol=1e-6)  # its weights and its standardization
    fresh = M.train(frozen, other, 2).model
    assert not np.allclose(fresh.get_weights()[2], trained.model.get_weights()[2])
    with pytest.raises(M.TrainingError, match="do not fit the spec"):
        M.train(M.ModelSpec(hidden=(5,), epochs=1), other, 2, initial=trained.model)


def test_fine_tuning_kept_warm_compiles_once_and_trains_as_a_fresh_loop(trained, cancer):
    """A trainer instance fine-tunes the same shard every FedAvg round: the kept loop is compiled
    once, and each round's result equals that of a loop built for it."""
    other = cancer.subset(np.arange(300, 400))
    spec = M.ModelSpec(hidden=(8,), optimizer="sgd", early_stopping=False, seed=3)
    warm_models = []
    for lr in (0.3, 0.2, 0.1):
        round_spec = M.ModelSpec(**{**spec.to_dict(), "learning_rate": lr})
        warm = M.train(round_spec, other, 2, initial=trained.model, epochs=3, keep_warm=True)
        cold = M.train(round_spec, other, 2, initial=trained.model, epochs=3)
        for a, b in zip(warm.model.get_weights(), cold.model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert warm.validation == cold.validation
        warm_models.append(warm.model)
    assert warm_models[0] is warm_models[1] is warm_models[2]  # one loop; this thread's copy of its model, kept
    loop = M._LOOPS.get(M._warm_key(None, spec, other.n_features, 2, proximal=True))
    assert loop is not None and loop.fit.experimental_get_tracing_count() == 1
    adam = M.train(M.ModelSpec(hidden=(8,), seed=3), other, 2, initial=trained.model, epochs=3, keep_warm=True)
    assert adam.model is not warm_models[0]  # other settings: a loop of its own


def test_one_kept_loop_trains_shards_of_any_size_each_as_a_fresh_loop(cancer):
    """A trainer instance holding many shards compiles one loop for all of them: the rows are the
    loop's arguments, and each shard starts from the seeded weights with its own standardization."""
    spec = M.ModelSpec(hidden=(8,), epochs=4, seed=7)
    warm_models = []
    for rows in (np.arange(0, 100), np.arange(100, 137), np.arange(200, 263)):
        shard = cancer.subset(rows)
        warm = M.train(spec, shard, 2, keep_warm=True)
        cold = M.train(spec, shard, 2)
        for a, b in zip(warm.model.get_weights(), cold.model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert warm.validation == cold.validation and warm.epochs == cold.epochs
        np.testing.assert_allclose(M.standardization(warm.model)[0], shard.X.mean(axis=0), rtol=1e-5)
        warm_models.append(warm.model)
    assert warm_models[0] is warm_models[1] is warm_models[2]
    loop = M._LOOPS.get(M._warm_key(None, spec, cancer.n_features, 2, proximal=False))
    assert loop is not None and loop.fit.experimental_get_tracing_count() == 1


def test_threads_share_a_kept_loop_and_each_keeps_its_own_result(cancer):
    """The local fleet's trainers are threads of one process: they compile a loop once between
    them, train on it one at a time, and each result stays its thread's until its next training."""
    import threading

    spec = M.ModelSpec(hidden=(8,), epochs=4, seed=11)
    shards = [cancer.subset(np.arange(i * 60, i * 60 + 60)) for i in range(4)]
    expected = [M.train(spec, shard, 2).model.get_weights() for shard in shards]
    got: dict[int, list] = {}

    def trainer(i: int) -> None:
        result = M.train(spec, shards[i], 2, keep_warm=True)
        got[i] = result.model.get_weights()

    threads = [threading.Thread(target=trainer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for a, b in zip(got[i], expected[i], strict=True):
            np.testing.assert_array_equal(a, b)
    loop = M._LOOPS.get(M._warm_key(None, spec, cancer.n_features, 2, proximal=False))
    assert loop is not None and loop.fit.experimental_get_tracing_count() == 1


def test_a_second_model_of_one_architecture_exports_without_tracing(trained, shard, cancer, monkeypatch):
    other = M.train(M.ModelSpec(**{**TINY.to_dict(), "seed": 5}), cancer.subset(np.arange(300, 400)), 2).model
    E.to_onnx(trained.model)  # this architecture's graph, kept
    traced = E.to_onnx(other, fresh=True)
    monkeypatch.setattr(E, "_trace", lambda *a: pytest.fail("traced again"))
    reused = E.to_onnx(other)
    assert reused == traced  # byte for byte: the graph is the architecture's, the initializers the weights
    assert E.parity(other, reused, shard.X) <= 1e-5


def test_a_kept_model_loads_the_next_file_of_its_architecture_as_a_fresh_load(trained, cancer):
    other = M.train(TINY, cancer.subset(np.arange(300, 400)), 2).model  # a run's members share one seed
    first = M.from_bytes(M.to_bytes(trained.model), keep=True)
    second = M.from_bytes(M.to_bytes(other), keep=True)
    assert second is first  # one architecture: one kept model, its weights replaced
    for a, b in zip(second.get_weights(), M.from_bytes(M.to_bytes(other)).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    wider = M.train(M.ModelSpec(hidden=(6,), epochs=1), cancer.subset(np.arange(300, 400)), 2).model
    assert M.from_bytes(M.to_bytes(wider), keep=True) is not first


def test_save_and_load(trained, shard, tmp_path):
    path = M.save(trained.model, tmp_path / "member")
    assert path.name == "member.keras" and path.exists()
    back = M.load(path)
    np.testing.assert_allclose(M.predict_proba(back, shard.X), M.predict_proba(trained.model, shard.X), atol=1e-7)
    np.testing.assert_allclose(M.standardization(back)[0], M.standardization(trained.model)[0])
    raw = E.to_onnx(back)  # what the exporter does with a model it fetched
    assert E.parity(back, raw, shard.X) <= 1e-5
    assert ([t.name for t in onnx.load_from_string(raw).graph.initializer]
            == [t.name for t in onnx.load_from_string(E.to_onnx(trained.model)).graph.initializer])


def test_pooled_stats_is_offered_by_the_model_module(shard):
    a, b = shard.subset(np.arange(50)), shard.subset(np.arange(50, 200))
    mean, var = M.pooled_stats([a.summary(), b.summary()])
    np.testing.assert_allclose(var, shard.X.astype(np.float64).var(0), rtol=1e-9)


# ---------------------------------------------------------- worked-example options, FedProx


def test_spec_options_are_checked_by_name():
    for bad, message in (({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not one of adam, sgd"),
                         ({"init": "he"}, "init 'he' is not one of glorot, normal"),
                         ({"early_stopping": "no"}, "early_stopping must be true or false, got 'no'"),
                         ({"proximal_mu": -0.1}, "proximal_mu must be a finite number >= 0, got -0.1")):
        with pytest.raises(ValueError, match=message):
            M.ModelSpec.from_dict(bad)
    fleet = {"hidden": [3], "epochs": 7, "rounds": 10, "learning_rate": 0.5}  # rounds: not a spec key, ignored
    spec = M.ModelSpec.from_dict({"epochs": 10, "optimizer": "sgd"}, defaults=fleet)
    assert (spec.hidden, spec.epochs, spec.learning_rate, spec.optimizer) == ((3,), 10, 0.5, "sgd")


def _dense_parameters(model) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


def test_normal_init_draws_every_parameter_from_a_standard_normal():
    spec = M.ModelSpec(hidden=(64, 32), init="normal", seed=7)
    values = _dense_parameters(M.build(spec, 20, 3, np.zeros(20), np.ones(20)))
    assert len(values) == 20 * 64 + 64 + 64 * 32 + 32 + 32 * 3 + 3  # kernels and biases alike
    assert abs(values.mean()) < 0.06 and 0.95 < values.std() < 1.05
    again = _dense_parameters(M.build(spec, 20, 3, np.zeros(20), np.ones(20)))
    other_spec = M.ModelSpec(hidden=(64, 32), init="normal", seed=8)
    other = _dense_parameters(M.build(other_spec, 20, 3, np.zeros(20), np.ones(20)))
    assert np.array_equal(values, again) and not np.allclose(values, other)
    biases = M.build(spec, 20, 3, np.zeros(20), np.ones(20)).get_layer("dense_0").bias.numpy()
    assert biases.std() > 0.5  # not zeros, as Glorot's biases are
    glorot = _dense_parameters(M.build(M.ModelSpec(hidden=(64, 32), seed=7), 20, 3, np.zeros(20), np.ones(20)))
    assert glorot.std() < 0.3


def test_full_batch_sgd_takes_exactly_lr_times_the_gradient(shard):
    import tensorflow as tf

    spec = M.ModelSpec(hidden=(8,), init="normal", optimizer="sgd", learning_rate=0.01, batch_size=10_000,
                       epochs=1, early_stopping=False, seed=4)
    stats = (shard.X.mean(0), shard.X.var(0))
    start = M.build(spec, shard.n_features, 2, *stats)
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.SparseCategoricalCrossentropy()(shard.y, start(shard.X, training=True))
    grads = tape.gradient(loss, start.trainable_variables)
    expected = [v.numpy() - 0.01 * g.numpy() for v, g in zip(start.trainable_variables, grads, strict=True)]
    # validation_fraction=0: every row is a training row, so one epoch is one step on all of them
    stepped = M.train(spec, shard, 2, stats=stats, validation_fraction=0.0)
    assert stepped.epochs == 1
    for got, want in zip(stepped.model.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_without_early_stopping_exactly_the_epochs_run(shard):
    # a learning rate this large makes the validation loss worse at once: early stopping would end
    # after PATIENCE epochs and restore the first weights
    spec = dict(hidden=(8,), init="normal", optimizer="sgd", learning_rate=5.0, batch_size=10_000, seed=2)
    stopped = M.train(M.ModelSpec(**spec, epochs=40), shard, 2)
    kept = M.train(M.ModelSpec(**spec, epochs=40, early_stopping=False), shard, 2)
    ten = M.train(M.ModelSpec(**spec, epochs=10, early_stopping=False), shard, 2)
    assert stopped.epochs < 40 and kept.epochs == 40 and ten.epochs == 10
    assert not np.allclose(ten.model.get_weights()[2], stopped.model.get_weights()[2])


def _distance(model, reference) -> float:
    pairs = zip(model.get_weights(), reference.get_weights(), strict=True)
    return float(sum(np.sum((a - b) ** 2) for a, b in pairs) ** 0.5)


def test_fedprox_mu_zero_is_plain_fine_tuning_and_mu_pulls_towards_the_global_model(trained, cancer):
    other = cancer.subset(np.arange(300, 500))
    spec = dict(hidden=(8,), epochs=5, learning_rate=1e-2, seed=3, early_stopping=False)
    plain = M.train(M.ModelSpec(**spec), other, 2, initial=trained.model).model
    zero = M.train(M.ModelSpec(**spec, proximal_mu=0.0), other, 2, initial=trained.model).model
    assert all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), zero.get_weights(), strict=True))
    pulled = M.train(M.ModelSpec(**spec, proximal_mu=1.0), other, 2, initial=trained.model).model
    held = M.train(M.ModelSpec(**spec, proximal_mu=100.0), other, 2, initial=trained.model).model
    d_plain, d_pulled, d_held = (_distance(m, trained.model) for m in (plain, pulled, held))
    assert d_held < d_pulled < d_plain
    # without a global model (the first training) there is nothing to pull towards: mu changes nothing
    a = M.train(M.ModelSpec(**spec), other, 2).model
    b = M.train(M.ModelSpec(**spec, proximal_mu=100.0), other, 2).model
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


def test_with_onnx_weights_sets_a_keras_model_from_onnx_parameters(trained, exported, shard):
    values = {name: value * 0.5 for name, value in F.parameters(exported).items()}
    target = M.from_bytes(M.to_bytes(trained.model))
    M.with_onnx_weights(target, values)
    np.testing.assert_allclose(target.get_layer("dense_0").kernel.numpy(), values["dense_0.kernel"])
    np.testing.assert_allclose(M.standardization(target)[0], values["standardize.mean"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"no values for the model's weights \['out.bias'\]"):
        M.with_onnx_weights(target, {k: v for k, v in values.items() if k != "out.bias"})



def test_build_checks_its_statistics_and_takes_a_zero_or_infinite_variance_as_one():
    with pytest.raises(ValueError, match="mean and variance must have 4 values each"):
        M.build(TINY, 4, 2, np.zeros(3), np.ones(4))
    mean, variance = M.standardization(M.build(TINY, 4, 2, np.arange(4), [0, 1, np.inf, 4]))
    np.testing.assert_array_equal(mean, [0, 1, 2, 3])
    np.testing.assert_array_equal(variance, [1, 1, 1, 4])
