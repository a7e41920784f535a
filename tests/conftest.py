"""One tiny random SR-ViT for every test package: its checkpoint, and its export into a repository made once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from srvit.model import SRViTConfig

# Small enough that tracing a depth takes seconds on two busy cores.
TINY_CONFIG = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 3, "embed_dim": 16, "num_blocks": 1,
               "num_heads": 2, "mlp_ratio": 2.0, "max_depth": 3, "router_hidden": 8}  # fmt: skip
TINY_PREPROCESSING = {"input_size": 8, "channels": "L", "mean": [0.5], "std": [0.5], "resize_size": 8,
                      "interpolation": "bilinear"}  # fmt: skip


@dataclass(frozen=True)
class Tiny:
    """A random model: export and serving do not care whether it was trained, only that the graphs match it."""

    cfg: SRViTConfig
    name: str = "tiny"
    labels: list[str] = field(default_factory=lambda: ["alpha", "beta", "gamma"])
    preprocessing: dict = field(default_factory=lambda: dict(TINY_PREPROCESSING))

    def save(self, path: Path, labels: list[str] | None = None, dataset: str = "synthetic", seed: int = 0) -> Path:
        import torch

        from srvit.checkpoint import save_checkpoint
        from srvit.model import SRViT

        torch.manual_seed(seed)
        meta = {"labels": labels or self.labels, "preprocessing": self.preprocessing, "model": self.name}
        save_checkpoint(path, SRViT(self.cfg), {**meta, "training": {"dataset": dataset}})
        return path


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    """Skips, rather than fails, where torch is missing: the serving-only install has no exporter."""
    pytest.importorskip("torch", reason="exporting the test model needs torch (pip install -e '.[export]')")
    from srvit.model import SRViTConfig

    return Tiny(SRViTConfig(**TINY_CONFIG))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny, tmp_path_factory) -> Path:
    return tiny.save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def exported(tiny, tiny_checkpoint, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every depth exported once (max_batch_size 16), with the export's rows; tests read it, or damage a copy."""
    from export.pipeline import export_checkpoint

    repo = tmp_path_factory.mktemp("exported") / "model_repo"
    rows = export_checkpoint(tiny_checkpoint, tiny.name, repo, data=None, parity_images=64, max_batch=16)
    return repo, rows


@pytest.fixture(scope="session")
def tiny_repo(exported) -> Path:
    return exported[0]


# `make test` installs every tool and dataset the tests use, so there the only honest skip is a GPU test on a
# machine without one: with ONLY_GPU_SKIPS=1 any other skip fails the run instead of hiding a check.
_UNEXPECTED_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    import os

    if report.skipped and os.environ.get("ONLY_GPU_SKIPS") == "1" and "gpu" not in report.keywords:
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS:
        print("\nskipped although make test installs what they need:\n  " + "\n  ".join(_UNEXPECTED_SKIPS))
        session.exitstatus = 1
