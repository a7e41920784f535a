"""Container test fixtures: a tiny exported model for the real server the Prometheus test scrapes."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A random 10-class model on 8x8 gray images, exported at depths 1 and 2 (needs torch, like export)."""
    torch = pytest.importorskip("torch", reason="exporting the test model needs torch (pip install -e '.[export]')")
    from export.pipeline import export_checkpoint
    from srvit.checkpoint import save_checkpoint
    from srvit.model import SRViT, SRViTConfig

    cfg = SRViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, num_blocks=1,
                      num_heads=2, mlp_ratio=2.0, max_depth=2, router_hidden=8)  # fmt: skip
    preprocessing = {"input_size": 8, "channels": "L", "mean": [0.5], "std": [0.5], "resize_size": 8,
                     "interpolation": "bilinear"}  # fmt: skip
    folder = tmp_path_factory.mktemp("docker")
    checkpoint, repo = folder / "tiny.safetensors", folder / "model_repo"
    torch.manual_seed(0)
    meta = {"labels": [f"class{i}" for i in range(10)], "preprocessing": preprocessing, "model": "tiny"}
    save_checkpoint(checkpoint, SRViT(cfg), {**meta, "training": {"dataset": "none"}})
    export_checkpoint(checkpoint, "tiny", repo, data=None, parity_images=8, max_batch=8)
    return repo
