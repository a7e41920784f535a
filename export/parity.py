"""Numerical checks of an exported graph or engine: logits against a reference, top-1 on held-out data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.data import DataLoader, Dataset

from export.errors import ExportError
from srvit.model import SRViT

Runner = Callable[[np.ndarray], np.ndarray]  # images [B, C, H, W] float32 -> logits [B, num_classes]


def ort_runner(path: Path) -> Runner:
    """ONNX Runtime on CPU in fp32: the reference every server (ours and Triton's) can reproduce."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"images": images})[0]


def torch_runner(model: SRViT, depth: int) -> Runner:
    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(images), depth).numpy()

    return run


def logits(run: Runner, images: torch.Tensor, batch: int) -> np.ndarray:
    """Batched so no call exceeds the max batch the graph or engine was built for."""
    x = images.numpy().astype(np.float32, copy=False)
    return np.concatenate([run(np.ascontiguousarray(x[i : i + batch])) for i in range(0, len(x), batch)])


def compare(actual: np.ndarray, reference: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(actual - reference).max()),
        "top1_agreement": float((actual.argmax(-1) == reference.argmax(-1)).mean()),
    }


def require(result: dict, what: str, atol: float | None, min_agreement: float) -> None:
    """Stop the export: a graph that disagrees with its source must not be published."""
    diff, agree = result["max_abs_diff"], result["top1_agreement"]
    if (atol is not None and not diff <= atol) or agree < min_agreement:
        limit = f"max |Δlogit| <= {atol} and " if atol is not None else ""
        raise ExportError(
            f"{what}: parity failed: max |Δlogit| = {diff:.3g}, top-1 agreement = {agree:.2%} "
            f"(needed {limit}agreement >= {min_agreement:.1%}); nothing was published. "
            "Look for an op the exporter translated differently."
        )


def heldout_logits(run: Runner, ds: Dataset, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, classes] and labels [N] over the whole split, in its order."""
    outputs, targets = [], []
    for images, labels in DataLoader(ds, batch_size=batch):
        outputs.append(run(np.ascontiguousarray(images.numpy().astype(np.float32, copy=False))))
        targets.append(labels.numpy())
    return np.concatenate(outputs), np.concatenate(targets)


def top1(logits: np.ndarray, labels: np.ndarray, split: str) -> dict:
    """Top-1 accuracy over the whole split, as the manifest records it."""
    return {"top1": round(float((logits.argmax(-1) == labels).mean()), 4), "images": len(labels), "split": split}
