"""`srvit bench model-level` on the shipped srvit_fashion, briefly: the results and tables a user reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the model-level benchmark runs PyTorch next to ONNX Runtime")

from bench import model_level  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "srvit/checkpoints/srvit_fashion.safetensors"
REPO = ROOT / "model_repo"


@pytest.fixture(scope="module")
def results():
    return model_level.measure_model(CHECKPOINT, REPO, "srvit_fashion", (1,), seconds=0.05, repetitions=2,
                                     compile=False)  # fmt: skip


def test_every_depth_is_timed_in_both_runtimes_on_the_same_model(results):
    assert [(c["depth"], c["batch"]) for c in results["cells"]] == [(d, 1) for d in (1, 2, 3, 4)]
    for cell in results["cells"]:
        for runtime in ("onnxruntime", "eager"):
            rate = cell[runtime]
            assert 0 < rate["min"] <= rate["median"] <= rate["max"], (cell["depth"], runtime)
        assert cell["max_abs_diff"]["onnxruntime"] < 1e-3
        assert "compile" not in cell
    assert results["compile"] == {"enabled": False, "error": None}


def test_peak_gflops_and_fractions_follow_from_the_runs(results):
    peak = results["peak"]
    assert peak["gflops"] == max(peak[r]["max"] for r in ("onnxruntime", "numpy", "torch")) > 0
    cell = results["cells"][-1]
    ort = next(a for a in results["achieved"] if (a["depth"], a["runtime"]) == (4, "onnxruntime"))
    assert ort["gflops"] == pytest.approx(cell["onnxruntime"]["median"] * cell["flops_per_image"] / 1e9)
    assert ort["fraction_of_peak"] == pytest.approx(ort["gflops"] / peak["gflops"])


def test_targets_say_what_was_not_measured(results):
    by_batch = {t["batch"]: t for t in results["targets"]}
    assert set(by_batch[1]["ratios"]) == {"1", "2", "3", "4"}
    assert by_batch[1]["met"] is (min(by_batch[1]["ratios"].values()) >= 1.3)
    assert by_batch[32] == {"batch": 32, "target": 1.1, "ratios": {}, "met": None}


def test_markdown_has_a_row_per_depth_and_the_json_is_standard(results):
    text = model_level.markdown(results)
    for depth in (1, 2, 3, 4):
        assert f"\n| {depth} | 1 | " in text
    assert "**Peak**" in text and "batch 32, >= 1.1x: **not measured**" in text
    json.loads(json.dumps(results, allow_nan=False))


def test_a_checkpoint_the_repo_was_not_exported_from_is_refused():
    import torch

    from modelrepo.manifest import Manifest
    from srvit.model import SRViT
    from srvit.registry import model_config

    torch.manual_seed(1)
    other = SRViT(model_config("srvit_fashion")).eval()
    folder = REPO / "srvit_fashion_d2"
    manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
    session = model_level.ort_session(folder / manifest.model_file)
    with pytest.raises(SystemExit, match="not the same model"):
        model_level.measure_cell(other, manifest, session, 1, 0.01, 1, {"enabled": False, "error": None})


def test_batches_flag_takes_a_comma_list():
    parser = argparse.ArgumentParser()
    model_level.add_model_level_parser(parser.add_subparsers(dest="mode"))
    args = parser.parse_args(["model-level", "--batches", "1,8", "--no-compile"])
    assert (args.batches, args.compile, args.seconds) == ([1, 8], False, 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["model-level", "--batches", "0,8"])
