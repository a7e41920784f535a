"""The graph checks catch what the exporter could get wrong: external data, control flow, signature, debug paths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from export.errors import ExportError
from export.onnx_graph import check_graph, check_no_control_flow, check_signature, strip_debug_metadata


def graph_model(nodes, inputs, outputs) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


def tensor(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def classifier(weights_location: str | None) -> onnx.ModelProto:
    """images [batch, 1, 8, 8] -> logits [batch, 3], its weights embedded or beside it in `weights_location`."""
    w = numpy_helper.from_array(np.ones((64, 3), np.float32), "w")
    nodes = [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [tensor("images", ["batch", 1, 8, 8])], [tensor("logits", ["batch", 3])],
                              initializer=[w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if weights_location:
        convert_model_to_external_data(model, location=weights_location, size_threshold=0)
    return model


def test_a_graph_with_embedded_weights_passes(tmp_path):
    onnx.save_model(classifier(None), str(tmp_path / "model.onnx"))
    check_graph(tmp_path / "model.onnx", 1, (1, 8, 8), 3)


def test_a_graph_reading_external_data_is_refused_even_inside_its_folder(tmp_path):
    onnx.save_model(classifier("weights.bin"), str(tmp_path / "model.onnx"))
    assert (tmp_path / "weights.bin").is_file()
    with pytest.raises(ExportError, match=r"tensors \['w'\] .* external files"):
        check_graph(tmp_path / "model.onnx", 1, (1, 8, 8), 3)


def test_a_loop_or_if_anywhere_is_refused():
    y = tensor("y", [1])
    inner = helper.make_graph([helper.make_node("Loop", ["n", "c"], ["z"])], "inner", [], [y])
    nested = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    with pytest.raises(ExportError, match=r"control flow \['If', 'Loop'\]"):
        check_no_control_flow(graph_model([nested], [], [y]), depth=2)


def test_a_flat_graph_passes():
    check_no_control_flow(
        graph_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [1])], [tensor("y", [1])]), 1
    )


def test_signature_needs_a_dynamic_batch_and_the_declared_shapes():
    good = graph_model([], [tensor("images", ["batch", 1, 8, 8])], [tensor("logits", ["batch", 3])])
    check_signature(good, (1, 8, 8), 3)
    fixed_batch = graph_model([], [tensor("images", [4, 1, 8, 8])], [tensor("logits", [4, 3])])
    with pytest.raises(ExportError, match="signature"):
        check_signature(fixed_batch, (1, 8, 8), 3)
    with pytest.raises(ExportError, match="signature"):
        check_signature(good, (1, 8, 8), 10)


def test_debug_metadata_with_local_paths_is_stripped():
    node = helper.make_node("Relu", ["x"], ["y"])
    node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value='File "/home/someone/srvit/model.py"')
    model = graph_model([node], [tensor("x", [1])], [tensor("y", [1])])
    model.graph.metadata_props.add(key="pkg.torch.export.graph_signature", value="...")
    strip_debug_metadata(model)
    assert b"/home/someone" not in model.SerializeToString()
    assert not model.graph.metadata_props
