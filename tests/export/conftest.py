"""Export test fixtures: a tiny random SR-ViT checkpoint exported once, Triton's config schema, TensorRT skips."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from export.pipeline import export_checkpoint
from srvit.checkpoint import save_checkpoint
from srvit.model import SRViT, SRViTConfig


@dataclass(frozen=True)
class Tiny:
    """A model small enough that tracing a depth takes seconds on two busy cores."""

    name: str = "tiny"
    cfg: SRViTConfig = SRViTConfig(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
        num_blocks=1, num_heads=2, mlp_ratio=2.0, max_depth=3, router_hidden=8,
    )  # fmt: skip
    labels: list[str] = field(default_factory=lambda: ["alpha", "beta", "gamma"])
    preprocessing: dict = field(
        default_factory=lambda: {
            "input_size": 8,
            "channels": "L",
            "mean": [0.5],
            "std": [0.5],
            "resize_size": 8,
            "interpolation": "bilinear",
        }  # fmt: skip
    )

    def save(self, path: Path, labels: list[str] | None = None, dataset: str = "synthetic", seed: int = 0) -> Path:
        """A random model: parity does not care whether it was trained, only whether the graph matches it."""
        torch.manual_seed(seed)
        meta = {"labels": labels or self.labels, "preprocessing": self.preprocessing, "model": "tiny"}
        save_checkpoint(path, SRViT(self.cfg), {**meta, "training": {"dataset": dataset}})
        return path


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot be built here, or None when they can."""
    from export.tensorrt import gpu

    for module in ("tensorrt", "polygraphy"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'srvit[tensorrt]')"
    if gpu() is None:
        return "no NVIDIA GPU: libcuda.so.1 is missing or reports no device"
    return None


def pytest_runtest_setup(item):
    """Tests marked gpu build real TensorRT engines: skip them, saying why, where that cannot work."""
    if item.get_closest_marker("gpu") and (reason := tensorrt_unavailable()):
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tensorrt_missing() -> str | None:
    return tensorrt_unavailable()


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny, tmp_path_factory) -> Path:
    return tiny.save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def exported(tiny, tiny_checkpoint, tmp_path_factory) -> tuple[Path, list[dict]]:
    """All three depths exported once into a fresh repo; tests only read it."""
    repo = tmp_path_factory.mktemp("exported") / "model_repo"
    rows = export_checkpoint(tiny_checkpoint, tiny.name, repo, data=None, parity_images=64, max_batch=16)
    return repo, rows


@pytest.fixture(scope="session")
def model_config_pb2():
    """Triton's own ModelConfig schema. tritonclient[http] ships the generated module, but the
    tritonclient.grpc package refuses to import without grpcio, so then load the file itself."""
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install 'srvit[test]')")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
