"""`srvit export` on the committed checkpoint reproduces the committed model_repo/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from export.pipeline import export_checkpoint
from srvit.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "srvit" / "checkpoints" / "srvit_fashion.safetensors"
REPO = ROOT / "model_repo"

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="needs the Debian package dataset-fashion-mnist (make test installs it)"
)


def committed(depth: int) -> dict:
    return json.loads((REPO / f"srvit_fashion_d{depth}" / "manifest.json").read_text())


def test_the_committed_repo_holds_every_depth_of_the_committed_checkpoint():
    sha = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    manifests = [committed(d) for d in (1, 2, 3, 4)]
    assert {m["checkpoint"]["sha256"] for m in manifests} == {sha}
    for m in manifests:
        assert m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["top1_agreement"] == 1.0
        assert m["parity"]["images"] >= 256 and m["accuracy"]["images"] == 10_000


def test_reexporting_depths_gives_the_same_graphs_figures_and_calibration(tmp_path):
    export_checkpoint(CHECKPOINT, "srvit_fashion", tmp_path, depths=[1, 3])
    ours = json.loads((tmp_path / "srvit_fashion_d3" / "manifest.json").read_text())
    theirs = committed(3)
    assert ours["flops"] == theirs["flops"]
    # Temperatures are fitted per depth on the same half of the split, so they repeat; the policy is fitted
    # over the depths exported, here 1 then 3.
    assert ours["calibration"]["temperature"] == pytest.approx(theirs["calibration"]["temperature"], rel=0.02)
    stages = ours["adaptive"]["stages"]
    assert [s["depth"] for s in stages] == [1, 3] and 0 < stages[0]["threshold"] < 1
    expected = ours["adaptive"]["expected"]
    assert expected["fit"]["top1"] >= expected["deepest_top1"]["fit"] - 0.0005 - 1e-9
    assert expected["fit"]["compute"] < 1 and expected["check"]["compute"] < 1
    assert ours["files"]["1/model.onnx"] == theirs["files"]["1/model.onnx"], "graphs differ byte for byte"
    # Same figures, up to float rounding that another CPU's kernels may change (documented in docs/model_repo.md).
    assert ours["parity"]["top1_agreement"] == theirs["parity"]["top1_agreement"] == 1.0
    assert ours["parity"]["max_abs_diff"] == pytest.approx(theirs["parity"]["max_abs_diff"], abs=1e-6)
    assert ours["accuracy"]["top1"] == pytest.approx(theirs["accuracy"]["top1"], abs=2e-4)
