"""The ONNX graph of one depth: trace it, embed its weights, and check it before anything runs it."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from export.errors import ExportError
from srvit.model import FixedDepth, SRViT

OPSET = 18
INPUT, OUTPUT = "images", "logits"
CONTROL_FLOW_OPS = {"Loop", "If", "Scan", "SequenceMap"}
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def trace(model: SRViT, depth: int, path: Path) -> None:
    """Export the model at one depth to `path`, one self-contained file with a dynamic batch dim."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as scratch:
        raw = Path(scratch) / "traced.onnx"
        _torch_export(model, depth).save(str(raw))  # may write external data beside it
        proto = onnx.load(str(raw), load_external_data=True)
    strip_debug_metadata(proto)
    save_embedded(proto, path)


def _torch_export(model: SRViT, depth: int) -> torch.onnx.ONNXProgram:
    c = model.cfg
    example = torch.zeros(2, c.in_chans, c.img_size, c.img_size)  # batch 2: size 1 would be specialised
    with _quiet_exporter():
        return torch.onnx.export(
            FixedDepth(model, depth).eval(), (example,), dynamo=True, opset_version=OPSET,
            input_names=[INPUT], output_names=[OUTPUT], verbose=False,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        )  # fmt: skip


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings (deprecations, "torchvision is not installed") would bury the progress
    display; its errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def strip_debug_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces: they hold this machine's absolute source paths,
    make the bytes depend on where the checkout lives, and are about 40% of the file."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for g in graphs:
        for node in g.node:
            del node.metadata_props[:]
    del proto.graph.metadata_props[:]


def save_embedded(proto: onnx.ModelProto, path: Path) -> None:
    """One file with every tensor inside: Triton wants a model's data in its own folder, and one file
    cannot point anywhere else."""
    if proto.ByteSize() > PROTOBUF_LIMIT_BYTES:
        raise ExportError(
            f"the graph for {path} is over 2 GB, too big to embed its weights; "
            "this exporter only writes self-contained graphs, so export a smaller variant"
        )
    onnx.save_model(proto, str(path), save_as_external_data=False)


def check_graph(path: Path, depth: int, chw: tuple[int, int, int], num_classes: int) -> onnx.ModelProto:
    """Every structural promise the repository makes about model.onnx, checked before parity."""
    proto = onnx.load(str(path), load_external_data=False)
    check_embedded(proto, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"depth {depth}: the exported graph is not valid ONNX: {e}") from e
    check_no_control_flow(proto, depth)
    check_signature(proto, chw, num_classes)
    return proto


def check_embedded(proto: onnx.ModelProto, path: Path) -> None:
    """This exporter writes every tensor into the graph, so any external data means the file is not ours."""
    external = [t.name for t in _get_all_tensors(proto) if uses_external_data(t)]
    if external:
        raise ExportError(
            f"{path}: tensors {external[:3]} ({len(external)} in all) keep their data in external files; "
            "the repository only takes graphs with every weight embedded, as save_embedded writes them"
        )


def check_no_control_flow(proto: onnx.ModelProto, depth: int) -> None:
    """The recursion is a Python loop, so each depth must unroll into a flat graph that TensorRT
    and every ORT provider can run; a Loop or If means the trace captured the depth dynamically."""
    found = sorted({n.op_type for n in _all_nodes(proto)} & CONTROL_FLOW_OPS)
    if found:
        raise ExportError(
            f"depth {depth}: the graph contains control flow {found}; the recursion must unroll. "
            "Check that SoftMoRBlock.steps still loops in Python over a constant depth."
        )


def _all_nodes(proto: onnx.ModelProto):
    pending = [proto.graph, *proto.functions]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            yield node
            for attr in node.attribute:
                pending.extend([attr.g] if attr.HasField("g") else [])
                pending.extend(attr.graphs)


def check_signature(proto: onnx.ModelProto, chw: tuple[int, int, int], num_classes: int) -> None:
    """images [batch, C, H, W] -> logits [batch, num_classes], float32, batch symbolic: what the
    config.pbtxt and manifest declare."""
    expected = {INPUT: [None, *chw], OUTPUT: [None, num_classes]}
    actual = {v.name: _shape(v) for v in [*proto.graph.input, *proto.graph.output]}
    if actual != expected:
        raise ExportError(f"graph signature {actual} does not match the expected {expected} (None = dynamic batch)")
    for v in [*proto.graph.input, *proto.graph.output]:
        if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"graph {v.name!r} is not float32")


def _shape(value: onnx.ValueInfoProto) -> list[int | None]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]
