"""A user's own Keras model instead of the built-in MLP: resolving `--model`, checking that it fits
the task, training it with skyfuse's loop, exporting any single-input architecture to ONNX, and
FedAvg refusing members of different architectures with the difference named."""
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from skyfuse import contracts
from skyfuse.ml import data as mldata
from skyfuse.ml import export as E
from skyfuse.ml import fusion
from skyfuse.ml import model as M

keras = M.keras  # imported after the TensorFlow log settings skyfuse.ml.model makes
CNN_FILE = str(Path(__file__).resolve().parents[1] / "models" / "digits_cnn.py")
CNN = f"{CNN_FILE}:build"


@pytest.fixture(scope="module")
def digits():
    train, _, test = mldata.split(mldata.sample_dataset("digits"), seed=0)
    return train, test


def conv_model(filters=4, n_features=64, n_classes=10, batch_norm=True):
    """Reshape, Conv2D, BatchNormalization, pooling, Dropout: the layers a user's model brings. The
    weighted layers are named, so two models built here share names as copies of one file do."""
    side = int(np.sqrt(n_features))
    layers = [keras.Input(shape=(n_features,)), keras.layers.Reshape((side, side, 1)),
              keras.layers.Conv2D(filters, 3, activation="relu", name="conv")]
    layers += [keras.layers.BatchNormalization(name="norm")] if batch_norm else []
    layers += [keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dropout(0.2),
               keras.layers.Dense(n_classes, activation="softmax", name="out")]
    return keras.Sequential(layers)


def write(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------- resolving


def test_a_python_file_and_function_give_the_model(digits):
    model = M.load_user_model(CNN)
    assert isinstance(model, keras.Model) and any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)
    M.check_user_model(model, 64, 10, digits[0].X[:32])


def test_a_dotted_module_and_a_keras_file_give_the_model_too(tmp_path):
    assert M.load_user_model("tests.models.digits_cnn:build").name == "digits_cnn"
    path = M.save(conv_model(), tmp_path / "mine.keras")
    loaded = M.load_user_model(str(path))
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in conv_model().layers]


def test_the_seed_makes_the_initial_weights_reproducible():
    a, b, c = (M.load_user_model(CNN, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_a_missing_function_names_the_functions_the_file_has(tmp_path):
    path = write(tmp_path / "models.py", "import keras\n\ndef small():\n    pass\n\ndef large():\n    pass\n")
    with pytest.raises(M.UserModelError, match=rf"{path} has no function 'build'; found: large, small"):
        M.load_user_model(f"{path}:build")


@pytest.mark.parametrize("spec, message", [
    ("nope/cnn.py:build", r"no such file: nope/cnn.py"),
    ("nope.keras", r"no such file: nope.keras"),
    ("cnn", r"expected a .keras file or MODULE:FUNCTION"),
    ("tests/models/digits_cnn.py:", r"expected a .keras file or MODULE:FUNCTION"),
    ("tests/models/digits_cnn.py:2build", r"expected a .keras file or MODULE:FUNCTION"),
    ("no_such_package.models:build", r"no_such_package.models cannot be imported: No module named 'no_such_package'"),
])
def test_a_spec_that_names_nothing_usable_says_what_was_expected(spec, message):
    with pytest.raises(M.UserModelError, match=message):
        M.load_user_model(spec)


def test_what_the_users_code_raises_or_returns_is_reported(tmp_path):
    broken = write(tmp_path / "broken.py", "raise RuntimeError('no GPU here')\n")
    with pytest.raises(M.UserModelError, match=r"importing .*broken.py raised RuntimeError: no GPU here"):
        M.load_user_model(f"{broken}:build")
    path = write(tmp_path / "odd.py",
                 "def fails():\n    raise ValueError('bad width')\n\ndef text():\n    return 'cnn'\n")
    with pytest.raises(M.UserModelError, match=r"fails\(\) raised ValueError: bad width"):
        M.load_user_model(f"{path}:fails")
    with pytest.raises(M.UserModelError, match=r"text\(\) returned str, expected a keras.Model"):
        M.load_user_model(f"{path}:text")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(M.UserModelError, match=r"junk.keras is not a loadable .keras model"):
        M.load_user_model(str(tmp_path / "junk.keras"))


# ---------------------------------------------------------------------------------- checking


def test_a_model_that_does_not_fit_the_task_is_refused_with_what_it_needs(digits):
    X = digits[0].X[:16]
    with pytest.raises(M.UserModelError, match=r"input is \(None, 16\), the data has rows of 64 features.*Reshape"):
        M.check_user_model(conv_model(n_features=16), 64, 10, X)
    with pytest.raises(M.UserModelError, match=r"output is \(None, 3\), the task needs \(None, 10\)"):
        M.check_user_model(conv_model(n_classes=3), 64, 10, X)
    sigmoid = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(M.UserModelError, match=r"needs \(None, 2\).*Dense\(2, activation='softmax'\)"):
        M.check_user_model(sigmoid, 64, 2, X)
    logits = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    with pytest.raises(M.UserModelError, match=r"not class probabilities .*end it with a softmax over the 10"):
        M.check_user_model(logits, 64, 10, X)
    unbuilt = keras.Sequential([keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(M.UserModelError, match=r"no defined input; begin it with keras.Input"):
        M.check_user_model(unbuilt, 64, 10, X)
    two = keras.Input((64,))
    pair = keras.Model(two, [keras.layers.Dense(10, activation="softmax")(two)] * 2)
    with pytest.raises(M.UserModelError, match=r"1 inputs and 2 outputs; skyfuse needs one of each"):
        M.check_user_model(pair, 64, 10, X)


def test_a_model_the_trainers_could_not_load_is_refused_before_the_run(digits):
    inputs = keras.Input((64,))
    lam = keras.Model(inputs, keras.layers.Lambda(lambda x: keras.ops.softmax(x[:, :10]))(inputs))
    with pytest.raises(M.UserModelError, match=r"cannot be saved and loaded again as .keras.*no Lambda layers"):
        M.check_user_model(lam, 64, 10, digits[0].X[:8])


# ---------------------------------------------------------------------------------- training


def test_the_users_model_trains_with_skyfuses_loop_on_raw_features(digits):
    train, test = digits
    template = M.load_user_model(CNN, seed=0)
    start = [w.copy() for w in template.get_weights()]
    result = M.train(M.ModelSpec(epochs=8, seed=0), train, 10, template=template)
    assert result.model is template and result.epochs >= 1
    assert not np.array_equal(start[0], template.get_weights()[0])  # trained in place
    assert not any(layer.name == M.STANDARDIZE for layer in result.model.layers)  # no built-in standardization
    assert result.validation["rows"] > 0 and result.validation["accuracy"] > 0.8
    assert (M.predict_proba(result.model, test.X).argmax(1) == test.y).mean() > 0.8  # chance is 0.1


def test_fine_tuning_a_user_model_starts_from_the_global_weights_and_checks_they_fit(digits):
    train = digits[0]
    shard = train.subset(np.arange(200))
    global_model = M.train(M.ModelSpec(epochs=2), shard, 10, template=conv_model()).model
    tuned = M.train(M.ModelSpec(epochs=1), shard, 10, template=conv_model(), initial=global_model)
    assert [w.shape for w in tuned.model.get_weights()] == [w.shape for w in global_model.get_weights()]
    with pytest.raises(M.TrainingError, match=r"initial model's weights .* do not fit the model template"):
        M.train(M.ModelSpec(epochs=1), shard, 10, template=conv_model(filters=6), initial=global_model)
    with pytest.raises(M.TrainingError, match=r"template does not fit this task: its output is \(None, 3\)"):
        M.train(M.ModelSpec(epochs=1), shard, 10, template=conv_model(n_classes=3))


def test_a_user_model_with_dropout_fine_tunes_kept_warm_exactly_as_a_fresh_copy(digits):
    """Each round the trainer loads the template anew; kept warm, the loop's copy must draw the
    same Dropout masks as that fresh copy, whatever else used the process's random numbers in
    between (a loaded model's seed generators start from them): training seeds them itself."""
    import random

    shard = digits[0].subset(np.arange(200))
    template = M.to_bytes(conv_model())
    global_model = M.train(M.ModelSpec(epochs=2), shard, 10, template=M.from_bytes(template)).model
    spec = M.ModelSpec(optimizer="sgd", early_stopping=False, learning_rate=0.05)
    for _ in range(2):
        random.random()  # others' draws (a host's backoff jitter, say) move the next load's seed
        warm = M.train(spec, shard, 10, template=M.from_bytes(template), initial=global_model, epochs=2,
                       keep_warm=True)
        random.random()
        cold = M.train(spec, shard, 10, template=M.from_bytes(template), initial=global_model, epochs=2)
        for a, b in zip(warm.model.get_weights(), cold.model.get_weights(), strict=True):
            # not bit for bit: TensorFlow may sum a convolution's gradients in another order;
            # other Dropout masks would move the weights by orders of magnitude more
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- export, fedavg


def test_a_convolutional_model_exports_with_parity_and_a_graph_fixed_by_its_architecture(digits):
    train, test = digits
    keras.utils.set_random_seed(0)
    template = M.to_bytes(conv_model())
    parts = mldata.partition(train, 2, "iid", seed=0)
    models = [M.train(M.ModelSpec(epochs=10, seed=i), p, 10, template=M.from_bytes(template)).model
              for i, p in enumerate(parts)]
    members = [E.to_onnx(m, fresh=True) for m in models]  # each traced on its own, not the graph reused
    for m, raw in zip(models, members, strict=True):
        assert E.parity(m, raw, test.X) < 1e-5
        graph = onnx.load_from_string(raw).graph
        assert {"Conv", "MaxPool"} <= {n.op_type for n in graph.node}
        # the initializers are exactly the weights (Dropout's seed state and folded constants stay out)
        assert [t.name for t in graph.initializer] == ["conv.kernel", "conv.bias", "norm.gamma", "norm.beta",
                                                       "out.kernel", "out.bias", "norm.moving_mean",
                                                       "norm.moving_variance"]
    # trained apart, exported apart: one graph, so FedAvg averages them, as Keras averages their weights
    assert fusion.fedavg_mismatch(members) is None
    fused = fusion.fuse("fedavg", members, [len(p) for p in parts])
    averaged = M.average(models, [len(p) for p in parts])
    np.testing.assert_allclose(fusion.predict(fused, test.X), M.predict_proba(averaged, test.X), atol=1e-5)
    for strategy in ("wavg", "vote", "confidence"):
        assert fusion.accuracy(fusion.fuse(strategy, members), test) > 0.5


def test_fedavg_names_what_differs_between_members_of_two_architectures():
    members = [E.to_onnx(conv_model(filters=4)), E.to_onnx(conv_model(filters=4)), E.to_onnx(conv_model(filters=6))]
    assert fusion.fedavg_mismatch(members) == (2, ("initializer 'conv.kernel': shape [3, 3, 1, 4] FLOAT in member 0, "
                                                   "[3, 3, 1, 6] FLOAT in this member"))
    with pytest.raises(fusion.FusionError, match=r"member 2 differs"):
        fusion.fuse("fedavg", members)
    no_norm = E.to_onnx(conv_model(batch_norm=False))
    assert fusion.fedavg_mismatch([members[0], no_norm]) == (1, (
        "weights differ: only in member 0: ['norm.beta', 'norm.gamma', 'norm.moving_mean', 'norm.moving_variance']; "
        "only in this member: []"))
    assert fusion.fuse("wavg", members + [no_norm])  # the ensembles take any architecture


def test_the_fuser_says_which_members_differ_and_what_to_do():
    from services.fuser.handler import architecture_mismatch

    members = [{"cloud": c, "shard_id": str(i)} for i, c in enumerate(["aws", "gcp", "azure"])]
    onnx_models = [E.to_onnx(conv_model(filters=f)) for f in (4, 4, 6)]
    reason = architecture_mismatch(members, onnx_models)
    assert reason.startswith("fedavg needs the same model architecture in every member, and azure-2 differs "
                             "from aws-0: initializer 'conv.kernel': shape [3, 3, 1, 4] FLOAT in aws-0, "
                             "[3, 3, 1, 6] FLOAT in azure-2")
    assert "skyfuse train --model" in reason and "wavg, vote or confidence" in reason
    assert architecture_mismatch(members, onnx_models[:2]) is None


def test_shard_ready_carries_the_template_with_its_digest():
    data = contracts.sample("shard.ready")
    model = {**data["model"], "template_uri": "s3://skyfuse-aws/runs/r1/model.keras", "template_sha256": "ab" * 32}
    contracts.validate("shard.ready", {**data, "model": model})
    del model["template_sha256"]
    with pytest.raises(contracts.ContractError, match="template_sha256"):
        contracts.validate("shard.ready", {**data, "model": model})


def test_the_run_checks_the_model_and_its_warm_start_before_any_shard_is_sent(tmp_path, digits):
    from skyfuse.training import Plan, user_template

    X = digits[0].X[:16]
    name = re.escape(CNN_FILE)
    with pytest.raises(ValueError, match=rf"^--model {name}:nope: {name} has no function 'nope'; found: build$"):
        user_template(Plan("digit", ["aws"], model=f"{CNN_FILE}:nope"), 64, 10, X)
    with pytest.raises(ValueError, match=rf"^--model {name}:build: its output is \(None, 10\), the task needs "
                                         r"\(None, 3\)"):
        user_template(Plan("digit", ["aws"], model=CNN), 64, 3, X)
    other = M.save(conv_model(), tmp_path / "other.keras")
    with pytest.raises(ValueError, match=r"--init .*other.keras: its weights .* do not fit --model"):
        user_template(Plan("digit", ["aws"], model=CNN, init=str(other)), 64, 10, X)
    # the template every trainer starts from: the seeded model, or the warm start's weights in it
    seeded = M.from_bytes(user_template(Plan("digit", ["aws"], model=CNN, seed=7), 64, 10, X))
    seeded_fresh = M.load_user_model(CNN, 7)
    assert all(np.array_equal(a, b) for a, b in zip(seeded.get_weights(), seeded_fresh.get_weights(), strict=True))
    warm = M.save(M.load_user_model(CNN, seed=5), tmp_path / "warm.keras")
    started = M.from_bytes(user_template(Plan("digit", ["aws"], model=CNN, init=str(warm)), 64, 10, X))
    assert all(np.array_equal(a, b) for a, b in zip(started.get_weights(), M.load(warm).get_weights(), strict=True))


def test_a_package_the_users_module_lacks_is_not_mistaken_for_the_module(tmp_path):
    path = write(tmp_path / "needs.py", "import no_such_dependency\n\ndef build():\n    pass\n")
    with pytest.raises(M.UserModelError, match=r"importing .*needs.py raised ModuleNotFoundError: "
                                               r"No module named 'no_such_dependency'"):
        M.load_user_model(f"{path}:build")
