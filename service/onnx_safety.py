"""Refuse ONNX models whose external data would be read from outside the model's own folder.

A copy of export/safety.py (the service may not import `export`); keep the two identical below this
docstring. Standard library only: it walks the protobuf wire format along the few paths where onnx.proto
lets a TensorProto sit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

# Field numbers from onnx.proto (checked against onnx's own descriptors in tests/export/test_safety.py).
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
FUNCTION_NODE = 7
NODE_ATTRIBUTE = 5
ATTRIBUTE_TENSORS = (5, 10)  # t, tensors
ATTRIBUTE_GRAPHS = (6, 11)  # g, graphs
ATTRIBUTE_SPARSE_TENSORS = (22, 23)  # sparse_tensor, sparse_tensors
SPARSE_TENSORS = (1, 2)  # values, indices
TENSOR_EXTERNAL_DATA = 13
ENTRY_KEY, ENTRY_VALUE = 1, 2


class UnsafeModelError(ValueError):
    pass


def check_onnx_external_data(model_path: Path) -> list[Path]:
    """The external data files `model_path` reads, after refusing any that leave its folder.

    Triton and ONNX Runtime open these paths themselves; a location such as `/etc/shadow`
    or `../../other_model/weights` would let a model file read anything the server can.
    """
    model_path = Path(model_path)
    folder = model_path.resolve().parent
    files = []
    for location in external_locations(model_path.read_bytes()):
        files.append(resolve_inside(folder, location, model_path))
    return sorted(set(files))


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


def external_locations(model: bytes) -> Iterator[str]:
    """Every external-data `location` of every tensor in a serialized ModelProto."""
    for tensor in _model_tensors(memoryview(model)):
        for field, entry in _fields(tensor):
            if field == TENSOR_EXTERNAL_DATA:
                kv = dict(_fields(entry))
                if bytes(kv.get(ENTRY_KEY, b"")) == b"location":
                    yield bytes(kv.get(ENTRY_VALUE, b"")).decode("utf-8", errors="replace")


def _model_tensors(model: memoryview) -> Iterator[memoryview]:
    for field, value in _fields(model):
        if field == MODEL_GRAPH:
            yield from _graph_tensors(value)
        elif field == MODEL_FUNCTIONS:
            yield from _node_tensors(value, FUNCTION_NODE)


def _graph_tensors(graph: memoryview) -> Iterator[memoryview]:
    for field, value in _fields(graph):
        if field == GRAPH_INITIALIZER:
            yield value
        elif field == GRAPH_SPARSE_INITIALIZER:
            yield from (v for f, v in _fields(value) if f in SPARSE_TENSORS)
    yield from _node_tensors(graph, GRAPH_NODE)


def _node_tensors(container: memoryview, node_field: int) -> Iterator[memoryview]:
    """Tensors in node attributes (Constant values) and in subgraphs (If/Loop bodies)."""
    for field, node in _fields(container):
        if field != node_field:
            continue
        for attr_field, attr in _fields(node):
            if attr_field == NODE_ATTRIBUTE:
                yield from _attribute_tensors(attr)


def _attribute_tensors(attr: memoryview) -> Iterator[memoryview]:
    for field, value in _fields(attr):
        if field in ATTRIBUTE_TENSORS:
            yield value
        elif field in ATTRIBUTE_GRAPHS:
            yield from _graph_tensors(value)
        elif field in ATTRIBUTE_SPARSE_TENSORS:
            yield from (v for f, v in _fields(value) if f in SPARSE_TENSORS)


def _fields(message: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, bytes) of each length-delimited field: the only wire type that holds messages or strings."""
    i, end = 0, len(message)
    while i < end:
        key, i = _varint(message, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(message, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            size, i = _varint(message, i)
            if i + size > end:
                raise UnsafeModelError("truncated ONNX protobuf: the file is damaged or not an ONNX model")
            yield key >> 3, message[i : i + size]
            i += size
        else:
            raise UnsafeModelError(f"unsupported protobuf wire type {wire}: not an ONNX model")


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(buf):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
    raise UnsafeModelError("truncated ONNX protobuf: the file is damaged or not an ONNX model")
