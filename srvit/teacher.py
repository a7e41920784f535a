"""A small convolutional teacher for distillation into SR-ViT, as DeiT distils from a CNN.

A 0.27M-parameter ViT on 60k small images lacks the locality a convolution has built in; a CNN trained
for a few minutes carries it, and its predictions become a second target for the student
(`Objective`: hard distillation, cross-entropy toward the teacher's top class).

The network: four 3x3 convolutions with BatchNorm (32, 32, 64, 64 channels, max-pooling after the second
and the fourth), a 256-unit hidden layer, dropout 0.3. Adaptive pooling to 7x7 makes it accept any image
size; it is sized for small images (Fashion-MNIST: 0.87M parameters, 92.6% after 6 epochs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from srvit import data as D


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def small_cnn(in_chans: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        *_conv(in_chans, 32), *_conv(32, 32), nn.MaxPool2d(2), *_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 256), nn.ReLU(),
        nn.Dropout(0.3), nn.Linear(256, num_classes),
    )  # fmt: skip


@torch.no_grad()
def top1(net: nn.Module, ds: Dataset, device: torch.device) -> float:
    net.eval()
    correct = seen = 0
    for images, labels in DataLoader(ds, batch_size=500):
        correct += (net(images.to(device)).argmax(-1).cpu() == labels).sum().item()
        seen += len(labels)
    return correct / max(1, seen)


def train_teacher(
    net: nn.Module, train_ds: Dataset, epochs: int, device: torch.device, small_images: bool, seed: int = 0,
    batch_size: int = 128, lr: float = 2e-3,
) -> None:  # fmt: skip
    """AdamW with a one-cycle schedule, label smoothing 0.1, and (small images) the ±2 px shift and flip."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=g)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    net.train()
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if small_images:
                images = D.shift_flip(images, pad=2, generator=g)
            loss = F.cross_entropy(net(images), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()


def load_or_train_teacher(
    path: Path, in_chans: int, num_classes: int, train_ds: Dataset, test_ds: Dataset, epochs: int,
    device: torch.device, small_images: bool, seed: int,
) -> nn.Module:  # fmt: skip
    """The teacher of a run folder: loaded from `path` when a previous (or resumed) run trained it, else trained,
    evaluated and saved there, with its test top-1 and training time in `path` + ".json"."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        net = small_cnn(in_chans, num_classes).to(device)  # the student's own draws go on as if it did not exist
        if not path.exists():
            t0 = time.time()
            train_teacher(net, train_ds, epochs, device, small_images, seed)
            seconds = round(time.time() - t0, 1)
            report = {"epochs": epochs, "seconds": seconds, "test_top1": round(top1(net, test_ds, device), 4)}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
            path.with_suffix(".json").write_text(json.dumps(report) + "\n")
            print(json.dumps({"teacher": report}))
    net.load_state_dict(load_file(str(path)))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
