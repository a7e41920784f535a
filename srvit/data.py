"""Datasets and the preprocessing recorded in every checkpoint: Fashion-MNIST (IDX) and ImageFolder trees."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from modelrepo import idx, manifest
from modelrepo.idx import FASHION_MNIST_DIR

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class Preprocessing(manifest.Preprocessing):
    """The preprocessing contract (`modelrepo.manifest.Preprocessing`, which the server follows exactly) with the
    training side's presets and its eval transform in torch.

    Resize the shorter side to `resize_size` (bilinear), center-crop `input_size`,
    convert to `channels` ("L" or "RGB"), scale to [0, 1], then (x - mean) / std per channel.
    """

    @classmethod
    def imagenet(cls, input_size: int = 224) -> Preprocessing:
        return cls(input_size, "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), int(input_size / 0.875))

    @classmethod
    def fashion_mnist(cls) -> Preprocessing:
        return cls(28, "L", (0.2860,), (0.3530,), 28)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """The eval transform: PIL image -> float tensor [C, H, W]."""
        img = img.convert(self.channels)
        img = resize_shorter(img, self.resize_size)
        img = center_crop(img, self.input_size)
        return self.normalize(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[H, W] or [H, W, C] in [0, 1] -> normalized [C, H, W]."""
        x = x.unsqueeze(-1) if x.ndim == 2 else x
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x.permute(2, 0, 1) - mean) / std


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N]."""
    images, labels = idx.fashion_mnist(Path(root), split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_dataset(root: Path, split: str, limit: int | None = None) -> TensorDataset:
    """Normalized float images [N, 1, 28, 28] and labels; exactly the eval transform of `Preprocessing`."""
    images, labels = load_fashion_mnist(root, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pre = Preprocessing.fashion_mnist()
    x = (images.float() / 255.0 - pre.mean[0]) / pre.std[0]
    return TensorDataset(x.unsqueeze(1), labels)


def shift_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batch augmentation for small images: a random translation of up to `pad` pixels
    (zero-filled, as a padded random crop) and a random horizontal flip. x: [B, C, H, W]."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None]).view(B, 1, H, 1)  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(W)[None]).view(B, 1, 1, W)  # [B, 1, 1, W]
    out = padded[torch.arange(B).view(B, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    flip = torch.rand(B, generator=generator) < 0.5
    return torch.where(flip.view(B, 1, 1, 1), out.flip(-1), out)


class ImageFolder(Dataset):
    """root/<class>/<image>: the ImageNet layout. Classes are the sorted folder names."""

    def __init__(self, root: Path, pre: Preprocessing, train: bool):
        self.root, self.pre, self.train = Path(root), pre, train
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{self.root} has no class folders (expected root/<class>/<image>)")
        self.samples = [
            (p, i)
            for i, c in enumerate(self.classes)
            for p in sorted((self.root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert(self.pre.channels)
            return (self.train_transform(img) if self.train else self.pre(img)), label

    def train_transform(self, img: Image.Image) -> torch.Tensor:
        """The standard ViT training transform: random-resized crop (scale 0.08-1) and horizontal flip."""
        img = random_resized_crop(img, self.pre.input_size)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return self.pre.normalize(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))


def random_resized_crop(img: Image.Image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    w, h = img.size
    for _ in range(10):
        area = w * h * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = random.randint(0, w - cw), random.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return center_crop(resize_shorter(img, size), size)
