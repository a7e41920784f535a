"""IDX files (the MNIST format, gzipped or not): Fashion-MNIST for training, export's checks and the benchmarks."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file as a read-only numpy array; a truncated or padded file is refused."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(shape):
        raise ValueError(f"{path} declares shape {shape} but holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def find_idx(root: Path, stem: str) -> Path:
    """`<root>/<stem>.gz` or `<root>/<stem>`."""
    for name in (f"{stem}.gz", stem):
        if (Path(root) / name).exists():
            return Path(root) / name
    raise FileNotFoundError(
        f"{Path(root) / stem}[.gz] not found: install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass --data DIR"
    )


def fashion_mnist(root: Path = FASHION_MNIST_DIR, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and uint8 labels [N] of one split ("train" or "test")."""
    images_stem, labels_stem = IDX_STEMS[split]
    images, labels = read_idx(find_idx(root, images_stem)), read_idx(find_idx(root, labels_stem))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels
