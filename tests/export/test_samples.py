"""Parity and accuracy use the checkpoint's held-out split when it is here, and say so when it is not."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.errors import ExportError
from export.pipeline import export_checkpoint
from export.samples import find_samples
from srvit.checkpoint import load_checkpoint
from srvit.data import fashion_mnist_dataset
from srvit.evaluate import evaluate_depths


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path) -> Path:
    """40 held-out 28x28 images in Fashion-MNIST's own IDX format."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 3, 40))
    return root


def test_fashion_mnist_checkpoints_are_checked_and_scored_on_the_test_split(tiny, tmp_path, fake_fashion):
    cfg = dataclasses.replace(tiny.cfg, img_size=28, patch_size=7)
    preprocessing = {**tiny.preprocessing, "input_size": 28, "resize_size": 28}  # what a 28 px model is served with
    ckpt = dataclasses.replace(tiny, cfg=cfg, preprocessing=preprocessing).save(tmp_path / "f.safetensors",
                                                                                 dataset="fashion-mnist")  # fmt: skip
    repo = tmp_path / "repo"
    [row] = export_checkpoint(ckpt, "f", repo, depths=[2], data=fake_fashion, parity_images=16, max_batch=8)
    manifest = json.loads((repo / "f_d2" / "manifest.json").read_text())
    assert manifest["parity"]["source"].startswith("fashion-mnist:test") and manifest["parity"]["images"] == 16
    model, _ = load_checkpoint(ckpt)
    expected = evaluate_depths(model, fashion_mnist_dataset(fake_fashion, "test"), depths=[2])[2]
    assert manifest["accuracy"] == {"top1": expected, "images": 40, "split": "fashion-mnist:test"}
    assert row["accuracy"] == expected


def test_without_the_dataset_parity_falls_back_to_random_inputs_and_says_so(tiny, tmp_path):
    samples = find_samples({"training": {"dataset": "fashion-mnist"}}, tiny.cfg, tmp_path / "absent", 4)
    assert samples.heldout is None and "random" in samples.source and tuple(samples.parity.shape) == (4, 1, 8, 8)


def test_imagefolder_checkpoints_use_their_val_split(tiny, tmp_path):
    root = tmp_path / "images"
    for label in tiny.labels:
        (root / "val" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(root / "val" / label / f"{i}.png")
    meta = {"training": {"dataset": f"imagefolder:{root}"}, "preprocessing": tiny.preprocessing}
    samples = find_samples(meta, tiny.cfg, None, 3)
    assert samples.split == f"imagefolder:{root}/val" and len(samples.heldout) == 6
    assert tuple(samples.parity.shape) == (3, 1, 8, 8)  # spread over classes: every 2nd image


def test_held_out_images_of_the_wrong_shape_are_refused(tiny, fake_fashion):
    with pytest.raises(ExportError, match="model takes"):
        find_samples({"training": {"dataset": "fashion-mnist"}}, tiny.cfg, fake_fashion, 4)
