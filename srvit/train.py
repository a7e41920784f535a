"""Any-depth training: max depth first, then every depth with the router frozen (runs under torchrun too).

Phase 1 ("max-depth", `epochs`): cross-entropy at max depth only, so the router learns to
spread its weight over all recursion steps. Sampling a random depth per step instead
teaches the model to make depth irrelevant: the router collapses onto step 1.

Phase 2 ("any-depth", `any_depth_epochs`): the sandwich rule with the router frozen:
cross-entropy at max depth plus distillation of depth 1 and one random middle depth
toward the max-depth prediction, at a lower learning rate. Shallow depths recover and
the deepest keeps its accuracy, so accuracy rises with depth.

Both phases can learn from a small CNN teacher as well (`teacher_epochs`, on by default): it is
trained first, and its top class is a second target next to the true label (srvit/teacher.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from srvit import data as D
from srvit.checkpoint import load_training_state, rng_state, save_checkpoint, save_training_state
from srvit.evaluate import count_correct, router_usage
from srvit.model import SRViT
from srvit.registry import model_config
from srvit.teacher import load_or_train_teacher
from srvit.train_config import TrainConfig

# The progress bar reads the running totals back (a device sync) only every this many steps and at the
# epoch's end: each read waits until the device has run every step queued so far, so the host stops
# queueing work ahead of it. The totals themselves add up every step on the device, so the epoch's logged
# figures are the same; only the bar's figures lag, by fewer than 20 steps.
PROGRESS_EVERY_STEPS = 20


class Objective(nn.Module):
    """The loss of one step, as one module so DistributedDataParallel sees one forward per backward."""

    def __init__(self, model: SRViT, cfg: TrainConfig, any_depth: bool):
        super().__init__()
        self.model, self.label_smoothing, self.any_depth = model, cfg.label_smoothing, any_depth
        self.router_balance, self.distill_weight = cfg.router_balance, cfg.distill_weight
        self.teacher_weight = cfg.teacher_weight

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, teacher_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        max_depth = self.model.cfg.max_depth
        logits, router_load = self.model.forward_with_router_load(images, max_depth)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if teacher_labels is not None:  # DeiT's hard distillation: the teacher's top class as a second label
            to_teacher = F.cross_entropy(logits, teacher_labels, label_smoothing=self.label_smoothing)
            loss = (1 - self.teacher_weight) * loss + self.teacher_weight * to_teacher
        if not self.any_depth and self.router_balance:
            loss = loss + self.router_balance * self.model.router_balance_loss(router_load)
        if self.any_depth and max_depth > 1:
            deepest = logits.detach().softmax(-1)
            shallow = {1, random.randint(1, max_depth - 1)}  # depth 1 and a random middle depth
            for d in sorted(shallow):
                student = self.model(images, d).log_softmax(-1)
                loss = loss + self.distill_weight * F.kl_div(student, deepest, reduction="batchmean")
        return loss, logits


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_fashion_mnist(root: Path) -> bool:
    return any(root.glob("train-images-idx3-ubyte*"))


def build_data(cfg: TrainConfig, in_chans: int, img_size: int) -> tuple[Dataset, Dataset, dict]:
    """Train and held-out datasets, and the metadata (labels, preprocessing) the checkpoint records."""
    root = Path(cfg.data)
    if is_fashion_mnist(root):
        train = D.fashion_mnist_dataset(root, "train", cfg.limit)
        test = D.fashion_mnist_dataset(root, "test", cfg.eval_limit)
        pre, labels, name = D.Preprocessing.fashion_mnist(), D.FASHION_MNIST_LABELS, "fashion-mnist"
    else:
        pre = (
            D.Preprocessing.imagenet(img_size)
            if in_chans == 3
            else D.Preprocessing(img_size, "L", (0.5,), (0.5,), img_size)
        )
        train = D.ImageFolder(root / "train", pre, train=True)
        test = D.ImageFolder(root / "val", pre, train=False)
        labels, name = train.classes, f"imagefolder:{root}"
        if cfg.limit:
            train = Subset(train, range(min(cfg.limit, len(train))))
        if cfg.eval_limit:  # every epoch evaluates all of val/ (shared among the ranks): limit it on a big one
            test = Subset(test, range(min(cfg.eval_limit, len(test))))
    return train, test, {"labels": labels, "preprocessing": pre.to_dict(), "dataset": name}


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if self.world > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast_buffers(self, model: nn.Module) -> None:
        """DistributedDataParallel copies rank 0's buffers (BatchNorm statistics) at the start of each forward
        only, so after the last step every rank's differ: evaluate and save rank 0's everywhere."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:  # wait for rank 0's saving: no rank tears gloo down while another may still use it
            dist.barrier()
            dist.destroy_process_group()


def make_loader(ds: Dataset, cfg: TrainConfig, env: Distributed, epoch: int) -> DataLoader:
    sampler = DistributedSampler(ds, env.world, env.rank, shuffle=True, seed=cfg.seed) if env.world > 1 else None
    if sampler is not None:
        sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    workers = 0 if isinstance(ds, torch.utils.data.TensorDataset) else cfg.workers
    return DataLoader(
        ds, batch_size=cfg.batch_size // env.world, sampler=sampler, shuffle=sampler is None,
        generator=g, num_workers=workers, drop_last=True, pin_memory=env.device.type == "cuda",
    )  # fmt: skip


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%} {task.fields[ips]:.0f} img/s"),
        TimeRemainingColumn(), disable=not enabled,
    )  # fmt: skip


def train(cfg: TrainConfig) -> Path:
    """Train, evaluate every depth after each epoch, and write out/model.safetensors."""
    env = Distributed()
    seed_everything(cfg.seed + env.rank)
    mcfg = model_config(cfg.model)
    train_ds, test_ds, meta = build_data(cfg, mcfg.in_chans, mcfg.img_size)
    if len(meta["labels"]) != mcfg.num_classes:
        mcfg = model_config(cfg.model, num_classes=len(meta["labels"]))
    model = SRViT(mcfg).to(env.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out)
    state = {"epoch": 0, "history": [], "train_seconds": 0.0}
    if cfg.resume and (out / "last.safetensors").exists():
        state = load_training_state(out / "last.safetensors", model, optimizer, env.rank, env.world)
        if env.main:
            print(f"resumed from {out / 'last.safetensors'} at epoch {state['epoch']}")
    small_images = isinstance(train_ds, torch.utils.data.TensorDataset)
    teacher = None
    if cfg.teacher_epochs:
        args = (mcfg.in_chans, mcfg.num_classes, train_ds, test_ds, cfg.teacher_epochs, env.device, small_images)
        load_teacher = partial(load_or_train_teacher, out / "teacher.safetensors", *args, cfg.seed)
        if env.main:  # rank 0 trains it (or finds it in the run folder), the others then load its file
            teacher = load_teacher()
        env.barrier()
        if not env.main:
            teacher = load_teacher()
    total_epochs = cfg.epochs + cfg.any_depth_epochs
    objective, objective_phase = None, None
    for epoch in range(state["epoch"], total_epochs):
        if phase(cfg, epoch) != objective_phase:  # a phase starts, or a resumed run goes on mid-phase
            objective = None  # release the last phase's wrapper (and its gradient hooks) first
            objective_phase = phase(cfg, epoch)
            objective = phase_objective(model, cfg, env, any_depth=objective_phase == "any-depth")
        t0 = time.time()
        stats = run_epoch(model, optimizer, train_ds, cfg, env, epoch, small_images, teacher, objective)
        state["train_seconds"] += time.time() - t0
        record = {"epoch": epoch + 1, "phase": phase(cfg, epoch), **stats, "seconds": round(time.time() - t0, 1)}
        env.broadcast_buffers(model)
        record["test_top1"] = evaluate_sharded(model, test_ds, env)
        if env.main:
            record["router_usage"] = router_usage(model, test_ds, env.device)
        rng_states = env.gather(rng_state())  # after the epoch's last draw: a resume goes on with the next one
        if env.main:
            print(json.dumps(record))
            state["history"].append(record)
            state["epoch"] = epoch + 1
            progress = {**state, "train_config": asdict(cfg), "model_config": model.cfg.to_dict()}
            save_training_state(out / "last.safetensors", model, optimizer, progress, rng_states)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if epoch + 1 == cfg.epochs:  # keep phase 1's end: phase 2 can be rerun from it (copy to last.safetensors)
                shutil.copyfile(out / "last.safetensors", out / "phase1.safetensors")
    if env.main:
        final = {"labels": meta["labels"], "preprocessing": meta["preprocessing"], "model": cfg.model}
        final["training"] = {**asdict(cfg), "dataset": meta["dataset"], "train_seconds": round(state["train_seconds"])}
        final["training"]["history"] = state["history"]
        save_checkpoint(out / "model.safetensors", model, final)
    env.close()
    return out / "model.safetensors"


def evaluate_sharded(model: SRViT, ds: Dataset, env: Distributed) -> dict[int, float]:
    """Top-1 per depth on `ds`: each process counts every world-th image, the counts are summed."""
    correct, seen = count_correct(model, Subset(ds, range(env.rank, len(ds), env.world)), env.device)
    totals = env.all_sum(torch.tensor([*correct.values(), seen], dtype=torch.float64, device=env.device))
    return {d: round(totals[i].item() / totals[-1].item(), 4) for i, d in enumerate(correct)}


def step_totals(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """This step's loss sum, correct answers and images, on the device: nothing here waits for it."""
    seen = torch.full((), len(labels), device=labels.device)  # filled there: a copy from the host would wait
    return torch.stack([loss.detach() * len(labels), (logits.argmax(-1) == labels).sum(), seen])


def progress_fields(totals: torch.Tensor, world: int, seconds: float) -> dict[str, float]:
    """The progress bar's running figures; reading them waits for the device."""
    loss_sum, correct, seen = totals.tolist()
    return {"loss": loss_sum / seen, "acc": correct / seen, "ips": seen * world / seconds}


def phase(cfg: TrainConfig, epoch: int) -> str:
    return "max-depth" if epoch < cfg.epochs else "any-depth"


def phase_objective(model: SRViT, cfg: TrainConfig, env: Distributed, any_depth: bool) -> nn.Module:
    """One phase's loss, wrapped in DistributedDataParallel under torchrun: built once per phase, since the
    wrapper broadcasts rank 0's weights and allocates its gradient buckets when it is built.

    The router is frozen (or not) first: the wrapper reduces only the parameters that need a gradient when
    it is built, so a phase that changes which ones do needs a wrapper of its own."""
    for p in model.router_parameters():
        p.requires_grad_(not any_depth)
    objective = Objective(model, cfg, any_depth)
    if env.world == 1:
        return objective
    return DistributedDataParallel(objective, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def run_epoch(
    model, optimizer, ds, cfg: TrainConfig, env: Distributed, epoch: int, small_images: bool,
    teacher: nn.Module | None, objective: nn.Module,
) -> dict:  # fmt: skip
    """One epoch of `objective` (this phase's, from `phase_objective`); the epoch's mean loss and top-1."""
    any_depth = epoch >= cfg.epochs
    model.train()
    loader = make_loader(ds, cfg, env, epoch)
    steps_per_epoch = len(loader)
    first = 0 if not any_depth else cfg.epochs
    epochs = cfg.epochs if not any_depth else cfg.any_depth_epochs
    peak = cfg.any_depth_lr if any_depth else cfg.lr
    warmup = int(cfg.warmup_epochs * steps_per_epoch) if not any_depth else 0
    totals = torch.zeros(3, device=env.device)  # loss sum, correct, seen
    t0 = time.time()
    with progress_bar(env.main) as bar:
        task = bar.add_task(f"epoch {epoch + 1} {phase(cfg, epoch)}", total=steps_per_epoch, loss=0.0, acc=0.0, ips=0.0)
        for i, (images, labels) in enumerate(loader):
            step = (epoch - first) * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, epochs * steps_per_epoch, warmup, peak)
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            if small_images and cfg.augment:
                images = D.shift_flip(images, pad=cfg.shift_pad)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
                with torch.no_grad():
                    teacher_labels = teacher(images).argmax(-1) if teacher is not None else None
                loss, logits = objective(images, labels, teacher_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            totals += step_totals(loss, logits, labels)
            bar.update(task, advance=1)
            if env.main and ((i + 1) % PROGRESS_EVERY_STEPS == 0 or i + 1 == steps_per_epoch):  # others show none
                bar.update(task, **progress_fields(totals, env.world, time.time() - t0))
    totals = env.all_sum(totals)
    return {
        "train_loss": round(totals[0].item() / totals[2].item(), 4),
        "train_top1": round(totals[1].item() / totals[2].item(), 4),
    }
