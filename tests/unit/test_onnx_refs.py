"""Models that refer to files are refused before onnxruntime opens anything: the external-data
model that leaked a file through its output, and the same trick hidden in a constant or subgraph."""
import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper, numpy_helper

from skyfuse.serving import testing
from skyfuse.serving.model import LoadedModel, ModelError
from skyfuse.serving.onnx_refs import Malformed, external_tensors


def pointing_outside(model_bytes: bytes, location: str = "../pyproject.toml") -> bytes:
    model = onnx.load_from_string(model_bytes)
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data) or 16)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    return model.SerializeToString()


def test_a_model_whose_initializer_is_external_data_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path.parent / "pyproject.toml").write_text("secret = 'do not serve me'\n")
    bad = pointing_outside(testing.classifier())
    name = onnx.load_from_string(bad).graph.initializer[0].name
    assert external_tensors(bad) == [name]
    with pytest.raises(ModelError, match=rf"external data in tensor\(s\) {name}.*self-contained"):
        LoadedModel(bad, "evil")


def test_external_data_in_a_constant_inside_a_subgraph_is_found():
    inner_tensor = numpy_helper.from_array(np.zeros(2, np.float32), "hidden")
    external_data_helper.set_external_data(inner_tensor, location="/etc/hostname")
    inner_tensor.data_location = onnx.TensorProto.EXTERNAL
    inner_tensor.ClearField("raw_data")
    const = helper.make_node("Constant", [], ["c"], value=inner_tensor)
    branch = helper.make_graph([const], "branch", [], [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2])])
    cond = helper.make_node("If", ["x"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([cond], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph).SerializeToString()
    assert external_tensors(model) == ["hidden", "hidden"]


def test_self_contained_models_pass_and_garbage_is_malformed():
    assert external_tensors(testing.classifier()) == []
    with pytest.raises(Malformed):
        external_tensors(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
