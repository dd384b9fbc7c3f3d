"""Keras model -> ONNX bytes (input `features` float32 [N, d], output `prob` float32 [N, k]).

Keras 3 models go through a `tf.function` with a fixed input signature and
`tf2onnx.convert.from_function` (`from_keras` needs output names Keras 3 does not give).
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

if TYPE_CHECKING:
    import keras  # ships no types: a keras.Model is Any to mypy

INPUT = "features"
OUTPUT = "prob"
BATCH = "N"
DEFAULT_OPSET = 17


def _weight_name(path: str, model_name: str) -> str:
    """`conv.kernel` for the variable path `conv/kernel`; a freshly built Sequential prefixes its own
    name (`sequential_3/conv/kernel`), which a loaded copy does not: dropped, so both export alike."""
    return re.sub(r"[^A-Za-z0-9_.\-]", ".", path.removeprefix(f"{model_name}/"))


def to_onnx(model: keras.Model, opset: int = DEFAULT_OPSET, fresh: bool = False) -> bytes:
    """The model as a serialized ONNX ModelProto: input `features` float32 [N, d], output `prob`.
    A model whose architecture was exported before in this process reuses that graph with its own
    weights as initializers (no tracing: a FedAvg round exports the same architecture again);
    `fresh` traces anyway.

    Any Keras model with one input (None, d) and one output works: the built-in MLP or a user's
    model (Reshape, Conv2D, pooling, BatchNormalization, Dropout, ...). The weights (`model.weights`)
    enter the traced function as inputs (through Keras' `stateless_call`) and become initializers
    named after the Keras variable paths (`dense_0.kernel`, `standardize.mean`, ...) afterwards.
    So TensorFlow's graph optimizer cannot fold them, and the ONNX graph's structure and names
    depend only on the architecture, never on the weight values (zero biases, unit variances):
    models of one architecture always export to the same graph, as FedAvg needs; the initializers
    are exactly the weights (other constants are Constant nodes). Other state (Dropout's
    random-seed counter, named by a per-process counter and unused at inference) is passed as
    constants and pruned. Nodes and intermediate tensors get positional names (`n3_MatMul`,
    `t3_MatMul`), in an order fixed by the graph's structure.
    """
    architecture = (model.to_json(), opset)
    graph = None if fresh else _kept_graph(architecture)
    if graph is not None:
        return _with_weights(graph, model)
    with _TRACING:  # exporters of one process trace an architecture once: the others wait for its graph
        graph = None if fresh else _kept_graph(architecture)
        if graph is not None:
            return _with_weights(graph, model)
        exported = _trace(model, opset)
    with _GRAPHS_LOCK:
        _GRAPHS[architecture] = exported
        while len(_GRAPHS) > _GRAPHS_KEPT:
            del _GRAPHS[next(iter(_GRAPHS))]
    return exported


_GRAPHS: dict[tuple[str, int], bytes] = {}  # architecture -> a model exported from it
_GRAPHS_KEPT = 8
_GRAPHS_LOCK = threading.Lock()
_TRACING = threading.Lock()


def _kept_graph(architecture: tuple[str, int]) -> bytes | None:
    with _GRAPHS_LOCK:
        return _GRAPHS.get(architecture)


def _with_weights(exported: bytes, model: keras.Model) -> bytes:
    """`exported` (a model of `model`'s architecture) with `model`'s weights as its initializers."""
    from . import compiled

    proto = onnx.load_from_string(exported)
    values = {_weight_name(v.path, model.name): value
              for v, value in zip(model.weights, compiled.read_weights(model), strict=True)}
    initializers = []
    for old in proto.graph.initializer:
        new = values[old.name]
        if list(new.shape) != list(old.dims) or onnx.helper.np_dtype_to_tensor_dtype(new.dtype) != old.data_type:
            raise RuntimeError(f"weight {old.name!r} {new.dtype}{list(new.shape)} does not fit the exported graph "
                               f"({list(old.dims)})")  # the architecture key missed a difference
        initializers.append(numpy_helper.from_array(new, old.name))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(initializers)
    serialized: bytes = proto.SerializeToString()
    return serialized


def _trace(model: keras.Model, opset: int) -> bytes:
    """`to_onnx` the long way: trace the model with TensorFlow and convert with tf2onnx."""
    import tensorflow as tf
    import tf2onnx

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("to_onnx exports models with one input and one output, "
                         f"this one has {len(model.inputs)} and {len(model.outputs)}")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 2 or shape[1] is None:
        raise ValueError(f"to_onnx exports models whose input is (None, d) feature rows, this one takes {shape}")
    n_features = int(shape[1])
    trainable, frozen = list(model.trainable_variables), list(model.non_trainable_variables)
    weight_ids = {id(v) for v in model.weights}
    variables = [v for v in trainable + frozen if id(v) in weight_ids]
    names = [_weight_name(v.path, model.name) for v in variables]
    if len(set(names)) != len(names) or INPUT in names:
        raise ValueError(f"ambiguous weight names {names}")
    specs = [tf.TensorSpec((None, n_features), tf.float32, name=INPUT)]
    specs += [tf.TensorSpec(v.shape, v.dtype, name=n) for v, n in zip(variables, names, strict=True)]
    state = {id(v): tf.constant(np.asarray(v.numpy())) for v in trainable + frozen if id(v) not in weight_ids}

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]  # TensorFlow ships no types
    def serve(features: tf.Tensor, *weights: tf.Tensor) -> dict[str, tf.Tensor]:
        given = {id(v): w for v, w in zip(variables, weights, strict=True)}  # one input per weight (specs)
        values = [given.get(id(v), state.get(id(v))) for v in trainable + frozen]
        out, _ = model.stateless_call(values[:len(trainable)], values[len(trainable):], features, training=False)
        return {OUTPUT: out}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset)
    graph = proto.graph
    values = {n: np.asarray(v.numpy()) for n, v in zip(names, variables, strict=True)}
    weight_inputs = [i for i in graph.input if i.name in values]
    for i in weight_inputs:
        graph.input.remove(i)
    graph.initializer.extend(numpy_helper.from_array(values[i.name], i.name) for i in weight_inputs)
    _constants_as_nodes(graph, set(names))
    _canonical_names(graph)
    for value in list(graph.input) + list(graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = BATCH
    names_in = [i.name for i in graph.input]
    names_out = [o.name for o in graph.output]
    if names_in != [INPUT] or names_out != [OUTPUT]:
        raise RuntimeError(f"unexpected ONNX signature: inputs {names_in}, outputs {names_out}")
    onnx.checker.check_model(proto, full_check=True)
    serialized: bytes = proto.SerializeToString()
    return serialized


def _constants_as_nodes(graph: onnx.GraphProto, weights: set[str]) -> None:
    """Initializers that are not weights (shapes and scales tf2onnx folded, named by a process-wide
    counter) become Constant nodes: the initializers are then exactly the model's weights, what
    FedAvg and the server strategies average and move."""
    constants = [t for t in graph.initializer if t.name not in weights]
    if not constants:
        return
    made = [helper.make_node("Constant", [], [t.name], value=numpy_helper.from_array(numpy_helper.to_array(t)))
            for t in constants]
    kept = [t for t in graph.initializer if t.name in weights]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    nodes = made + list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes)


def _canonical_names(graph: onnx.GraphProto) -> None:
    """Positional names for nodes and intermediate tensors (graph inputs, outputs and initializers
    keep theirs), in a structural order; drops intermediate shape annotations."""
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    ordered = _structural_order(graph)
    graph.ClearField("node")
    graph.node.extend(ordered)
    rename: dict[str, str] = {}
    for j, node in enumerate(graph.node):
        node.name = f"n{j}_{node.op_type}"
        for k, out in enumerate(node.output):
            if out and out not in keep:
                rename[out] = f"t{j}_{node.op_type}" + (f"_{k}" if k else "")
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    del graph.value_info[:]


def _structural_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in a topological order that depends on the graph's structure only (tf2onnx breaks
    ties differently from one export to the next): depth-first from each output, a node after its
    inputs in input order. Nodes no output depends on follow in their own order. Returns copies."""
    nodes = list(graph.node)
    producer = {out: j for j, node in enumerate(nodes) for out in node.output if out}
    placed, ordered = set(), []
    for output in graph.output:
        stack = [(producer[output.name], False)] if output.name in producer else []
        while stack:
            j, inputs_done = stack.pop()
            if j in placed:
                continue
            if inputs_done:
                placed.add(j)
                ordered.append(j)
                continue
            stack.append((j, True))
            stack.extend((producer[x], False) for x in reversed(nodes[j].input) if x in producer)
    ordered += [j for j in range(len(nodes)) if j not in placed]
    copies = []
    for j in ordered:
        copies.append(type(nodes[j])())
        copies[-1].CopyFrom(nodes[j])
    return copies


def parity(model: keras.Model, onnx_bytes: bytes, X: ArrayLike) -> float:
    """Max absolute difference between the Keras model's and onnxruntime's outputs on X."""
    from . import compiled
    from .fusion import predict

    rows = np.asarray(X, dtype=np.float32)
    keras_out = compiled.forward(model, rows).astype(np.float64)
    return float(np.max(np.abs(keras_out - predict(onnx_bytes, rows)), initial=0.0))


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # noqa: BLE001 - e.g. strings or exotic types
        name: str = onnx.TensorProto.DataType.Name(elem_type)
        return name.lower()


def _values(values: Iterable[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": _dtype_name(t.elem_type)})
    return out


def describe(onnx_bytes: bytes) -> dict[str, Any]:
    """{opset, inputs, outputs, producer, metadata}; shapes hold ints, or a name/None per symbolic dim."""
    m = onnx.load_from_string(onnx_bytes)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "inputs": _values(m.graph.input), "outputs": _values(m.graph.output),
            "producer": m.producer_name, "metadata": {p.key: p.value for p in m.metadata_props}}
