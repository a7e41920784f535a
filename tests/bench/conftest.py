"""A tiny random model exported into a fresh repository, and a real `srvit serve` process on it."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="exporting the test model needs torch (pip install -e '.[export]')")

from export.pipeline import export_checkpoint  # noqa: E402
from service.bench import served  # noqa: E402
from srvit.checkpoint import save_checkpoint  # noqa: E402
from srvit.model import SRViT, SRViTConfig  # noqa: E402

TINY = SRViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, num_blocks=1, num_heads=2,
                   mlp_ratio=2.0, max_depth=2, router_hidden=8)  # fmt: skip
PREPROCESSING = {"input_size": 8, "channels": "L", "mean": [0.5], "std": [0.5], "resize_size": 8,
                 "interpolation": "bilinear"}  # fmt: skip
# Start-up times one batch size once per depth: the server is ready in seconds on two busy cores.
FAST_START = {"SRVIT_WARMUP_BATCH_SIZES": "1", "SRVIT_WARMUP_RUNS": "1", "SRVIT_PREPROCESS_THREADS": "1"}


def export_tiny(folder: Path) -> Path:
    """A random 10-class model taking Fashion-MNIST-like gray images, exported at depths 1 and 2."""
    torch.manual_seed(0)
    meta = {"labels": [f"class{i}" for i in range(10)], "preprocessing": PREPROCESSING, "model": "tiny"}
    checkpoint, repo = folder / "tiny.safetensors", folder / "model_repo"
    save_checkpoint(checkpoint, SRViT(TINY), {**meta, "training": {"dataset": "none"}})
    export_checkpoint(checkpoint, "tiny", repo, data=None, parity_images=8, max_batch=8)
    return repo


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="session")
def server(tiny_repo):
    with served(tiny_repo, FAST_START, ready_timeout_s=120) as server:
        yield server
