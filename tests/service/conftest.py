"""Service fixtures: a damageable copy of the tiny repository, settings for fast start-up, in-process apps, a
runtime slowed to a known cost."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import pytest

import service.loading
from service.app import create_app
from service.runtime import tensorrt_unavailable
from service.settings import Settings


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


@pytest.fixture
def repo_copy(tiny_repo, tmp_path) -> Path:
    """The session's tiny_repo (tests/conftest.py) is shared: a test that damages a repository takes a copy."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "model_repo"))


def fast_settings(repo: Path, **overrides) -> Settings:
    """Start-up in well under a second: one warm-up size, one timed run, a 1 ms batch window; no gRPC port
    unless a test asks for one (several apps run side by side)."""
    base = {"repo": repo, "warmup_batch_sizes": (1,), "warmup_runs": 1, "max_queue_delay_ms": 1,
            "preprocess_threads": 2, "intra_op_threads": 1, "grpc_port": 0}  # fmt: skip
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


class Slowed:
    """A runtime whose batches take `ms` per image: a device with a predictable cost."""

    def __init__(self, inner, ms: float):
        self.inner, self.ms, self.provider = inner, ms, f"slowed {inner.provider}"

    def run(self, images):
        time.sleep(self.ms * len(images) / 1000)
        return self.inner.run(images)

    def close(self):
        self.inner.close()


@pytest.fixture
def slowed(monkeypatch):
    """Per image: depth 1 takes `ms`, depth 2 twice that, depth 3 three times, or `ms[depth]` when `ms` is a
    mapping; warm-up measures it too."""

    def install(ms: float | Mapping[int, float]) -> None:
        real = service.loading.open_runtime

        def open_slowed(artifacts, *args):
            depth = artifacts[0].depth
            return Slowed(real(artifacts, *args), ms[depth] if isinstance(ms, Mapping) else ms * depth)

        monkeypatch.setattr(service.loading, "open_runtime", open_slowed)

    return install
