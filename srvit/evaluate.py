"""Measuring a model per depth: top-1, router usage, parameters, GFLOPs, images/s."""

from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode

from srvit.model import SRViT


def evaluate_depths(
    model: SRViT, ds: Dataset, device: torch.device | str = "cpu", depths=None, batch_size: int = 500
) -> dict[int, float]:
    """Top-1 accuracy at each depth (default: all) on `ds`, as fractions."""
    correct, seen = count_correct(model, ds, device, depths, batch_size)
    return {d: round(c / seen, 4) for d, c in correct.items()}


@torch.no_grad()
def count_correct(
    model: SRViT, ds: Dataset, device: torch.device | str = "cpu", depths=None, batch_size: int = 500
) -> tuple[dict[int, int], int]:
    """Correct answers at each depth (default: all) and images seen: counts that add up across shards."""
    was_training = model.training
    model.eval()
    depths = list(depths or range(1, model.cfg.max_depth + 1))
    correct, seen = dict.fromkeys(depths, 0), 0
    for images, labels in DataLoader(ds, batch_size=batch_size):
        images, labels = images.to(device), labels.to(device)
        for d in depths:
            correct[d] += (model(images, d).argmax(-1) == labels).sum().item()
        seen += len(labels)
    model.train(was_training)
    return correct, seen


@torch.no_grad()
def router_usage(model: SRViT, ds: Dataset, device: torch.device | str = "cpu", n: int = 1000) -> dict[str, list]:
    """Mean mixture weight of each step at max depth, over all tokens and (when the model has one) over the
    class token.

    A router that puts nearly all its weight on step 1 has made depth irrelevant.
    """
    was_training = model.training
    model.eval()
    images = next(iter(DataLoader(Subset(ds, range(min(n, len(ds)))), batch_size=n)))[0].to(device)
    weights = torch.stack(model.router_weights(images))  # [blocks, B, T, depth]
    model.train(was_training)
    usage = {"all_tokens": [round(v, 3) for v in weights.mean(dim=(0, 1, 2)).tolist()]}
    if model.cfg.pool == "cls":
        usage["class_token"] = [round(v, 3) for v in weights[:, :, 0].mean(dim=(0, 1)).tolist()]
    return usage


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: SRViT, depth: int) -> float:
    """Forward GFLOPs for one image (a multiply-add counts as 2 FLOPs)."""
    c = model.cfg
    x = torch.zeros(1, c.in_chans, c.img_size, c.img_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    # The math kernel: FlopCounterMode counts the fused CPU attention kernel as 0 FLOPs.
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x, depth)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def images_per_second(model: SRViT, depth: int, batch_size: int = 256, seconds: float = 1.0) -> float:
    c = model.cfg
    x = torch.randn(batch_size, c.in_chans, c.img_size, c.img_size, device=next(model.parameters()).device)
    model.eval()
    model(x, depth)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(x, depth)
        n += batch_size
    return n / (time.perf_counter() - t0)
