"""manifest.json, the file `srvit serve` reads: what a model folder holds and how far it was checked."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import onnx
import onnxruntime
import torch

from export.onnx_graph import INPUT, OPSET, OUTPUT
from srvit.model import SRViTConfig

FORMAT = "srvit-manifest/1"
MODEL_FILE = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


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


def signature(cfg: SRViTConfig) -> dict:
    """Input and output as the manifest spells them; -1 is the batch."""
    return {
        "input": {"name": INPUT, "datatype": "FP32", "shape": [-1, cfg.in_chans, cfg.img_size, cfg.img_size]},
        "output": {"name": OUTPUT, "datatype": "FP32", "shape": [-1, cfg.num_classes]},
    }


def file_entries(folder: Path, relative_paths: list[str]) -> dict:
    """Checksums of the files the server loads, so it can refuse a folder that changed after export."""
    entries = {}
    for rel in sorted(relative_paths):
        data = (folder / rel).read_bytes()
        entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    return entries


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build_manifest(*, name: str, triton_name: str, version: int, depth: int, platform: str, max_batch: int,
                   meta: dict, cfg: SRViTConfig, checkpoint: dict, versions: dict, parity: dict,
                   accuracy: dict | None, files: dict, tensorrt: dict | None) -> dict:  # fmt: skip
    """Key order follows docs/model_repo.md so a reader can check one against the other."""
    return {
        "format": FORMAT,
        "name": name,
        "triton_name": triton_name,
        "version": version,
        "depth": depth,
        "max_depth": cfg.max_depth,
        "platform": platform,
        "model_file": f"{version}/{MODEL_FILE[platform]}",
        "max_batch_size": max_batch,
        **signature(cfg),
        "labels": list(meta["labels"]),
        "preprocessing": meta["preprocessing"],
        "config": cfg.to_dict(),
        "checkpoint": checkpoint,
        "opset": OPSET,
        "versions": versions,
        "parity": parity,
        "accuracy": accuracy,
        "files": files,
        "tensorrt": tensorrt,
    }
