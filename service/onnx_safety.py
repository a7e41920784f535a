"""Refuse ONNX models whose external data would be read from outside the model's own folder."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data


class UnsafeModelError(ValueError):
    pass


def check_onnx_external_data(model_path: Path) -> list[Path]:
    """The external data files `model_path` reads, after refusing any that leave its folder.

    ONNX Runtime and Triton open these paths themselves; a location such as `/etc/shadow`
    or `../../other_model/weights` would let a model file read anything the server can.
    """
    model_path = Path(model_path)
    folder = model_path.resolve().parent
    return sorted({resolve_inside(folder, location, model_path) for location in _read_locations(model_path)})


def _read_locations(model_path: Path) -> set[str]:
    try:
        return external_locations(onnx.load(str(model_path), load_external_data=False))
    except (DecodeError, ValueError) as e:  # ValueError: a negative offset or length in an external_data entry
        raise UnsafeModelError(
            f"{model_path}: not a readable ONNX model ({e}); re-export the model or re-copy its folder"
        ) from e


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The `location` of every tensor whose data lives in another file."""
    tensors = chain(_get_all_tensors(model), _tensors_onnx_skips(model))
    return {ExternalDataInfo(t).location for t in tensors if uses_external_data(t)}


def _tensors_onnx_skips(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """onnx's own walk leaves out sparse tensors and the initializers of subgraphs inside functions,
    yet ONNX Runtime opens their external files all the same."""
    for graph in _graphs(model):
        yield from getattr(graph, "initializer", [])  # a FunctionProto has none
        sparse = list(getattr(graph, "sparse_initializer", []))
        for attr in (a for node in graph.node for a in node.attribute):
            sparse += [attr.sparse_tensor, *attr.sparse_tensors]
        for tensor in sparse:
            yield from (tensor.values, tensor.indices)


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto | onnx.FunctionProto]:
    """The main graph, the model-local functions, and every subgraph (If/Loop/Scan bodies) below them."""
    pending = [model.graph, *model.functions]
    while pending:
        graph = pending.pop()
        yield graph
        for attr in (a for node in graph.node for a in node.attribute):
            pending += [attr.g] if attr.HasField("g") else []
            pending += attr.graphs


def resolve_inside(folder: Path, location: str, model_path: Path) -> Path:
    """Backslashes count as separators so a Windows-style `..\\x` is caught on every platform."""
    posix = location.replace("\\", "/")
    if not location or PurePosixPath(posix).is_absolute() or PureWindowsPath(location).drive:
        raise UnsafeModelError(
            f"{model_path}: external data location {location!r} is empty or absolute; "
            "re-save the model with its weights inside the graph or next to it (onnx.save_model)"
        )
    target = (folder / posix).resolve()  # follows symlinks, so a link pointing out is caught too
    if not target.is_relative_to(folder):
        raise UnsafeModelError(
            f"{model_path}: external data location {location!r} resolves to {target}, outside {folder}; "
            "a model may only read files inside its own folder"
        )
    return target
