"""The images parity and accuracy are measured on: the checkpoint's held-out split, or seeded random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from export.errors import ExportError
from srvit.data import ImageFolder, Preprocessing, fashion_mnist_dataset
from srvit.model import SRViTConfig

RANDOM_SEED = 0


@dataclass(frozen=True)
class Samples:
    parity: torch.Tensor  # [N, C, H, W] float32, already preprocessed
    source: str  # recorded in the manifest: where `parity` came from
    heldout: Dataset | None  # the whole held-out split, for accuracy; None when there is none
    split: str | None


def find_samples(meta: dict, cfg: SRViTConfig, data: Path | None, n: int) -> Samples:
    """Real images when the checkpoint's dataset is at hand; random ones only when it is not."""
    heldout, split = heldout_dataset(meta, data)
    if heldout is None:
        source = f"random normal inputs (seed {RANDOM_SEED}): no held-out dataset was available"
        return Samples(random_images(cfg, n), source, None, None)
    images, source = spread(heldout, n, split)
    expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if tuple(images.shape[1:]) != expected:
        raise ExportError(f"{split} images are {tuple(images.shape[1:])} but the model takes {expected}; pass --data")
    return Samples(images, source, heldout, split)


def heldout_dataset(meta: dict, data: Path | None) -> tuple[Dataset | None, str | None]:
    """The split the checkpoint was evaluated on during training, if it can be found here."""
    dataset = meta.get("training", {}).get("dataset", "")
    if dataset == "fashion-mnist" and data is not None and any(Path(data).glob("t10k-images-idx3-ubyte*")):
        return fashion_mnist_dataset(Path(data), "test"), "fashion-mnist:test"
    if dataset.startswith("imagefolder:"):
        root = Path(data) if data is not None and (Path(data) / "val").is_dir() else Path(dataset.split(":", 1)[1])
        if (root / "val").is_dir():
            pre = Preprocessing.from_dict(meta["preprocessing"])
            return ImageFolder(root / "val", pre, train=False), f"imagefolder:{root}/val"
    return None, None


def spread(ds: Dataset, n: int, split: str) -> tuple[torch.Tensor, str]:
    """n images evenly spaced over the split: ImageFolder is sorted by class, so the first n would be one class."""
    step = max(1, len(ds) // n)
    indices = list(range(0, len(ds), step))[:n]
    images = torch.stack([ds[i][0] for i in indices]).float()
    return images, f"{split}, {len(indices)} images, every {step}th"


def random_images(cfg: SRViTConfig, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(RANDOM_SEED)
    return torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
