"""A model may only read external data from its own folder, wherever in the graph the tensor sits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data, uses_external_data

from service.onnx_safety import UnsafeModelError, check_onnx_external_data

OUT = helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])


def weights(name: str, n: int = 300) -> TensorProto:
    return numpy_helper.from_array(np.arange(n, dtype=np.float32), name)


def saved_with_external_weights(folder: Path, location: str = "weights.bin") -> Path:
    """A real model whose initializer onnx itself moved into `location` next to it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [300])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [OUT], initializer=[weights("w")])
    model = helper.make_model(graph)
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=0)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def relocate(path: Path, location: str) -> Path:
    """Point every external tensor at `location`, as a hostile or careless model file would."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in filter(uses_external_data, _get_all_tensors(model)):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    return path


def test_weights_inside_the_folder_are_accepted(tmp_path):
    path = saved_with_external_weights(tmp_path / "m")
    assert (tmp_path / "m" / "weights.bin").stat().st_size == 300 * 4
    assert check_onnx_external_data(path) == [(tmp_path / "m" / "weights.bin").resolve()]


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


PLACES = ["initializer", "constant", "branch_initializer", "branch_constant", "function_constant",
          "function_branch_initializer", "function_branch_constant", "sparse_values", "sparse_indices"]  # fmt: skip


def model_with_tensors_everywhere(escaping: str) -> onnx.ModelProto:
    """One tensor in each place onnx.proto lets a tensor sit; only the one at `escaping` points out of the folder."""

    def tensor(place: str, array: np.ndarray | None = None) -> TensorProto:
        t = numpy_helper.from_array(np.arange(4, dtype=np.float32) if array is None else array, place)
        if place == escaping:
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value="../stolen.bin")
        return t

    def branch(prefix: str) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], ["y"], value=tensor(f"{prefix}_constant"))
        return helper.make_graph([const], prefix, [], [OUT], initializer=[tensor(f"{prefix}_initializer")])

    def if_node(prefix: str) -> onnx.NodeProto:
        return helper.make_node("If", ["cond"], ["y"], then_branch=branch(prefix), else_branch=branch(prefix))

    constant = helper.make_node("Constant", [], ["c"], value=tensor("constant"))
    graph = helper.make_graph([constant, if_node("branch")], "g", [], [OUT], initializer=[tensor("initializer")])
    sparse_indices = tensor("sparse_indices", np.array([0, 5], dtype=np.int64))
    graph.sparse_initializer.append(helper.make_sparse_tensor(tensor("sparse_values"), sparse_indices, [300]))
    function_constant = helper.make_node("Constant", [], ["o"], value=tensor("function_constant"))
    function = helper.make_function("local", "f", [], ["o"], [function_constant, if_node("function_branch")], [])
    return helper.make_model(graph, functions=[function])


@pytest.mark.parametrize("place", PLACES)
def test_an_escaping_tensor_is_found_wherever_it_sits(tmp_path, place):
    path = tmp_path / "model.onnx"
    path.write_bytes(model_with_tensors_everywhere(escaping=place).SerializeToString())
    with pytest.raises(UnsafeModelError, match="'../stolen.bin' resolves to .*outside"):
        check_onnx_external_data(path)


def test_a_model_with_every_tensor_embedded_reads_no_files(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(model_with_tensors_everywhere(escaping="").SerializeToString())
    assert check_onnx_external_data(path) == []


def test_garbage_is_reported_as_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x3a\xff\xff\xff\x0f")  # field 7, length-delimited, claiming 4 GB
    with pytest.raises(UnsafeModelError, match="not a readable ONNX model"):
        check_onnx_external_data(path)
