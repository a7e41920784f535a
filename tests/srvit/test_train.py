"""Training: the loss falls, training resumes where it stopped, and the same code runs under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import srvit.train
from srvit.checkpoint import CheckpointError, load_checkpoint, read_metadata
from srvit.data import FASHION_MNIST_DIR, fashion_mnist_dataset
from srvit.evaluate import evaluate_depths
from srvit.train import train
from srvit.train_config import TrainConfig

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="needs the Debian package dataset-fashion-mnist (make test installs it)"
)


def small(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), epochs=2, any_depth_epochs=1, limit=512, eval_limit=200, batch_size=64, lr=3e-3,
                teacher_epochs=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    path = train(small(tmp_path))
    h = history(tmp_path)
    assert [r["phase"] for r in h] == ["max-depth", "max-depth", "any-depth"]
    assert h[1]["train_loss"] < h[0]["train_loss"]
    model, meta = load_checkpoint(path)
    assert meta["labels"][0] == "T-shirt/top" and meta["preprocessing"]["channels"] == "L"
    assert len(meta["training"]["history"]) == 3
    assert set(h[-1]["test_top1"]) == {"1", "2", "3", "4"}


def test_training_resumes_from_the_last_epoch(tmp_path):
    train(small(tmp_path, epochs=1, any_depth_epochs=0))
    first = history(tmp_path)
    train(small(tmp_path, epochs=2, any_depth_epochs=0))
    h = history(tmp_path)
    assert [r["epoch"] for r in h] == [1, 2], "epoch 1 must not run twice"
    assert h[0] == first[0]


def test_phase_two_reruns_from_the_kept_end_of_phase_one(tmp_path):
    train(small(tmp_path / "a", epochs=1, any_depth_epochs=1))
    (tmp_path / "b").mkdir()
    shutil.copyfile(tmp_path / "a" / "phase1.safetensors", tmp_path / "b" / "last.safetensors")
    train(small(tmp_path / "b", epochs=1, any_depth_epochs=1, any_depth_lr=1e-4))
    a, b = load_training_history(tmp_path / "a"), load_training_history(tmp_path / "b")
    assert [r["phase"] for r in b] == ["max-depth", "any-depth"]
    assert b[0] == a[0], "phase 1 must not run again"
    assert b[1]["train_loss"] != a[1]["train_loss"], "phase 2 ran with its own learning rate"


def load_training_history(out: Path) -> list[dict]:
    return load_checkpoint(out / "model.safetensors")[1]["training"]["history"]


def torchrun_train(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "cli", "train", "--out", str(out), "--limit", "256", "--eval-limit", "100",
           "--batch-size", "64", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_ddp_on_cpu(tmp_path):
    done = torchrun_train(tmp_path, "--epochs", "1", "--any-depth-epochs", "1", "--teacher-epochs", "1")
    h = history(tmp_path)
    assert len(h) == 2, "only rank 0 writes the log"
    assert done.stdout.count('"teacher"') == 1, "rank 0 trains the teacher, rank 1 loads it"
    assert json.loads((tmp_path / "teacher.json").read_text())["epochs"] == 1
    model, _ = load_checkpoint(tmp_path / "model.safetensors")
    test = fashion_mnist_dataset(FASHION_MNIST_DIR, "test", limit=100)
    logged = {int(d): top1 for d, top1 in h[-1]["test_top1"].items()}
    assert logged == evaluate_depths(model, test), "each rank evaluates half the images; the log has them all"


def test_a_torchrun_run_resumed_goes_on_with_every_rank_s_own_draws(tmp_path):
    common = ["--epochs", "1", "--augment"]
    torchrun_train(tmp_path / "unbroken", *common, "--any-depth-epochs", "1")
    torchrun_train(tmp_path / "resumed", *common, "--any-depth-epochs", "0")  # stops after phase 1
    done = torchrun_train(tmp_path / "resumed", *common, "--any-depth-epochs", "1")  # resumes into phase 2
    assert "resumed from" in done.stdout
    assert_same_run(tmp_path / "unbroken", tmp_path / "resumed")


def test_an_imagefolder_tree_trains_with_its_own_classes(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label, shade in (("dark", 30), ("light", 220)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new("L", (40, 32), shade + i).save(folder / f"{i}.png")
    cfg = small(tmp_path / "run", data=str(tmp_path / "data"), epochs=1, any_depth_epochs=0, batch_size=8, workers=0)
    model, meta = load_checkpoint(train(cfg))
    assert meta["labels"] == ["dark", "light"]
    assert model.cfg.num_classes == 2
    assert meta["preprocessing"]["input_size"] == 28


@pytest.mark.parametrize("teacher_epochs", [0, 1], ids=["no-teacher", "cnn-teacher"])
def test_a_run_resumed_in_phase_two_draws_the_same_augmentation_and_depths_as_an_unbroken_one(
    tmp_path, monkeypatch, teacher_epochs
):
    cfg = dict(epochs=1, any_depth_epochs=2, augment=True, teacher_epochs=teacher_epochs)
    train(small(tmp_path / "unbroken", **cfg))
    run_epoch = srvit.train.run_epoch

    def stop_after_epoch_2(model, optimizer, ds, cfg, env, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second phase-2 epoch: epochs 1 and 2 are saved
        return run_epoch(model, optimizer, ds, cfg, env, epoch, *rest)

    monkeypatch.setattr(srvit.train, "run_epoch", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(small(tmp_path / "resumed", **cfg))
    monkeypatch.setattr(srvit.train, "run_epoch", run_epoch)
    teacher = tmp_path / "resumed" / "teacher.safetensors"
    trained_at = teacher.stat().st_mtime_ns if teacher_epochs else None
    train(small(tmp_path / "resumed", **cfg))  # the same command again
    if teacher_epochs:
        assert teacher.stat().st_mtime_ns == trained_at, "the resumed run reuses its teacher, it does not train another"
    assert_same_run(tmp_path / "unbroken", tmp_path / "resumed")


def test_resuming_a_run_of_another_model_config_says_so(tmp_path, monkeypatch):
    train(small(tmp_path, epochs=1, any_depth_epochs=0))
    real = srvit.train.model_config
    monkeypatch.setattr(srvit.train, "model_config", lambda name, **kw: real(name, **{"pool": "mean", **kw}))
    with pytest.raises(CheckpointError, match="pool 'cls' there, 'mean' here"):
        train(small(tmp_path, epochs=2, any_depth_epochs=0))


def test_a_run_saved_before_a_model_config_field_existed_still_resumes(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    real = srvit.train.model_config  # the stem of that time: the field's default
    monkeypatch.setattr(srvit.train, "model_config", lambda name, **kw: real(name, **{"stem_convs": 3, **kw}))
    train(small(tmp_path, epochs=1, any_depth_epochs=0))
    last = tmp_path / "last.safetensors"
    meta = read_metadata(last)
    del meta["model_config"]["stem_convs"]  # as written before the field was added
    save_file(load_file(str(last)), str(last), {"srvit": json.dumps(meta)})
    train(small(tmp_path, epochs=2, any_depth_epochs=0))
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2]


def test_the_teacher_s_top_class_is_the_target_it_is_given_weight_for():
    import torch

    from srvit.model import SRViT
    from srvit.registry import model_config
    from srvit.train import Objective

    torch.manual_seed(0)
    model = SRViT(model_config("srvit_fashion")).eval()
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    teacher_labels = (labels + 1) % 10  # a teacher that disagrees with every label
    only_teacher = Objective(model, TrainConfig(teacher_weight=1.0, router_balance=0), any_depth=False)
    loss, _ = only_teacher(images, labels, teacher_labels)
    assert loss == only_teacher(images, teacher_labels)[0], "weight 1: the true labels no longer count"
    half = Objective(model, TrainConfig(teacher_weight=0.5, router_balance=0), any_depth=False)
    mixed = half(images, labels, teacher_labels)[0]
    assert min(loss, half(images, labels)[0]) < mixed < max(loss, half(images, labels)[0])


def test_the_teacher_network_takes_the_images_of_every_small_variant():
    import torch

    from srvit.teacher import small_cnn

    assert small_cnn(1, 10)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert small_cnn(3, 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sum(p.numel() for p in small_cnn(1, 10).parameters()) == 870_826  # benchmarks/cnn_teacher_pilot.py's


def assert_same_run(unbroken: Path, resumed: Path) -> None:
    """The same log, epoch by epoch (but for the time taken), and bit-identical final weights."""
    assert [_no_time(r) for r in history(resumed)] == [_no_time(r) for r in history(unbroken)]
    a, _ = load_checkpoint(unbroken / "model.safetensors")
    b, _ = load_checkpoint(resumed / "model.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert (x == y).all(), name


def _no_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}
