"""Keras model -> ONNX bytes (input `features` float32 [N, d], output `prob` float32 [N, k]).

Keras 3 models go through a `tf.function` with a fixed input signature and
`tf2onnx.convert.from_function` (`from_keras` needs output names Keras 3 does not give).
"""
from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import onnx  # noqa: E402

INPUT = "features"
OUTPUT = "prob"
BATCH = "N"
DEFAULT_OPSET = 17


def to_onnx(model, opset: int = DEFAULT_OPSET) -> bytes:
    """The model as a serialized ONNX ModelProto; the batch dimension is named `N`."""
    import tensorflow as tf
    import tf2onnx

    n_features = int(model.inputs[0].shape[-1])

    @tf.function(input_signature=[tf.TensorSpec((None, n_features), tf.float32, name=INPUT)])
    def serve(features):
        return {OUTPUT: model(features, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=opset)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = BATCH
    for vi in proto.graph.value_info:  # intermediate shapes: keep the batch name consistent
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param") and dims[0].dim_param.startswith("unk__"):
            dims[0].dim_param = BATCH
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != [INPUT] or names_out != [OUTPUT]:
        raise RuntimeError(f"unexpected ONNX signature: inputs {names_in}, outputs {names_out}")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def parity(model, onnx_bytes: bytes, X) -> float:
    """Max absolute difference between the Keras model's and onnxruntime's outputs on X."""
    from .fusion import predict

    X = np.asarray(X, dtype=np.float32)
    keras_out = np.asarray(model(X, training=False), dtype=np.float64)
    return float(np.max(np.abs(keras_out - predict(onnx_bytes, X)), initial=0.0))


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # noqa: BLE001 - e.g. strings or exotic types
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _values(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": _dtype_name(t.elem_type)})
    return out


def describe(onnx_bytes: bytes) -> dict:
    """{opset, inputs, outputs, producer, metadata}; shapes hold ints, or a name/None per symbolic dim."""
    m = onnx.load_from_string(onnx_bytes)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "inputs": _values(m.graph.input), "outputs": _values(m.graph.output),
            "producer": m.producer_name, "metadata": {p.key: p.value for p in m.metadata_props}}
