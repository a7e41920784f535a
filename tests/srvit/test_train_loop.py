"""The training loop's bookkeeping on synthetic data: one DDP wrapper per phase, each step's balance term from
its own forward, and the epoch's figures summed over every step while the progress bar reads them every N."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import srvit.train
from srvit.model import SRViT, SRViTConfig
from srvit.train import Distributed, Objective, phase_objective, run_epoch, train
from srvit.train_config import TrainConfig

TINY = SRViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, num_blocks=2, num_heads=2,
                   mlp_ratio=2.0, max_depth=3, router_hidden=8)  # fmt: skip


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, TINY.img_size, TINY.img_size), torch.randint(0, TINY.num_classes, (n,))


@pytest.mark.parametrize("max_depth", [1, 3])
def test_the_balance_term_is_that_of_the_objective_s_own_forward(max_depth):
    torch.manual_seed(0)
    model = SRViT(SRViTConfig(**{**TINY.__dict__, "max_depth": max_depth})).eval()
    for p in model.router_parameters():  # a router that prefers some steps: a fresh one is near uniform
        nn.init.normal_(p, std=1.0)
    images, labels = batch()
    plain = Objective(model, TrainConfig(router_balance=0), any_depth=False)(images, labels)[0]
    balanced = Objective(model, TrainConfig(router_balance=0.5), any_depth=False)(images, labels)[0]
    with torch.no_grad():
        _, load = model.forward_with_router_load(images, max_depth)
    torch.testing.assert_close(balanced - plain, 0.5 * model.router_balance_loss(load))
    if max_depth == 1:
        assert balanced == plain, "one recursion step: nothing to balance"
    else:
        assert balanced > plain


class RecordingBar:
    """Stands in for progress_bar(): which step each shown figure was read at, and the figure."""

    def __init__(self):
        self.step, self.shown = 0, []

    def __call__(self, enabled: bool) -> "RecordingBar":
        return self

    def __enter__(self) -> "RecordingBar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, *args, **fields) -> int:
        return 0

    def update(self, task: int, advance: int = 0, **fields) -> None:
        self.step += advance
        if fields:
            self.shown.append((self.step, fields["loss"], fields["acc"]))


class RecordingObjective(nn.Module):
    """The objective, keeping each step's loss, correct answers and batch size."""

    def __init__(self, objective: nn.Module):
        super().__init__()
        self.objective, self.steps = objective, []

    def forward(self, images, labels, teacher_labels=None):
        loss, logits = self.objective(images, labels, teacher_labels)
        self.steps.append((loss.detach().clone(), (logits.argmax(-1) == labels).sum(), len(labels)))
        return loss, logits


def test_the_epoch_s_figures_add_up_every_step_while_the_bar_reads_them_every_n_steps(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(srvit.train, "PROGRESS_EVERY_STEPS", 3)
    bar = RecordingBar()
    monkeypatch.setattr(srvit.train, "progress_bar", bar)
    torch.manual_seed(0)
    model = SRViT(TINY)
    cfg = TrainConfig(epochs=1, any_depth_epochs=0, batch_size=8, teacher_epochs=0)
    env = Distributed()
    objective = RecordingObjective(phase_objective(model, cfg, env, any_depth=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    stats = run_epoch(model, optimizer, TensorDataset(*batch(64)), cfg, env, 0, True, None, objective)
    assert len(objective.steps) == 8
    assert [step for step, _, _ in bar.shown] == [3, 6, 8], "every 3rd step and the last"
    reference = torch.zeros(3)  # the figures as summed before: float32, step by step
    for loss, correct, n in objective.steps:
        reference += torch.stack([loss * n, correct.float(), torch.tensor(float(n))])
    loss_sum, correct, seen = reference.tolist()
    assert stats == {"train_loss": round(loss_sum / seen, 4), "train_top1": round(correct / seen, 4)}
    assert bar.shown[-1][1:] == (loss_sum / seen, correct / seen), "the bar ends on the epoch's figures"
    first_three = sum(float(loss) * n for loss, _, n in objective.steps[:3]) / 24
    assert bar.shown[0][1] == pytest.approx(first_three, rel=1e-6)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path) -> Path:
    """Random 28x28 images in Fashion-MNIST's IDX layout: what train() reads, without the Debian package."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", 128), ("t10k", 32)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


COUNT_WRAPPERS = """
import json, os, sys
import srvit.train
from srvit.train_config import TrainConfig

built = []

class CountingDDP(srvit.train.DistributedDataParallel):
    def __init__(self, objective, *args, **kwargs):
        built.append("any-depth" if objective.any_depth else "max-depth")
        super().__init__(objective, *args, **kwargs)

srvit.train.DistributedDataParallel = CountingDDP
cfg = TrainConfig(**json.loads(sys.argv[1]))
srvit.train.train(cfg)
with open(os.path.join(cfg.out, f"wrappers-{os.environ['RANK']}.json"), "w") as f:
    json.dump(built, f)
"""


def test_under_torchrun_a_resumed_run_builds_one_ddp_wrapper_per_phase(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = dict(data=str(fake_fashion_mnist(tmp_path / "data")), out=str(tmp_path / "run"), batch_size=64,
                  teacher_epochs=0)  # fmt: skip
    train(TrainConfig(**common, epochs=1, any_depth_epochs=0))  # stopped after epoch 1 of phase 1
    script = tmp_path / "count_wrappers.py"
    script.write_text(COUNT_WRAPPERS)
    cfg = json.dumps({**common, "epochs": 3, "any_depth_epochs": 1})  # resumes mid-phase 1: epochs 2, 3, then 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), cfg]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        built = json.loads((tmp_path / "run" / f"wrappers-{rank}.json").read_text())
        assert built == ["max-depth", "any-depth"], f"rank {rank}: one wrapper per phase, not per epoch"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in log] == [(1, "max-depth"), (2, "max-depth"), (3, "max-depth"),
                                                      (4, "any-depth")]  # fmt: skip
