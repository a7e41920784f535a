"""The graph checks catch what the exporter could get wrong: control flow, a wrong signature, debug paths."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from export.errors import ExportError
from export.onnx_graph import check_no_control_flow, check_signature, strip_debug_metadata


def graph_model(nodes, inputs, outputs) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


def tensor(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


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
