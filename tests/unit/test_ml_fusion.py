"""skyfuse.ml.fusion: every fused graph equals its numpy reference (or, for fedavg, the Keras model
with averaged weights), vote tie-breaking, refusals that name the difference, lineage, no TF."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from skyfuse.ml import fusion as F
from skyfuse.ml.fusion import FusionError

ATOL = 1e-5


def linear_member(W, b, opset=17, act="Softmax") -> bytes:
    """A hand-built member: prob = Softmax(features @ W + b)."""
    W, b = np.asarray(W, np.float32), np.asarray(b, np.float32)
    d, k = W.shape
    nodes = [helper.make_node("MatMul", ["features", "W"], ["z0"]), helper.make_node("Add", ["z0", "b"], ["z"]),
             helper.make_node(act, ["z"], ["prob"], **({"axis": 1} if act == "Softmax" else {}))]
    graph = helper.make_graph(nodes, "member", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", k])],
                              initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def constant_member(p, d=2) -> bytes:
    """A member that outputs the probabilities `p` for every row (W = 0, b = log p)."""
    return linear_member(np.zeros((d, len(p))), np.log(p))


def random_members(d, k, m, seed, opset=17):
    rng = np.random.default_rng(seed)
    return [linear_member(rng.normal(size=(d, k)) * 1.5, rng.normal(size=k), opset) for _ in range(m)]


@pytest.fixture(scope="module")
def X5():
    return np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32) * 2


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("weights", [None, [3.0, 1.0, 2.0]])
@pytest.mark.parametrize("strategy", ["wavg", "vote", "confidence"])
def test_fused_graph_equals_the_numpy_reference(strategy, weights, k, X5):
    members = random_members(5, k, 3, seed=k)
    fused = F.fuse(strategy, members, weights)
    got = F.predict(fused, X5)
    expected = F.combine(strategy, [F.predict(m, X5) for m in members], weights)
    assert got.shape == (64, k)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    model = onnx.load_from_string(fused)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["features"] and [o.name for o in model.graph.output] == ["prob"]


@pytest.mark.parametrize("opsets", [(13, 13), (18, 18), (13, 17)])
@pytest.mark.parametrize("strategy", ["vote", "confidence"])
def test_fusion_across_opsets(strategy, opsets, X5):
    rng = np.random.default_rng(4)
    members = [linear_member(rng.normal(size=(5, 3)), rng.normal(size=3), o) for o in opsets]
    fused = F.fuse(strategy, members)
    assert next(o.version for o in onnx.load_from_string(fused).opset_import if o.domain == "") == max(opsets)
    np.testing.assert_allclose(F.predict(fused, X5), F.combine(strategy, [F.predict(m, X5) for m in members]),
                               atol=ATOL)


def test_wavg_is_the_weighted_average():
    a, b = constant_member([0.9, 0.1]), constant_member([0.5, 0.5])
    got = F.predict(F.fuse("wavg", [a, b], [3, 1]), np.zeros((2, 2), np.float32))
    np.testing.assert_allclose(got, [[0.8, 0.2], [0.8, 0.2]], atol=ATOL)


def test_vote_is_a_weighted_plurality():
    members = [constant_member(p) for p in ([0.3, 0.3, 0.4], [0.3, 0.3, 0.4], [0.99, 0.005, 0.005])]
    x = np.zeros((1, 2), np.float32)
    wavg = F.predict(F.fuse("wavg", members), x)
    vote = F.predict(F.fuse("vote", members), x)
    assert wavg.argmax() == 0  # the confident member dominates the average
    assert vote.argmax() == 2  # two of three members vote for class 2
    np.testing.assert_allclose(vote[0], [1 / 3, 0, 2 / 3], atol=1e-5)
    weighted = F.predict(F.fuse("vote", members, [1, 1, 3]), x)
    assert weighted.argmax() == 0 and weighted[0, 0] == pytest.approx(0.6, abs=1e-5)


@pytest.mark.parametrize("sure, expected", [(0.9, 0), (0.55, 1)])
def test_vote_ties_go_to_the_higher_average_probability(sure, expected):
    """Binary, two equal members disagree: 1-1. Member A says class 0 with `sure`, member B
    says class 1 with 0.7; the tie goes to the class with the higher average probability."""
    a, b = constant_member([sure, 1 - sure]), constant_member([0.3, 0.7])
    x = np.zeros((3, 2), np.float32)
    got = F.predict(F.fuse("vote", [a, b]), x)
    ref = F.combine("vote", [F.predict(a, x), F.predict(b, x)])
    np.testing.assert_allclose(got, ref, atol=ATOL)
    assert (got.argmax(1) == expected).all() and (ref.argmax(1) == expected).all()
    np.testing.assert_allclose(got, 0.5, atol=1e-5)  # still an even split of the votes
    assert got[0, expected] > got[0, 1 - expected]


def test_a_three_way_vote_tie_survives_float32():
    """One vote each for classes 0, 1, 2; class 2 has the highest average probability by only
    0.001, far below what 1e-6 x the average could separate in float32 on its own."""
    members = [constant_member(p) for p in ([0.400, 0.299, 0.301], [0.300, 0.400, 0.300], [0.299, 0.300, 0.401])]
    x = np.zeros((2, 2), np.float32)
    got = F.predict(F.fuse("vote", members), x)
    ref = F.combine("vote", [F.predict(m, x) for m in members])
    assert (got.argmax(1) == 2).all() and (ref.argmax(1) == 2).all()
    np.testing.assert_allclose(got, 1 / 3, atol=1e-5)


def test_confidence_weights_each_row_by_the_members_certainty():
    a, b = constant_member([0.9, 0.1]), constant_member([0.4, 0.6])
    got = F.predict(F.fuse("confidence", [a, b]), np.zeros((1, 2), np.float32))
    ca, cb = 0.9 / 1.5, 0.6 / 1.5
    np.testing.assert_allclose(got[0], [ca * 0.9 + cb * 0.4, ca * 0.1 + cb * 0.6], atol=ATOL)


def test_combine_reference_basics():
    p1, p2 = np.array([[0.7, 0.3]]), np.array([[0.2, 0.8]])
    np.testing.assert_allclose(F.combine("wavg", [p1, p2], [1, 3]), [[0.325, 0.675]])
    with pytest.raises(FusionError, match="no output-level reference"):
        F.combine("fedavg", [p1, p2])


# -------------------------------------------------------------------------------------- fedavg


def test_fedavg_of_hand_built_members_averages_the_initializers(X5):
    members = random_members(5, 3, 3, seed=9)
    w = [1.0, 2.0, 5.0]
    fused = F.fuse("fedavg", members, w)
    Ws = [numpy_helper.to_array(next(t for t in onnx.load_from_string(m).graph.initializer if t.name == "W"))
          for m in members]
    bs = [numpy_helper.to_array(next(t for t in onnx.load_from_string(m).graph.initializer if t.name == "b"))
          for m in members]
    wn = np.array(w) / sum(w)
    W, b = sum(x * y for x, y in zip(wn, Ws, strict=True)), sum(x * y for x, y in zip(wn, bs, strict=True))
    np.testing.assert_allclose(F.predict(fused, X5), F.predict(linear_member(W, b), X5), atol=ATOL)
    assert len(onnx.load_from_string(fused).graph.node) == 3  # one model, not an ensemble


@pytest.fixture(scope="module")
def keras_members():
    """Three Keras models of one spec (different seeds, shared standardization, non-zero biases)."""
    from skyfuse.ml import export as E
    from skyfuse.ml import model as M

    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=6), rng.uniform(0.5, 2, size=6)
    models = []
    for seed in range(3):
        m = M.build(M.ModelSpec(hidden=(7, 5), seed=seed), 6, 4, mean, var)
        weights = m.get_weights()
        weights[2:] = [w + rng.normal(scale=0.3, size=w.shape).astype(np.float32) for w in weights[2:]]
        m.set_weights(weights)
        models.append(m)
    return M, E, models, [E.to_onnx(m) for m in models]


def test_fedavg_equals_the_keras_model_with_averaged_weights(keras_members):
    M, E, models, members = keras_members
    w = np.array([10.0, 30.0, 60.0])
    fused = F.fuse("fedavg", members, list(w), lineage={"round": 2})
    wn = w / w.sum()
    averaged = [sum(wi * np.asarray(ws[j], np.float64)
                    for wi, ws in zip(wn, (m.get_weights() for m in models), strict=True))
                for j in range(len(models[0].get_weights()))]
    expected_model = M.build(M.ModelSpec(hidden=(7, 5), seed=99), 6, 4, np.zeros(6), np.ones(6))
    expected_model.set_weights([a.astype(np.float32) for a in averaged])
    X = np.random.default_rng(5).normal(size=(50, 6)).astype(np.float32)
    got = F.predict(fused, X)
    np.testing.assert_allclose(got, M.predict_proba(expected_model, X), atol=ATOL)  # Keras forward pass
    np.testing.assert_allclose(got, F.predict(E.to_onnx(expected_model), X), atol=ATOL)  # separate export
    assert not np.allclose(got, F.predict(members[0], X), atol=1e-3)
    assert F.lineage(fused) == {"round": 2}
    # the Keras-side helpers agree: FedAvg in Keras, and the global model rebuilt from the ONNX fusion
    np.testing.assert_allclose(M.predict_proba(M.average(models, list(w)), X), got, atol=ATOL)
    rebuilt = M.from_onnx(fused)
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in models[0].layers]
    np.testing.assert_allclose(M.predict_proba(rebuilt, X), got, atol=ATOL)


def test_fedavg_refuses_members_of_another_shape(keras_members):
    M, E, models, members = keras_members
    wider = E.to_onnx(M.build(M.ModelSpec(hidden=(8, 5)), 6, 4, np.zeros(6), np.ones(6)))
    with pytest.raises(FusionError, match=r"member 2 differs: initializer 'dense_0.kernel': "
                                          r"shape \[6, 7\] FLOAT in member 0, \[6, 8\]"):
        F.fuse("fedavg", members[:2] + [wider])
    deeper = E.to_onnx(M.build(M.ModelSpec(hidden=(7, 5, 3)), 6, 4, np.zeros(6), np.ones(6)))
    with pytest.raises(FusionError, match=r"member 1 differs: initializer names differ.*dense_2"):
        F.fuse("fedavg", [members[0], deeper])


def test_fedavg_refuses_another_graph_with_the_same_initializers(X5):
    a = linear_member(np.ones((5, 3)), np.zeros(3))
    b = linear_member(np.ones((5, 3)), np.zeros(3), act="Sigmoid")
    with pytest.raises(FusionError, match=r"node 2: op 'Softmax' in member 0, 'Sigmoid' in this member"):
        F.fuse("fedavg", [a, b])


# ------------------------------------------------------------------------------------- refusals


def test_fuse_refuses_bad_input():
    two, three = random_members(5, 2, 1, 0)[0], random_members(5, 3, 1, 0)[0]
    with pytest.raises(FusionError, match="unknown strategy 'median'"):
        F.fuse("median", [two, two])
    with pytest.raises(FusionError, match=r"number of classes \(k\): member 0: 2, member 1: 3"):
        F.fuse("wavg", [two, three])
    with pytest.raises(FusionError, match=r"number of features \(d\)"):
        F.fuse("wavg", [two, random_members(4, 2, 1, 0)[0]])
    with pytest.raises(FusionError, match="2 weights for 3 members"):
        F.fuse("wavg", [two] * 3, [1, 2])
    with pytest.raises(FusionError, match="finite and >= 0"):
        F.fuse("wavg", [two] * 2, [1, -1])
    with pytest.raises(FusionError, match="must not all be 0"):
        F.fuse("vote", [two] * 2, [0, 0])
    with pytest.raises(FusionError, match="at least one member"):
        F.fuse("wavg", [])
    with pytest.raises(FusionError, match="member 1 is not an ONNX model"):
        F.fuse("wavg", [two, b"not onnx"])


# ------------------------------------------------------------------------------ lineage, serving


def test_lineage_and_metadata_round_trip(X5):
    members = random_members(5, 3, 2, seed=3)
    lineage = {"run": "r-1", "members": [{"cloud": "aws", "rows": 120}, {"cloud": "gcp", "rows": 80}],
               "validation": {"accuracy": 0.93}}
    for strategy in F.STRATEGIES:
        fused = F.fuse(strategy, members, [120, 80], lineage=lineage)
        assert F.lineage(fused) == lineage
        meta = F.metadata(fused)
        assert meta["skyfuse.strategy"] == strategy and json.loads(meta["skyfuse.weights"]) == [0.6, 0.4]
        assert onnx.load_from_string(fused).producer_name == "skyfuse"
    assert F.lineage(members[0]) == {}
    assert F.lineage(F.fuse("wavg", members)) == {}


def test_session_predict_and_accuracy(X5):
    member = random_members(5, 3, 1, seed=2)[0]
    session = F.Session(member)
    p = session.run(X5)
    assert p.shape == (64, 3) and p.dtype == np.float32
    np.testing.assert_array_equal(F.predict(member, X5), p)
    np.testing.assert_array_equal(session(X5[0]), p[:1])  # a single row

    class Rows:
        X, y = X5, p.argmax(1)
    assert F.accuracy(member, Rows) == 1.0
    Rows.y = (p.argmax(1) + 1) % 3
    assert F.accuracy(member, Rows) == 0.0


def test_fusion_and_data_do_not_import_tensorflow():
    code = ("import sys, skyfuse.ml.fusion, skyfuse.ml.data; "
            "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_server_step_replaces_the_averaged_parameters_by_name(keras_members):
    """What the fuser does for fedadam/fedyogi: the fedavg graph of the members, with the global
    model's parameters a server optimiser made set by initializer name."""
    M, E, models, members = keras_members
    averaged = F.fuse("fedavg", members, [1.0, 1.0, 2.0])
    params = F.parameters(averaged)
    assert {"dense_0.kernel", "out.bias", "standardize.mean"} <= set(params)
    stepped = {name: value + 0.25 for name, value in params.items() if name.startswith("dense_")}
    fused = F.with_parameters(averaged, stepped, "fedadam", lineage={"round": 3})
    got = F.parameters(fused)
    np.testing.assert_allclose(got["dense_0.kernel"], params["dense_0.kernel"] + 0.25)
    np.testing.assert_array_equal(got["out.kernel"], params["out.kernel"])  # not given: kept
    meta = F.metadata(fused)
    assert meta["skyfuse.strategy"] == "fedadam" and F.lineage(fused) == {"round": 3}
    assert json.loads(meta["skyfuse.weights"]) == pytest.approx([0.25, 0.25, 0.5])  # the members' weights
    expected = M.from_onnx(averaged)
    M.with_onnx_weights(expected, {**params, **stepped})
    X = np.random.default_rng(3).normal(size=(20, 6)).astype(np.float32)
    np.testing.assert_allclose(F.predict(fused, X), M.predict_proba(expected, X), atol=ATOL)
    with pytest.raises(FusionError, match=r"the model has no initializers \['dense_9.kernel'\]"):
        F.with_parameters(averaged, {"dense_9.kernel": np.zeros(2)}, "fedadam")
    with pytest.raises(FusionError, match=r"initializer 'out.bias': shape \[3\] given, the model has \[4\]"):
        F.with_parameters(averaged, {"out.bias": np.zeros(3)}, "fedyogi")
    with pytest.raises(FusionError, match="'wavg' is not a server strategy; choose one of fedavg, fedprox"):
        F.with_parameters(averaged, {}, "wavg")


def test_the_session_cache_holds_under_threads(monkeypatch):
    """Hosts of the local fleet call `predict` from several threads: the cache of sessions (a dict
    kept in recency order, evicting the oldest) must stay whole, bounded and right."""
    import os
    import random
    import threading

    class Fake:
        def __init__(self, model_bytes):
            self.model = model_bytes

    class Yielding(dict):
        def pop(self, *args):
            os.sched_yield()  # let another thread in between choosing an entry and taking it
            return super().pop(*args)

    monkeypatch.setattr(F, "Session", Fake)  # the cache only: building real sessions would hide the races
    monkeypatch.setattr(F, "_SESSIONS", Yielding())
    monkeypatch.setattr(F, "_CACHE_SIZE", 3)
    models = [bytes([i]) * 4096 for i in range(7)]
    errors, wrong = [], []

    def hammer(seed):
        rng = random.Random(seed)
        try:
            for _ in range(5000):
                model = rng.choice(models)
                if F._session(model).model != model:
                    wrong.append(model[:1])
        except Exception as exc:  # noqa: BLE001 - a torn dict raises KeyError or RuntimeError here
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and wrong == []
    assert len(F._SESSIONS) == 3
    assert all(F._SESSIONS[key].model in models for key in F._SESSIONS)


def test_fusion_sessions_take_the_serving_options():
    from skyfuse.serving import session

    opts = F.Session(linear_member(np.eye(4, 3), np.zeros(3)))._session.get_session_options()
    expected = session.options(1)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert (opts.graph_optimization_level, opts.execution_mode, opts.log_severity_level) == (
        expected.graph_optimization_level, expected.execution_mode, expected.log_severity_level)
    for entry in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert opts.get_session_config_entry(entry) == "0"


# ------------------------------------------------------------------------------- stacked graphs


def mlp_members(m, seed=0, width=5, classes=("a", "b", "c"), hidden=(6, 4)):
    from skyfuse.serving.testing import classifier

    return [classifier(width=width, classes=classes, hidden=hidden, seed=seed + i) for i in range(m)]


def node_count(fused) -> int:
    return len(onnx.load_from_string(fused).graph.node)


def inlined(monkeypatch, strategy, members, weights=None) -> bytes:
    """The ensemble as `fuse` builds it for members it cannot stack: every member's nodes."""
    with monkeypatch.context() as m:
        m.setattr(F, "_stacked_ensemble", lambda *args: None)
        return F.fuse(strategy, members, weights)


@pytest.mark.parametrize("strategy", ["wavg", "vote", "confidence"])
def test_members_of_one_structure_run_stacked_in_a_graph_that_does_not_grow_with_k(strategy, monkeypatch):
    X = np.random.default_rng(7).normal(size=(64, 5)).astype(np.float32)
    counts = {}
    for k in (1, 3, 30):
        members = mlp_members(k)
        weights = list(range(1, k + 1))
        fused = F.fuse(strategy, members, weights)
        counts[k] = node_count(fused)
        flat = inlined(monkeypatch, strategy, members, weights)
        assert node_count(flat) >= k * node_count(members[0])  # what stacking saves
        expected = F.combine(strategy, [F.predict(m, X) for m in members], weights)
        for rows in (X[:1], X):
            np.testing.assert_allclose(F.predict(fused, rows), expected[:len(rows)], atol=1e-6)
            np.testing.assert_allclose(F.predict(fused, rows), F.predict(flat, rows), atol=1e-6)
        assert onnx.load_from_string(fused).graph.name == f"skyfuse_{strategy}"
    assert counts[3] == counts[30] < node_count(mlp_members(1)[0]) + 25


def standardized_member(rng, mean, var, d=5, h=4, k=3) -> bytes:
    """features standardized (Sub, Sqrt, Div), a Gemm (transB, alpha, beta, C [1, h]), LeakyRelu, a
    Constant scale, Clip, MatMul + Add, a per-member temperature, Softmax on axis 1."""
    inits = {"mean": mean, "var": var, "W1": rng.normal(size=(h, d)), "C1": rng.normal(size=(1, h)),
             "lo": np.float32(-2.0), "hi": np.float32(3.0), "W2": rng.normal(size=(h, k)), "b2": rng.normal(size=k),
             "T": np.float32(rng.uniform(0.5, 2.0))}
    nodes = [helper.make_node("Sub", ["features", "mean"], ["centred"]), helper.make_node("Sqrt", ["var"], ["sd"]),
             helper.make_node("Div", ["centred", "sd"], ["z"]),
             helper.make_node("Gemm", ["z", "W1", "C1"], ["g"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("LeakyRelu", ["g"], ["a"], alpha=0.1),
             helper.make_node("Constant", [], ["scale"], value_float=1.5),
             helper.make_node("Mul", ["scale", "a"], ["s"]),
             helper.make_node("Clip", ["s", "lo", "hi"], ["c"]), helper.make_node("MatMul", ["c", "W2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["logits"]), helper.make_node("Div", ["logits", "T"], ["cooled"]),
             helper.make_node("Softmax", ["cooled"], ["prob"], axis=1)]
    graph = helper.make_graph(nodes, "member", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", k])],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), name)
                                           for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("strategy", ["wavg", "vote", "confidence"])
def test_stacked_graph_of_gemm_standardization_and_per_member_scalars(strategy, pooled, X5):
    rng = np.random.default_rng(11)
    mean, var = rng.normal(size=5), rng.uniform(0.5, 2, size=5)
    members = {k: [standardized_member(rng, *((mean, var) if pooled else (rng.normal(size=5), rng.uniform(0.5, 2, 5))))
                   for _ in range(k)] for k in (2, 6)}
    counts = {}
    for k, ms in members.items():
        fused = F.fuse(strategy, ms, list(range(1, k + 1)))
        counts[k] = node_count(fused)
        expected = F.combine(strategy, [F.predict(m, X5) for m in ms], list(range(1, k + 1)))
        np.testing.assert_allclose(F.predict(fused, X5), expected, atol=1e-5)
    assert counts[2] == counts[6] < 40


def test_stacked_graph_of_keras_members(keras_members, monkeypatch):
    """tf2onnx's export of the built-in MLP, with a pooled standardization and with one per member."""
    M, E, models, members = keras_members
    own = []
    for i, member in enumerate(members):
        model = onnx.load_from_string(member)
        for t in model.graph.initializer:
            if t.name in ("standardize.mean", "standardize.variance"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * (1 + 0.1 * i), t.name))
        own.append(model.SerializeToString())
    X = np.random.default_rng(8).normal(size=(40, 6)).astype(np.float32)
    for ms in (members, own):
        for strategy in ("wavg", "vote", "confidence"):
            fused = F.fuse(strategy, ms, [1.0, 2.0, 3.0])
            assert node_count(fused) < node_count(inlined(monkeypatch, strategy, ms, [1.0, 2.0, 3.0]))
            expected = F.combine(strategy, [F.predict(m, X) for m in ms], [1.0, 2.0, 3.0])
            np.testing.assert_allclose(F.predict(fused, X), expected, atol=1e-6)


@pytest.mark.parametrize("strategy", ["wavg", "vote", "confidence"])
def test_members_that_differ_or_use_other_ops_are_inlined(strategy, X5, monkeypatch):
    rng = np.random.default_rng(12)
    params = [(rng.normal(size=(5, 3)), rng.normal(size=3)) for _ in range(4)]
    hardmax = [linear_member(W, b, act="Hardmax") for W, b in params]  # an op the stacked graph has no rule for
    other_shapes = mlp_members(2, width=5) + mlp_members(2, seed=5, width=5, hidden=(3,))
    softmax = [linear_member(W, b) for W, b in params]
    for ms in (hardmax, other_shapes):
        fused = F.fuse(strategy, ms)
        assert fused == inlined(monkeypatch, strategy, ms)
        assert node_count(fused) >= sum(node_count(m) for m in ms)
        np.testing.assert_allclose(F.predict(fused, X5), F.combine(strategy, [F.predict(m, X5) for m in ms]), atol=ATOL)
    assert node_count(F.fuse(strategy, softmax)) < node_count(inlined(monkeypatch, strategy, softmax))  # these stack
