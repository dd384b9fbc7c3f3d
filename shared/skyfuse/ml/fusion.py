"""Fuse member ONNX models into ONE ONNX graph, and serve ONNX models with onnxruntime.

onnx, onnxruntime and numpy only: this module never imports TensorFlow, so the fusing and serving
functions stay light.

Every member takes `features` float32 [N, d] and outputs `prob` float32 [N, k] (class
probabilities); so does the fused model. Strategies, with member weights w normalised to sum 1:

- `wavg`: sum_i w_i p_i.
- `vote`: each member votes for its argmax class (one-hot), votes weighted by w_i; the output is
  the vote share per class plus 1e-6 x the weighted average probabilities (so ties go to the class
  the members are on average more sure of), normalised to sum 1 (computed in float64); the winning
  class then gets 5e-7 more, so it stays the argmax after rounding to float32 (rows sum to
  1 + 5e-7). Plurality for multi-class, majority for binary.
- `confidence`: member i's weight for a row is w_i x its max probability on that row, normalised
  per row; output sum_i c_i p_i.
- `fedavg`: one model whose initializers are the w-weighted average of the members' (members must
  share the graph: same nodes and initializer names/shapes/types, as models of one `ModelSpec` do).
- `fedprox`, `fedadam`, `fedyogi` (and the fuser's fedavg): that graph with the parameters a server
  strategy made (`skyfuse.ml.federated`), set by `with_parameters`.

`combine` is the numpy reference of wavg/vote/confidence on member outputs. The ensembles run
members of one structure as one copy of it over all of them (`skyfuse.ml.stacking`: the graph does not grow
with the number of members); members that differ, or use ops it has no rule for, are inlined.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.compose
import onnx.version_converter
from numpy.typing import ArrayLike, DTypeLike
from onnx import TensorProto, helper, numpy_helper

from skyfuse.errors import InvalidInput
from skyfuse.ml.stacking import Stacker, Unsupported
from skyfuse.serving.session import open_session

log = logging.getLogger("skyfuse.ml.fusion")
STRATEGIES = ("wavg", "vote", "confidence", "fedavg")  # what `fuse` builds from members alone
# parameter-averaged graphs whose weights a server optimiser set (skyfuse.ml.federated)
SERVER_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
INPUT = "features"
OUTPUT = "prob"
BATCH = "N"
TIE_EPS = 1e-6  # vote: fraction of the average probability added to break ties between vote shares
TIE_BUMP = 5e-7  # vote: added to the winner's share, so float32 rounding cannot hide the tie-break
PRODUCER = "skyfuse"
META_STRATEGY = "skyfuse.strategy"
META_LINEAGE = "skyfuse.lineage"
META_WEIGHTS = "skyfuse.weights"
META_MEMBERS = "skyfuse.members"
MIN_OPSET = 13
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


class FusionError(InvalidInput):
    """Members that cannot be fused as asked; the message says what differs or is wrong."""


# ------------------------------------------------------------------------------------ reference


def normalize_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Member weights as float64 summing to 1 (equal when None)."""
    if n < 1:
        raise FusionError("fusion needs at least one member")
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n,):
        raise FusionError(f"{len(w)} weights for {n} members")
    if not np.isfinite(w).all() or (w < 0).any():
        raise FusionError(f"weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise FusionError(f"weights must not all be 0, got {w.tolist()}")
    normalized: np.ndarray = w / w.sum()
    return normalized


def combine(strategy: str, probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """The numpy reference of `fuse` for wavg/vote/confidence, on the members' outputs (n x k each)."""
    if strategy == "fedavg":
        raise FusionError("fedavg averages parameters, not outputs: it has no output-level reference")
    if strategy not in STRATEGIES:
        raise FusionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    P = np.stack([np.asarray(p, dtype=np.float64) for p in probs])  # m x n x k
    if P.ndim != 3:
        raise FusionError(f"each member output must be 2-D (rows x classes), got {P.shape[1:]}")
    w = normalize_weights(weights, len(P))
    avg: np.ndarray = np.einsum("m,mnk->nk", w, P)
    if strategy == "wavg":
        return avg
    if strategy == "vote":
        k = P.shape[2]
        votes = np.einsum("m,mnk->nk", w, np.eye(k)[P.argmax(axis=2)])
        score = votes + TIE_EPS * avg
        share: np.ndarray = score / score.sum(axis=1, keepdims=True)
        share[np.arange(len(share)), share.argmax(axis=1)] += TIE_BUMP
        return share
    c = w[:, None] * P.max(axis=2)  # m x n
    c = c / c.sum(axis=0, keepdims=True)
    confident: np.ndarray = np.einsum("mn,mnk->nk", c, P)
    return confident


# ------------------------------------------------------------------------------------- members


def _load(member: bytes | onnx.ModelProto, i: int) -> onnx.ModelProto:
    if isinstance(member, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(member)
        return m
    try:
        return onnx.load_from_string(bytes(member))
    except Exception as e:  # noqa: BLE001
        raise FusionError(f"member {i} is not an ONNX model: {e}") from None


def _default_opset(m: onnx.ModelProto) -> int:
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def _signature(m: onnx.ModelProto, i: int) -> tuple[int | None, int | None]:
    """(d, k) of a member, checking its input `features` and output `prob` are float32 2-D."""
    init_names = {t.name for t in m.graph.initializer}
    inputs = [v for v in m.graph.input if v.name not in init_names]
    if [v.name for v in inputs] != [INPUT]:
        raise FusionError(f"member {i} must have the one input {INPUT!r}, has {[v.name for v in inputs]}")
    if [v.name for v in m.graph.output] != [OUTPUT]:
        raise FusionError(f"member {i} must have the one output {OUTPUT!r}, has {[v.name for v in m.graph.output]}")
    dims = []
    for v in (inputs[0], m.graph.output[0]):
        t = v.type.tensor_type
        if t.elem_type != TensorProto.FLOAT:
            raise FusionError(f"member {i}: {v.name!r} must be float32, is "
                              f"{TensorProto.DataType.Name(t.elem_type)}")
        if len(t.shape.dim) != 2:
            raise FusionError(f"member {i}: {v.name!r} must be 2-D [N, n], has {len(t.shape.dim)} dims")
        last = t.shape.dim[1]
        dims.append(last.dim_value if last.HasField("dim_value") else None)
    return dims[0], dims[1]


def _name_batch(m: onnx.ModelProto) -> None:
    for v in list(m.graph.input) + list(m.graph.output):
        d = v.type.tensor_type.shape.dim[0]
        if not d.HasField("dim_value"):
            d.dim_param = BATCH


def _prepare(members: Sequence[bytes]) -> tuple[list[onnx.ModelProto], int | None, int, int]:
    """Load and check members; bring them to one default-domain opset. -> (models, d, k, opset);
    d is None when no member fixes the number of features."""
    models = [_load(b, i) for i, b in enumerate(members)]
    if not models:
        raise FusionError("fusion needs at least one member")
    sigs = [_signature(m, i) for i, m in enumerate(models)]
    for what, j in (("features (d)", 0), ("classes (k)", 1)):
        known = {s[j] for s in sigs if s[j] is not None}
        if len(known) > 1:
            raise FusionError(f"members disagree on the number of {what}: "
                              + ", ".join(f"member {i}: {s[j]}" for i, s in enumerate(sigs)))
    d = next((s[0] for s in sigs if s[0] is not None), None)
    k = next((s[1] for s in sigs if s[1] is not None), None)
    if k is None:
        raise FusionError("the members' output `prob` has no fixed number of classes")
    opset = max(MIN_OPSET, max(_default_opset(m) for m in models))
    for i, m in enumerate(models):
        if _default_opset(m) != opset:
            try:
                models[i] = onnx.version_converter.convert_version(m, opset)
            except Exception as e:  # noqa: BLE001
                raise FusionError(f"member {i} (opset {_default_opset(m)}) cannot be converted to opset "
                                  f"{opset}: {e}") from None
        _name_batch(models[i])
    return models, d, k, opset


def _opset_imports(models: Sequence[onnx.ModelProto], opset: int) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {"": opset}
    for i, m in enumerate(models):
        for o in m.opset_import:
            dom = "" if o.domain == "ai.onnx" else o.domain
            if dom == "":
                continue
            if dom in versions and versions[dom] != o.version:
                raise FusionError(f"members import domain {dom!r} at different versions "
                                  f"({versions[dom]} and {o.version} in member {i})")
            versions[dom] = o.version
    return [helper.make_opsetid(dom, v) for dom, v in sorted(versions.items())]


# --------------------------------------------------------------------------------------- fusing


class _Builder:
    """Collects the combining nodes and constants, named `fuse_*`."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"fuse_{stem}_{self.n}"

    def const(self, stem: str, value: ArrayLike, dtype: DTypeLike = np.float32) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, stem: str | None = None,
           **attrs: Any) -> str:
        out = out or self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def reduce(self, op_type: str, x: str, stem: str, axis: int = 1, keepdims: int = 1, out: str | None = None) -> str:
        """Reduce over one axis, by default the class axis of [N, k], keeping dims: -> [N, 1]."""
        axes_as_input = {"ReduceSum": 13, "ReduceMax": 18}[op_type]
        if self.opset >= axes_as_input:
            return self.op(op_type, [x, self.const("axes", [axis], np.int64)], out=out, stem=stem, keepdims=keepdims)
        return self.op(op_type, [x], out=out, stem=stem, axes=[axis], keepdims=keepdims)


def _combine_graph(strategy: str, probs: list[str], w: np.ndarray, k: int, b: _Builder) -> None:
    weights = [b.const("w", w_i) for w_i in w]
    weighted = ([b.op("Mul", [p, w_i], stem="wp") for p, w_i in zip(probs, weights, strict=True)]
                if strategy != "vote" else [])
    if strategy == "wavg":
        b.op("Sum", weighted, out=OUTPUT)
    elif strategy == "vote":
        # scored in float64, where 1e-6 x the average probability breaks ties between equal vote
        # shares exactly; the winner then gets TIE_BUMP so it stays the argmax in float32 too
        classes = b.const("classes", np.arange(k).reshape(1, k), np.int64)
        w64 = [b.const("w64", w_i, np.float64) for w_i in w]
        votes, weighted64 = [], []
        for p, w_i in zip(probs, w64, strict=True):
            top = b.op("ArgMax", [p], stem="argmax", axis=1, keepdims=1, select_last_index=0)
            onehot = b.op("Cast", [b.op("Equal", [top, classes], stem="is_top")], stem="onehot",
                          to=TensorProto.DOUBLE)
            votes.append(b.op("Mul", [onehot, w_i], stem="vote"))
            p64 = b.op("Cast", [p], stem="p64", to=TensorProto.DOUBLE)
            weighted64.append(b.op("Mul", [p64, w_i], stem="wp64"))
        _vote_share(b.op("Sum", votes, stem="votes"), b.op("Sum", weighted64, stem="avg"), classes, b)
    elif strategy == "confidence":
        conf = [b.op("Mul", [b.reduce("ReduceMax", p, "maxprob"), w_i], stem="conf")
                for p, w_i in zip(probs, weights, strict=True)]
        total = b.op("Sum", conf, stem="conf_total")
        parts = [b.op("Mul", [b.op("Div", [c, total], stem="conf_norm"), p], stem="conf_p")
                 for c, p in zip(conf, probs, strict=True)]
        b.op("Sum", parts, out=OUTPUT)
    else:  # pragma: no cover - checked by the caller
        raise FusionError(f"unknown strategy {strategy!r}")


def _vote_share(votes: str, avg: str, classes: str, b: _Builder) -> None:
    """`prob` from the weighted vote counts and average probabilities, both float64 [N, k]."""
    tiebreak = b.op("Mul", [avg, b.const("eps", TIE_EPS, np.float64)], stem="tiebreak")
    score = b.op("Add", [votes, tiebreak], stem="score")
    share = b.op("Div", [score, b.reduce("ReduceSum", score, "score_total")], stem="share")
    winner = b.op("ArgMax", [share], stem="winner", axis=1, keepdims=1, select_last_index=0)
    bump = b.op("Mul", [b.op("Cast", [b.op("Equal", [winner, classes], stem="is_winner")], stem="winner_onehot",
                             to=TensorProto.FLOAT), b.const("bump", TIE_BUMP)], stem="bump")
    b.op("Add", [b.op("Cast", [share], stem="share32", to=TensorProto.FLOAT), bump], out=OUTPUT)


def _combine_stacked(strategy: str, P: str, w: np.ndarray, k: int, b: _Builder) -> None:
    """`_combine_graph` on the members' outputs laid out as one [K, k, N] tensor (classes on axis 1,
    rows last; K may be 1 when every member computes the same: the weights broadcast it)."""
    column = w.reshape(-1, 1, 1)  # [K, 1, 1]: member i's weight against its [k, N] slice

    def over_members(x: str, stem: str, keepdims: int = 0) -> str:
        return b.reduce("ReduceSum", x, stem, axis=0, keepdims=keepdims)

    def rows_first(x: str, out: str | None = None) -> str:  # [k, N] -> [N, k]
        return b.op("Transpose", [x], out=out, stem="rows_first", perm=[1, 0])

    if strategy == "wavg":
        rows_first(over_members(b.op("Mul", [P, b.const("w", column)], stem="wp"), "wsum"), out=OUTPUT)
    elif strategy == "vote":
        w64 = b.const("w64", column, np.float64)
        top = b.op("ArgMax", [P], stem="argmax", axis=1, keepdims=1, select_last_index=0)  # [K, 1, N]
        is_top = b.op("Equal", [top, b.const("classes", np.arange(k).reshape(k, 1), np.int64)], stem="is_top")
        onehot = b.op("Cast", [is_top], stem="onehot", to=TensorProto.DOUBLE)
        votes = over_members(b.op("Mul", [onehot, w64], stem="vote"), "votes")
        avg = over_members(b.op("Mul", [b.op("Cast", [P], stem="p64", to=TensorProto.DOUBLE), w64], stem="wp64"), "avg")
        _vote_share(rows_first(votes), rows_first(avg), b.const("classes", np.arange(k).reshape(1, k), np.int64), b)
    elif strategy == "confidence":
        conf = b.op("Mul", [b.reduce("ReduceMax", P, "maxprob"), b.const("w", column)], stem="conf")  # [K, 1, N]
        norm = b.op("Div", [conf, over_members(conf, "conf_total", keepdims=1)], stem="conf_norm")
        rows_first(over_members(b.op("Mul", [norm, P], stem="conf_p"), "conf_sum"), out=OUTPUT)
    else:  # pragma: no cover - checked by the caller
        raise FusionError(f"unknown strategy {strategy!r}")


def _io(d: int | None, k: int) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, d]),
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, k]))


def _ensemble(strategy: str, models: list[onnx.ModelProto], w: np.ndarray, d: int | None, k: int,
              opset: int) -> onnx.ModelProto:
    """The members run as one stacked copy of their shared structure when they can, else inlined."""
    return (_stacked_ensemble(strategy, models, w, d, k, opset)
            or _inlined_ensemble(strategy, models, w, d, k, opset))


def _inlined_ensemble(strategy: str, models: list[onnx.ModelProto], w: np.ndarray, d: int | None, k: int,
                      opset: int) -> onnx.ModelProto:
    """Every member's nodes, prefixed `m<i>_`, then the combining nodes: K times the member's nodes."""
    nodes, inits, sparse, value_info, functions, probs = [], [], [], [], [], []
    for i, m in enumerate(models):
        p = onnx.compose.add_prefix(m, f"m{i}_", rename_inputs=False)
        nodes.extend(p.graph.node)
        inits.extend(p.graph.initializer)
        sparse.extend(p.graph.sparse_initializer)
        value_info.extend(p.graph.value_info)
        functions.extend(p.functions)
        probs.append(p.graph.output[0].name)
    b = _Builder(opset)
    _combine_graph(strategy, probs, w, k, b)
    features, prob = _io(d, k)
    graph = helper.make_graph(nodes + b.nodes, f"skyfuse_{strategy}", [features], [prob],
                              initializer=inits + b.inits, value_info=value_info, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=_opset_imports(models, opset), functions=functions)
    model.ir_version = max(m.ir_version for m in models)
    return model


# ----------------------------------------------------------------------------- stacked ensembles
# Members of one structure run as one copy of it over all of them (`skyfuse.ml.stacking`), combined
# from their outputs laid out [K, k, N] by `_combine_stacked`; the others are inlined (`_inlined_ensemble`).


def _needed(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
            ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers `prob` depends on (a view made for a use that did not come is not)."""
    needed, kept = {OUTPUT}, []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], [t for t in inits if t.name in needed]


def _stacked_ensemble(strategy: str, models: list[onnx.ModelProto], w: np.ndarray, d: int | None, k: int,
                      opset: int) -> onnx.ModelProto | None:
    """The ensemble as one run of the members' shared structure over all of them, or None when they
    differ or use what `Stacker` does not stack."""
    if any(m.graph.sparse_initializer or m.functions for m in models):
        return None
    if any(_structure_difference(models[0], m) for m in models[1:]):
        return None
    b = _Builder(opset)
    try:
        P = Stacker(models, b, INPUT, OUTPUT).output()
    except Unsupported:
        return None
    _combine_stacked(strategy, P, w, k, b)
    nodes, inits = _needed(b.nodes, b.inits)
    features, prob = _io(d, k)
    graph = helper.make_graph(nodes, f"skyfuse_{strategy}", [features], [prob], initializer=inits)
    model = helper.make_model(graph, opset_imports=_opset_imports(models, opset))
    model.ir_version = max(m.ir_version for m in models)
    try:  # a shape `Stacker` did not foresee (members it should have refused) must not cost the fusion
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        log.warning("the stacked %s graph of %d members fails the ONNX checker (%s); inlining them instead",
                    strategy, len(models), str(exc).strip()[:300])
        return None
    return model


def _attr_bytes(node: onnx.NodeProto) -> list[bytes]:
    return [a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name)]


def _structure_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    """What differs between two graphs for FedAvg (None when they share the structure)."""
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    if set(ia) != set(ib):
        only_a, only_b = sorted(set(ia) - set(ib)), sorted(set(ib) - set(ia))
        return (f"initializer names differ: only in member 0: {only_a[:5]}{' ...' if len(only_a) > 5 else ''}; "
                f"only in this member: {only_b[:5]}{' ...' if len(only_b) > 5 else ''}")
    for name, t in ia.items():
        u = ib[name]
        if list(t.dims) != list(u.dims) or t.data_type != u.data_type:
            return (f"initializer {name!r}: shape {list(t.dims)} {TensorProto.DataType.Name(t.data_type)} in member 0, "
                    f"{list(u.dims)} {TensorProto.DataType.Name(u.data_type)} in this member")
    if len(a.graph.node) != len(b.graph.node):
        return f"{len(a.graph.node)} nodes in member 0, {len(b.graph.node)} in this member"
    for j, (x, y) in enumerate(zip(a.graph.node, b.graph.node, strict=True)):  # counts compared above
        if (x.op_type, x.domain) != (y.op_type, y.domain):
            return f"node {j}: op {x.op_type!r} in member 0, {y.op_type!r} in this member"
        if list(x.input) != list(y.input) or list(x.output) != list(y.output):
            return (f"node {j} ({x.op_type}): inputs/outputs {list(x.input)} -> {list(x.output)} in member 0, "
                    f"{list(y.input)} -> {list(y.output)} in this member")
        if _attr_bytes(x) != _attr_bytes(y):
            return f"node {j} ({x.op_type} {x.name!r}): attributes differ"
    return None


def fedavg_mismatch(members: Sequence[bytes]) -> tuple[int, str] | None:
    """(i, what differs) for the first member whose graph FedAvg cannot average with member 0's
    (another architecture: other layers, shapes or wiring), or None when all share one. Layers
    missing on one side are named by their weights (`layer.variable`, as skyfuse exports them)
    before any other difference."""
    models = [_load(b, i) for i, b in enumerate(members)]
    for i, m in enumerate(models[1:], start=1):
        diff = _weights_difference(models[0], m) or _structure_difference(models[0], m)
        if diff:
            return i, diff
    return None


def _weights_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    wa, wb = ({t.name for t in m.graph.initializer if "." in t.name} for m in (a, b))
    if wa == wb:
        return None
    return (f"weights differ: only in member 0: {sorted(wa - wb)[:8]}; "
            f"only in this member: {sorted(wb - wa)[:8]}")


def _fedavg(models: list[onnx.ModelProto], w: np.ndarray) -> onnx.ModelProto:
    base = models[0]
    for i, m in enumerate(models[1:], start=1):
        diff = _structure_difference(base, m)
        if diff:
            raise FusionError(f"fedavg needs members with the same graph structure; member {i} differs: {diff}")
    tensors = [{t.name: t for t in m.graph.initializer} for m in models]
    fused = onnx.ModelProto()
    fused.CopyFrom(base)
    del fused.graph.initializer[:]
    for t in base.graph.initializer:
        arrays = [numpy_helper.to_array(ts[t.name]) for ts in tensors]
        if t.data_type in FLOAT_TYPES:
            avg = np.tensordot(w, np.stack([a.astype(np.float64) for a in arrays]), axes=1)
            value = avg.astype(arrays[0].dtype)
        else:
            if any(not np.array_equal(arrays[0], a) for a in arrays[1:]):
                bad = next(i for i, a in enumerate(arrays) if not np.array_equal(arrays[0], a))
                raise FusionError(f"fedavg: non-float initializer {t.name!r} "
                                  f"({TensorProto.DataType.Name(t.data_type)}) differs in member {bad}; "
                                  "only float parameters can be averaged")
            value = arrays[0]
        fused.graph.initializer.append(numpy_helper.from_array(value, t.name))
    fused.graph.name = "skyfuse_fedavg"
    return fused


def fuse(strategy: str, members: Sequence[bytes], weights: Sequence[float] | None = None,
         lineage: dict[str, Any] | None = None) -> bytes:
    """ONE ONNX model (serialized) fusing the members; input `features`, output `prob`.

    `weights`: one per member (e.g. training rows), normalised to sum 1; equal when None.
    `lineage` is stored as JSON under the model metadata key `skyfuse.lineage`, next to
    `skyfuse.strategy`, `skyfuse.weights` and `skyfuse.members`.
    """
    if strategy not in STRATEGIES:
        raise FusionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    models, d, k, opset = _prepare(members)
    w = normalize_weights(weights, len(models))
    if strategy == "fedavg":
        model = _fedavg(models, w)
    else:
        model = _ensemble(strategy, models, w, d, k, opset)
    return _finish(model, strategy, w, len(models), lineage)


def parameters(model_bytes: bytes) -> dict[str, np.ndarray]:
    """The model's float initializers by name, in graph order: what a server step moves."""
    model = _load(model_bytes, 0)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type in FLOAT_TYPES}


def with_parameters(model_bytes: bytes, values: dict[str, np.ndarray], strategy: str,
                    lineage: dict[str, Any] | None = None) -> bytes:
    """A copy of a parameter-averaged model (`fuse("fedavg", ...)`) whose named initializers are
    replaced by `values` (same shapes; cast to each initializer's type), labelled `strategy`: the
    global model a server optimiser made from the same members (their weights stay in the metadata)."""
    if strategy not in SERVER_STRATEGIES:
        raise FusionError(f"{strategy!r} is not a server strategy; choose one of {', '.join(SERVER_STRATEGIES)}")
    model = _load(model_bytes, 0)
    current = {t.name for t in model.graph.initializer}
    unknown = sorted(set(values) - current)
    if unknown:
        raise FusionError(f"the model has no initializers {unknown[:5]}")
    replaced = []
    for t in model.graph.initializer:
        if t.name in values:
            old, new = numpy_helper.to_array(t), np.asarray(values[t.name])
            if new.shape != old.shape:
                raise FusionError(f"initializer {t.name!r}: shape {list(new.shape)} given, "
                                  f"the model has {list(old.shape)}")
            t = numpy_helper.from_array(new.astype(old.dtype), t.name)
        replaced.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(replaced)
    model.graph.name = f"skyfuse_{strategy}"
    meta = {p.key: p.value for p in model.metadata_props}
    w = np.asarray(json.loads(meta.get(META_WEIGHTS, "[1.0]")), np.float64)
    return _finish(model, strategy, w, len(w), lineage)


def _finish(model: onnx.ModelProto, strategy: str, w: np.ndarray, members: int,
            lineage: dict[str, Any] | None) -> bytes:
    """Producer, doc string and lineage metadata set, checked, serialized."""
    model.producer_name = PRODUCER
    from skyfuse import __version__

    model.producer_version = __version__
    model.doc_string = f"skyfuse {strategy} fusion of {members} member model(s)"
    del model.metadata_props[:]
    meta = {META_STRATEGY: strategy, META_LINEAGE: json.dumps(lineage or {}, sort_keys=True, default=str),
            META_WEIGHTS: json.dumps([float(x) for x in w]), META_MEMBERS: str(members)}
    onnx.helper.set_model_props(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise FusionError(f"the fused {strategy} model fails the ONNX checker: {e}") from None
    serialized: bytes = model.SerializeToString()
    return serialized


# -------------------------------------------------------------------------------------- serving


class Session:
    """An onnxruntime session on one CPU thread, without spinning; `run(X)` -> float32 (n x k)."""

    def __init__(self, model_bytes: bytes):
        self._session = open_session(model_bytes, threads=1)
        self.input_name = self._session.get_inputs()[0].name
        outputs = [o.name for o in self._session.get_outputs()]
        self.output_name = OUTPUT if OUTPUT in outputs else outputs[0]

    def run(self, X: ArrayLike) -> np.ndarray:
        rows = np.asarray(X, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        probs: np.ndarray = self._session.run([self.output_name], {self.input_name: np.ascontiguousarray(rows)})[0]
        return probs

    __call__ = run


_SESSIONS: dict[str, Session] = {}  # sha256 of the model -> its session, most recently used last
_SESSIONS_LOCK = threading.Lock()  # the local fleet's hosts call `predict` from several threads
_CACHE_SIZE = 16


def _session(model_bytes: bytes) -> Session:
    key = hashlib.sha256(model_bytes).hexdigest()
    with _SESSIONS_LOCK:
        s = _SESSIONS.pop(key, None)
        if s is not None:
            _SESSIONS[key] = s
            return s
    s = Session(model_bytes)  # outside the lock: loading takes milliseconds, other models need not wait
    with _SESSIONS_LOCK:
        s = _SESSIONS.pop(key, None) or s  # another thread may have loaded it meanwhile: keep one
        _SESSIONS[key] = s
        while len(_SESSIONS) > _CACHE_SIZE:
            _SESSIONS.pop(next(iter(_SESSIONS)))
    return s


def predict(model_bytes: bytes, X: ArrayLike) -> np.ndarray:
    """Class probabilities (n x k, float32) from a model's `prob` output (sessions are cached)."""
    return _session(bytes(model_bytes)).run(X)


class Labelled(Protocol):
    """Rows and their class indices, as `skyfuse.ml.data.Dataset` holds them."""

    @property
    def X(self) -> ArrayLike: ...

    @property
    def y(self) -> ArrayLike: ...


def accuracy(model_bytes: bytes, ds: Labelled) -> float:
    """Share of rows of `ds` (anything with X and y) whose argmax class is the label."""
    y = np.asarray(ds.y)
    if not len(y):
        raise ValueError("accuracy of an empty dataset")
    return float(np.mean(predict(model_bytes, ds.X).argmax(axis=1) == y))


def metadata(model_bytes: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(bytes(model_bytes)).metadata_props}


def lineage(model_bytes: bytes) -> dict[str, Any]:
    """The lineage `fuse` stored in the model ({} when there is none)."""
    raw = metadata(model_bytes).get(META_LINEAGE)
    stored: dict[str, Any] = json.loads(raw) if raw else {}  # `_finish` stores a JSON object
    return stored
