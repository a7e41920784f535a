"""External data may only come from the model's own folder; the wire-format walk agrees with onnx's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors

from export import safety
from export.safety import UnsafeModelError, check_onnx_external_data, external_locations


def weights(name: str, n: int = 300) -> TensorProto:
    return numpy_helper.from_array(np.arange(n, dtype=np.float32), name)


def model_with_tensors_everywhere() -> onnx.ModelProto:
    """Tensors as an initializer, a Constant attribute, inside an If branch, as a sparse initializer
    and inside a model-local function: every place a location can hide."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [300])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])
    const = helper.make_node("Constant", [], ["c"], value=weights("c_value"))
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value=weights("branch_value"))], "branch", [], [y]
    )
    cond = helper.make_node("If", ["cond"], ["y_if"], then_branch=branch, else_branch=branch)
    add = helper.make_node("Add", ["x", "c"], ["y"])
    sparse = helper.make_sparse_tensor(weights("sparse_values", 2), numpy_helper.from_array(np.array([0, 5])), [300])
    graph = helper.make_graph(
        [const, cond, add], "g", [x], [y], initializer=[weights("w"), numpy_helper.from_array(np.array(True), "cond")]
    )
    graph.sparse_initializer.append(sparse)
    fn = helper.make_function(
        "local", "f", ["a"], ["o"], [helper.make_node("Constant", [], ["o"], value=weights("f"))], []
    )
    model = helper.make_model(
        graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    )
    return model


def point_every_tensor_at(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    for i, tensor in enumerate(_get_all_tensors(model)):
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=f"{location}{i}")
        tensor.ClearField("raw_data")
    for sparse in model.graph.sparse_initializer:
        for i, tensor in enumerate((sparse.values, sparse.indices)):
            tensor.data_location = TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=f"{location}sparse{i}")
    return model


def test_the_wire_walk_finds_every_location_onnx_knows_of():
    model = point_every_tensor_at(model_with_tensors_everywhere(), "w")
    expected = {e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"}
    expected |= {"wsparse0", "wsparse1"}
    assert len(expected) >= 7
    assert set(external_locations(model.SerializeToString())) == expected


def test_field_numbers_match_onnx_proto():
    field = lambda message, name: message.DESCRIPTOR.fields_by_name[name].number
    assert field(onnx.ModelProto, "graph") == safety.MODEL_GRAPH
    assert field(onnx.ModelProto, "functions") == safety.MODEL_FUNCTIONS
    assert field(onnx.GraphProto, "node") == safety.GRAPH_NODE
    assert field(onnx.GraphProto, "initializer") == safety.GRAPH_INITIALIZER
    assert field(onnx.GraphProto, "sparse_initializer") == safety.GRAPH_SPARSE_INITIALIZER
    assert field(onnx.FunctionProto, "node") == safety.FUNCTION_NODE
    assert field(onnx.NodeProto, "attribute") == safety.NODE_ATTRIBUTE
    attr = onnx.AttributeProto
    assert (field(attr, "t"), field(attr, "tensors")) == safety.ATTRIBUTE_TENSORS
    assert (field(attr, "g"), field(attr, "graphs")) == safety.ATTRIBUTE_GRAPHS
    assert (field(attr, "sparse_tensor"), field(attr, "sparse_tensors")) == safety.ATTRIBUTE_SPARSE_TENSORS
    assert (field(onnx.SparseTensorProto, "values"), field(onnx.SparseTensorProto, "indices")) == safety.SPARSE_TENSORS
    assert field(onnx.TensorProto, "external_data") == safety.TENSOR_EXTERNAL_DATA
    entry = onnx.StringStringEntryProto
    assert (field(entry, "key"), field(entry, "value")) == (safety.ENTRY_KEY, safety.ENTRY_VALUE)


def saved_with_external_weights(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model_with_tensors_everywhere(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)  # fmt: skip
    return path


def relocate(path: Path, location: str) -> Path:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    return path


def test_weights_inside_the_folder_are_accepted(tmp_path):
    path = saved_with_external_weights(tmp_path / "m")
    assert check_onnx_external_data(path) == [(tmp_path / "m" / "weights.bin").resolve()]


def test_a_self_contained_model_reads_no_files(exported, tiny):
    repo, _ = exported
    assert check_onnx_external_data(repo / f"{tiny.name}_d1" / "1" / "model.onnx") == []


@pytest.mark.parametrize(
    "location", ["../weights.bin", "sub/../../weights.bin", "/etc/passwd", "..\\weights.bin", "C:\\weights.bin", ""]
)
def test_locations_leaving_the_folder_are_refused(tmp_path, location):
    path = relocate(saved_with_external_weights(tmp_path / "m"), location)
    with pytest.raises(UnsafeModelError, match="external data location"):
        check_onnx_external_data(path)


def test_a_symlink_pointing_out_of_the_folder_is_refused(tmp_path):
    path = saved_with_external_weights(tmp_path / "m")
    os.replace(tmp_path / "m" / "weights.bin", tmp_path / "outside.bin")
    (tmp_path / "m" / "weights.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(UnsafeModelError, match="outside"):
        check_onnx_external_data(path)


def test_garbage_is_reported_as_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x3a\xff\xff\xff\x0f")  # field 7, length-delimited, claiming 4 GB
    with pytest.raises(UnsafeModelError, match="not an ONNX model"):
        check_onnx_external_data(path)
