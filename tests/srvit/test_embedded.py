"""The embedded default model: `srvit eval` reproduces the committed figures."""

import json
from pathlib import Path

import pytest

from cli.main import main
from srvit.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "srvit" / "checkpoints" / "srvit_fashion.safetensors"
SUBSET = ROOT / "docs" / "results" / "srvit_fashion_eval_first2000.json"

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="needs the Debian package dataset-fashion-mnist (make test installs it)"
)


def test_eval_reproduces_the_committed_per_depth_accuracy_on_a_subset(capsys):
    assert main(["eval", str(CHECKPOINT), "--limit", "2000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    committed = json.loads(SUBSET.read_text())
    assert report["images"] == committed["images"] == 2000
    for ours, theirs in zip(report["depths"], committed["depths"], strict=True):
        assert ours["depth"] == theirs["depth"]
        assert ours["top1"] == pytest.approx(theirs["top1"], abs=0.001)  # 2 images: CPU kernels may differ
        assert ours["gflops"] == pytest.approx(theirs["gflops"], rel=1e-6)
