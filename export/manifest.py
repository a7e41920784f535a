"""The manifest of one exported model folder, built through the contract in `modelrepo.manifest`."""

from __future__ import annotations

import importlib.metadata

import onnx
import onnxruntime
import torch

from export.errors import ExportError
from export.onnx_graph import INPUT, OPSET, OUTPUT
from modelrepo.adaptive import AdaptivePolicy
from modelrepo.manifest import FileEntry, Manifest, ManifestError, Preprocessing, TensorSpec, model_file
from srvit.model import SRViTConfig


def software_versions(tensorrt: str | None = None) -> dict:
    versions = {
        "srvit": _package_version("srvit"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    return versions | ({"tensorrt": tensorrt} if tensorrt else {})


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # a checkout used without `pip install -e .`
        return "unknown"


def signature(cfg: SRViTConfig) -> tuple[TensorSpec, TensorSpec]:
    """Input and output of every depth's graph; -1 is the batch."""
    return (
        TensorSpec(INPUT, "FP32", (-1, cfg.in_chans, cfg.img_size, cfg.img_size)),
        TensorSpec(OUTPUT, "FP32", (-1, cfg.num_classes)),
    )


def build_manifest(*, name: str, triton_name: str, version: int, depth: int, platform: str, max_batch: int,
                   meta: dict, cfg: SRViTConfig, checkpoint: dict, versions: dict, parity: dict,
                   accuracy: dict | None, files: dict[str, FileEntry], tensorrt: dict | None, flops: int,
                   calibration: dict | None, adaptive: AdaptivePolicy | None) -> Manifest:  # fmt: skip
    """Checked as the server will check it (`Manifest.from_dict`): a manifest the server would refuse is a bug
    here, raised as ExportError before anything is published."""
    inp, out = signature(cfg)
    manifest = Manifest(
        name=name, triton_name=triton_name, version=version, depth=depth, max_depth=cfg.max_depth,
        platform=platform, model_file=model_file(version, platform), max_batch_size=max_batch, input=inp,
        output=out, labels=tuple(meta["labels"]), preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        config=cfg.to_dict(), checkpoint=checkpoint, opset=OPSET, versions=versions, parity=parity,
        accuracy=accuracy, files=files, tensorrt=tensorrt, flops=flops, calibration=calibration, adaptive=adaptive,
    )  # fmt: skip
    try:
        return Manifest.from_dict(manifest.to_dict())
    except ManifestError as e:
        raise ExportError(f"{triton_name}: the manifest breaks the contract ({e}); this is an exporter bug") from e
