"""Tiny ONNX classifiers for the serving tests and benchmark, built with `onnx.helper`.

Not on the serving path: `onnx` is imported only when `classifier` is called.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
IRIS_CLASSES = ("setosa", "versicolor", "virginica")


def classifier(width: int = 4, classes: Sequence[str] = IRIS_CLASSES, *, seed: int = 0, hidden: Sequence[int] = (),
               features: Sequence[str] | None = None, lineage: dict[str, Any] | None = None, opset: int = 17,
               input_name: str = "features") -> bytes:
    """A serialized MLP classifier: `features` float32 [N, width] → (MatMul+Add+Relu)* → MatMul+Add →
    Softmax → `prob` float32 [N, len(classes)], with `skyfuse.lineage` JSON (features, classes,
    members, …) in its metadata_props. Weights drawn from `seed`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k = len(classes)
    nodes, inits = [], []
    prev, prev_width = input_name, width
    for i, units in enumerate([*hidden, k]):
        w = rng.normal(0, 1 / np.sqrt(prev_width), (prev_width, units)).astype(np.float32)
        b = rng.normal(0, 0.1, units).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"B{i}"], [f"z{i}"])]
        prev, prev_width = f"z{i}", units
        if i < len(hidden):
            nodes.append(helper.make_node("Relu", [prev], [f"h{i}"]))
            prev = f"h{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["prob"], axis=-1))
    graph = helper.make_graph(
        nodes, "skyfuse_test_classifier",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", k])], inits)
    model = helper.make_model(graph, producer_name="skyfuse-test", opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    names = list(features) if features is not None else (
        list(IRIS_FEATURES) if width == len(IRIS_FEATURES) else [f"f{i}" for i in range(width)])
    doc = {"run_id": f"test-{seed}", "round": 0, "strategy": "wavg", "features": names, "classes": list(classes),
           "members": [{"cloud": "aws", "shard_id": "s0", "samples": 100, "weight": 1.0}]}
    doc.update(lineage or {})
    helper.set_model_props(model, {"skyfuse.lineage": json.dumps(doc), "skyfuse.strategy": "wavg"})
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def reference(model_bytes: bytes, X: npt.ArrayLike) -> np.ndarray:
    """The model's `prob` for X from a plain onnxruntime session (what predictions must equal)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    probs: np.ndarray = session.run(["prob"], {session.get_inputs()[0].name: np.asarray(X, dtype=np.float32)})[0]
    return probs
