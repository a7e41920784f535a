"""Training options: a torch-free dataclass, so the CLI can list them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    model: str = "srvit_fashion"
    data: str = (
        "/usr/share/datasets/fashion-mnist"  # Fashion-MNIST IDX folder, or an ImageFolder root with train/ and val/
    )
    out: str = "runs/srvit_fashion"
    epochs: int = 18  # phase 1: max depth only
    any_depth_epochs: int = 1  # phase 2: sandwich rule over all depths, router frozen
    batch_size: int = 128  # global, split across processes
    lr: float = 2e-3
    any_depth_lr: float = 2e-4
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = False  # small images: random translation of up to shift_pad pixels, and a horizontal flip
    shift_pad: int = 1
    distill_weight: float = 0.1  # phase 2: weight of each shallow depth's distillation toward max depth
    router_balance: float = 0.1  # weight of the router load-balancing term (phase 1), see SRViT.router_balance_loss
    teacher_epochs: int = 6  # >0: first train a small CNN teacher this long, then distil it (srvit/teacher.py)
    teacher_weight: float = 0.5  # weight of the cross-entropy toward the teacher's top class (1 - it: true labels)
    seed: int = 0
    limit: int | None = None  # use only the first N training images (smoke tests)
    eval_limit: int | None = None
    workers: int = 4  # data-loading processes for ImageFolder
    resume: bool = True  # continue from out/last.safetensors when it exists
