"""Service fixtures: a tiny random model exported once per session, settings for fast start-up, in-process apps."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch

from export.pipeline import export_checkpoint
from service.app import create_app
from service.runtime import tensorrt_unavailable
from service.settings import Settings
from srvit.checkpoint import save_checkpoint
from srvit.model import SRViT, SRViTConfig

TINY_LABELS = ["alpha", "beta", "gamma"]
TINY_CONFIG = SRViTConfig(
    img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
    num_blocks=1, num_heads=2, mlp_ratio=2.0, max_depth=3, router_hidden=8,
)  # fmt: skip
TINY_PREPROCESSING = {
    "input_size": 8, "channels": "L", "mean": [0.5], "std": [0.5], "resize_size": 8, "interpolation": "bilinear",
}  # fmt: skip


def pytest_runtest_setup(item):
    """GPU tests need a GPU, TensorRT, and Polygraphy to build their engine: skip saying which is missing."""
    if item.get_closest_marker("gpu"):
        reason = tensorrt_unavailable()
        if reason is None and importlib.util.find_spec("polygraphy") is None:
            reason = "polygraphy is not installed (pip install 'srvit[tensorrt]')"
        if reason:
            pytest.skip(reason)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random model: serving does not care whether it was trained, only that the graphs answer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = {"labels": TINY_LABELS, "preprocessing": TINY_PREPROCESSING, "model": "tiny"}
    save_checkpoint(path, SRViT(TINY_CONFIG), {**meta, "training": {"dataset": "synthetic"}})
    return path


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tmp_path_factory) -> Path:
    """Depths 1..3 of `tiny` exported once; tests that damage a repository copy it first (repo_copy)."""
    repo = tmp_path_factory.mktemp("served") / "model_repo"
    export_checkpoint(tiny_checkpoint, "tiny", repo, data=None, parity_images=8, max_batch=8)
    return repo


@pytest.fixture
def repo_copy(tiny_repo, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_repo, tmp_path / "model_repo"))


def fast_settings(repo: Path, **overrides) -> Settings:
    """Start-up in well under a second: one warm-up size, one timed run, a 1 ms batch window."""
    base = {"repo": repo, "warmup_batch_sizes": (1,), "warmup_runs": 1, "max_queue_delay_ms": 1,
            "preprocess_threads": 2, "intra_op_threads": 1}  # fmt: skip
    return Settings(**{**base, **overrides})


@pytest.fixture
def serving(tiny_repo):
    """`async with serving(**settings) as (app, client)`: the real app, lifespan included, over ASGITransport.

    With `start=False` the lifespan is left to the test (to see the app before it is ready).
    """

    @contextlib.asynccontextmanager
    async def serve(repo: Path | None = None, start: bool = True, **overrides) -> AsyncIterator[tuple]:
        app = create_app(fast_settings(repo or tiny_repo, **overrides))
        async with contextlib.AsyncExitStack() as stack:
            if start:
                await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://srvit", timeout=30)
            yield app, await stack.enter_async_context(client)

    return serve
