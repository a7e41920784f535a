"""End to end: a tiny checkpoint exported into a repository laid out as docs/model_repo.md says."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.pipeline as pipeline
from export.errors import ExportError
from export.pipeline import add_arguments, export_checkpoint, main
from modelrepo.manifest import FORMAT
from srvit.checkpoint import load_checkpoint
from srvit.model import SRViT

MANIFEST_KEYS = [
    "format", "name", "triton_name", "version", "depth", "max_depth", "platform", "model_file", "max_batch_size",
    "input", "output", "labels", "preprocessing", "config", "checkpoint", "opset", "versions", "parity",
    "accuracy", "flops", "calibration", "adaptive", "files", "tensorrt",
]  # fmt: skip
DEPTHS = (1, 2, 3)


def read_manifest(repo: Path, name: str, depth: int) -> dict:
    return json.loads((repo / f"{name}_d{depth}" / "manifest.json").read_text())


def onnx_path(repo: Path, name: str, depth: int) -> Path:
    return repo / f"{name}_d{depth}" / "1" / "model.onnx"


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_matches_the_contract(exported, tiny):
    repo, _ = exported
    files = {f"{tiny.name}_d{d}/{f}" for d in DEPTHS for f in ("config.pbtxt", "labels.txt", "manifest.json")}
    files |= {f"{tiny.name}_d{d}/1/model.onnx" for d in DEPTHS}
    assert {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()} == files
    assert (repo / f"{tiny.name}_d2" / "labels.txt").read_text().splitlines() == tiny.labels


def test_manifest_has_every_documented_key_and_round_trips(exported, tiny, tiny_checkpoint):
    repo, _ = exported
    sha = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    for depth in DEPTHS:
        m = read_manifest(repo, tiny.name, depth)
        assert list(m) == MANIFEST_KEYS
        assert json.loads(json.dumps(m)) == m
        assert (m["format"], m["name"], m["triton_name"]) == (FORMAT, tiny.name, f"{tiny.name}_d{depth}")
        assert (m["depth"], m["max_depth"], m["version"], m["max_batch_size"]) == (depth, 3, 1, 16)
        assert (m["platform"], m["model_file"], m["opset"]) == ("onnxruntime_onnx", "1/model.onnx", 18)
        assert m["input"] == {"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
        assert m["output"] == {"name": "logits", "datatype": "FP32", "shape": [-1, 3]}
        assert (m["labels"], m["preprocessing"], m["config"]) == (tiny.labels, tiny.preprocessing, tiny.cfg.to_dict())
        assert m["checkpoint"] == {"file": "tiny.safetensors", "sha256": sha}
        assert set(m["versions"]) == {"srvit", "torch", "onnx", "onnxruntime"}
        assert m["tensorrt"] is None
        assert m["calibration"] is None and m["adaptive"] is None  # no held-out data: nothing to calibrate on
    flops = [read_manifest(repo, tiny.name, depth)["flops"] for depth in DEPTHS]
    assert flops[0] > 0 and flops == sorted(set(flops))  # each recursion step costs more


def test_manifest_checksums_match_the_files(exported, tiny):
    repo, _ = exported
    for depth in DEPTHS:
        folder = repo / f"{tiny.name}_d{depth}"
        files = read_manifest(repo, tiny.name, depth)["files"]
        assert set(files) == {"1/model.onnx", "config.pbtxt", "labels.txt"}
        for rel, entry in files.items():
            data = (folder / rel).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}


def test_parity_is_within_tolerance_and_says_the_inputs_were_random(exported, tiny):
    repo, rows = exported
    assert [row["depth"] for row in rows] == list(DEPTHS)
    for depth, row in zip(DEPTHS, rows, strict=True):
        m = read_manifest(repo, tiny.name, depth)
        parity = m["parity"]
        assert parity["reference"] == "pytorch" and parity["images"] == 64 and "random" in parity["source"]
        assert parity["max_abs_diff"] <= parity["atol"] == 1e-4 and parity["top1_agreement"] == 1.0
        assert m["accuracy"] is None  # no held-out data: recorded as such, not invented
        assert row["max_abs_diff"] == parity["max_abs_diff"] and row["accuracy"] is None
        assert row["file"] == str(onnx_path(repo, tiny.name, depth))
        assert row["size_bytes"] == onnx_path(repo, tiny.name, depth).stat().st_size


def test_graphs_are_valid_flat_and_self_contained(exported, tiny):
    repo, _ = exported
    for depth in DEPTHS:
        path = onnx_path(repo, tiny.name, depth)
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        assert not {n.op_type for n in proto.graph.node} & {"Loop", "If", "Scan"}
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
        assert not any(n.metadata_props for n in proto.graph.node), "stack traces with local paths leaked"


def test_onnx_at_each_depth_equals_pytorch_at_that_depth_and_depths_differ(exported, tiny, tiny_checkpoint):
    repo, _ = exported
    model, _ = load_checkpoint(tiny_checkpoint)
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # a batch size never traced
    outputs = {d: run_onnx(onnx_path(repo, tiny.name, d), images) for d in DEPTHS}
    with torch.no_grad():
        for depth in DEPTHS:
            np.testing.assert_allclose(outputs[depth], model(images, depth).numpy(), atol=1e-5)
    assert not np.allclose(outputs[1], outputs[2]) and not np.allclose(outputs[2], outputs[3])
    np.testing.assert_allclose(run_onnx(onnx_path(repo, tiny.name, 3), images[:1]), outputs[3][:1], atol=1e-5)


def test_recursion_reuses_the_stored_weights(exported, tiny):
    """Depth 3 runs the block three times but stores it once, as the checkpoint does."""
    repo, _ = exported
    params_bytes = sum(p.numel() * 4 for p in SRViT(tiny.cfg).parameters())
    for depth in DEPTHS:
        proto = onnx.load(str(onnx_path(repo, tiny.name, depth)))
        tensors = list(proto.graph.initializer)
        tensors += [a.t for node in proto.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
        stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in tensors)  # weights and Constant nodes alike
        assert params_bytes * 0.9 < stored < 1.2 * params_bytes


def test_two_exports_of_one_checkpoint_are_byte_identical(exported, tiny, tiny_checkpoint, tmp_path):
    repo, _ = exported
    again = tmp_path / "again"
    export_checkpoint(tiny_checkpoint, tiny.name, again, depths=[2], data=None, parity_images=64, max_batch=16)
    assert onnx_path(again, tiny.name, 2).read_bytes() == onnx_path(repo, tiny.name, 2).read_bytes()
    assert (again / f"{tiny.name}_d2" / "config.pbtxt").read_bytes() == (
        repo / f"{tiny.name}_d2" / "config.pbtxt"
    ).read_bytes()


def test_reexport_replaces_the_folder_and_leaves_others_alone(tiny, tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    (repo / f"{tiny.name}_d1" / "1").mkdir(parents=True)
    (repo / f"{tiny.name}_d1" / "1" / "stale.onnx").write_bytes(b"old")
    (repo / "other_model").mkdir()
    export_checkpoint(tiny_checkpoint, tiny.name, repo, depths=[1], data=None, parity_images=8)
    assert sorted(p.name for p in repo.iterdir()) == ["other_model", f"{tiny.name}_d1"]  # no .tmp-* or .old-*
    assert sorted(p.name for p in (repo / f"{tiny.name}_d1" / "1").iterdir()) == ["model.onnx"]


@pytest.fixture
def populated_repo(tiny, tmp_path) -> Path:
    """A repository already serving an older export: a failure must leave it exactly as it was."""
    repo = tmp_path / "repo"
    (repo / f"{tiny.name}_d1" / "1").mkdir(parents=True)
    (repo / f"{tiny.name}_d1" / "1" / "model.onnx").write_bytes(b"the model in service")
    (repo / f"{tiny.name}_d1" / "manifest.json").write_text("{}")
    (repo / f"{tiny.name}_d3_trt").mkdir()  # stale after a successful export without --trt; kept after a failure
    return repo


def drifting_reference(monkeypatch, drift: float = 1e-3) -> None:
    """PyTorch's logits moved by `drift`, as if the graph computed something else: parity must catch it."""
    real = pipeline.checks.torch_runner

    def runner(model, depth):
        run = real(model, depth)
        return lambda images: run(images) + np.float32(drift)

    monkeypatch.setattr(pipeline.checks, "torch_runner", runner)


def test_parity_failure_raises_and_publishes_nothing(tiny, tiny_checkpoint, populated_repo, monkeypatch):
    before = snapshot(populated_repo)
    drifting_reference(monkeypatch)
    with pytest.raises(ExportError, match=r"parity failed: max \|Δlogit\| = 0.001.*nothing was published"):
        export_checkpoint(tiny_checkpoint, tiny.name, populated_repo, data=None, parity_images=8)
    assert snapshot(populated_repo) == before
    assert sorted(p.name for p in populated_repo.iterdir()) == [f"{tiny.name}_d1", f"{tiny.name}_d3_trt"]


def test_failure_at_a_later_depth_publishes_no_earlier_depth(tiny, tiny_checkpoint, populated_repo, monkeypatch):
    real = pipeline.trace

    def fail_at_depth_2(model, depth, path):
        if depth == 2:
            raise ExportError("injected failure at depth 2")
        return real(model, depth, path)

    monkeypatch.setattr(pipeline, "trace", fail_at_depth_2)
    before = snapshot(populated_repo)
    with pytest.raises(ExportError, match="injected"):
        export_checkpoint(tiny_checkpoint, tiny.name, populated_repo, depths=[1, 2], data=None, parity_images=8)
    assert snapshot(populated_repo) == before
    assert sorted(p.name for p in populated_repo.iterdir()) == [f"{tiny.name}_d1", f"{tiny.name}_d3_trt"]


def test_a_failure_into_a_new_repo_leaves_no_repo(tiny, tiny_checkpoint, tmp_path, monkeypatch):
    drifting_reference(monkeypatch)
    with pytest.raises(ExportError):
        export_checkpoint(tiny_checkpoint, tiny.name, tmp_path / "new_repo", depths=[1], data=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pickled_checkpoints_are_refused(tiny, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"weights": torch.zeros(2)}, path)  # a zip-pickle; named .safetensors it is disguised
    with pytest.raises(ExportError, match="pickle"):
        export_checkpoint(path, tiny.name, tmp_path / "repo", data=None)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../evil"}, "--name"),
        ({"depths": [0, 4]}, "out of range"),
        ({"precision": "fp16"}, "add --trt"),
        ({"max_batch": 0}, "--max-batch"),
        ({"atol": float("nan")}, "--atol"),
        ({"atol": 1e-3}, "not loosen it"),
    ],
)
def test_bad_requests_are_refused_naming_the_option(tiny, tiny_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_checkpoint(tiny_checkpoint, **{"name": tiny.name, **kwargs}, repo=tmp_path / "repo", data=None)
    assert not (tmp_path / "repo").exists()


def test_labels_must_match_the_classes(tiny, tmp_path):
    path = tiny.save(tmp_path / "bad.safetensors", labels=["only", "two"])
    with pytest.raises(ExportError, match="3 entries"):
        export_checkpoint(path, tiny.name, tmp_path / "repo", data=None)


def recording(calls: list[str], name: str, real):
    """`real`, noting each call's `name` in `calls`."""

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    return spy


def test_trt_without_a_gpu_fails_fast_before_any_work(tiny, tiny_checkpoint, tmp_path, tensorrt_missing,
                                                      monkeypatch):  # fmt: skip
    if tensorrt_missing is None:
        pytest.skip("TensorRT and a GPU are present here, so --trt would work")
    ran = []  # the work a late TensorRT check would have wasted: reading the checkpoint, staging, tracing
    for step in ("load_model", "staging", "trace"):
        monkeypatch.setattr(pipeline, step, recording(ran, step, getattr(pipeline, step)))
    with pytest.raises(ExportError, match=r"--trt .*(GPU|TensorRT)"):
        export_checkpoint(tiny_checkpoint, tiny.name, tmp_path / "repo", trt=True, data=None)
    assert ran == []
    assert not (tmp_path / "repo").exists()


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_a_summary_and_returns_0(tiny, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich folds long paths at 80 columns
    repo = tmp_path / "repo"
    args = cli_args(
        str(tiny_checkpoint), "--name", tiny.name, "--repo", str(repo), "--depths", "3", "--parity-images", "8"
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "exported" in out and "accuracy" in out and f"{tiny.name}_d3" in out
    assert [p.name for p in repo.iterdir()] == [f"{tiny.name}_d3"]


def test_reexport_with_fewer_depths_removes_other_checkpoints_folders(tiny, tiny_checkpoint, tmp_path, capsys,
                                                                       monkeypatch):  # fmt: skip
    """Left in place, an older checkpoint's depth would be served beside the new ones."""
    monkeypatch.setenv("COLUMNS", "400")
    repo = tmp_path / "repo"
    for stale in (f"{tiny.name}_d2", f"{tiny.name}_d3", f"{tiny.name}_d3_trt", "other_d2"):
        (repo / stale / "1").mkdir(parents=True)
    args = cli_args(str(tiny_checkpoint), "--name", tiny.name, "--repo", str(repo), "--depths", "3",
                    "--parity-images", "8")  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["other_d2", f"{tiny.name}_d3"]
    assert (repo / f"{tiny.name}_d3" / "manifest.json").is_file()
    out = capsys.readouterr().out
    assert f"removed {repo / tiny.name}_d2" in out and f"removed {repo / tiny.name}_d3_trt" in out


def test_reexporting_one_depth_keeps_the_other_depths_of_the_same_checkpoint(tiny, tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    export_checkpoint(tiny_checkpoint, tiny.name, repo, depths=[1, 2], data=None, parity_images=8)
    kept = snapshot(repo / f"{tiny.name}_d1")
    export_checkpoint(tiny_checkpoint, tiny.name, repo, depths=[2], data=None, parity_images=8)
    assert sorted(p.name for p in repo.iterdir()) == [f"{tiny.name}_d1", f"{tiny.name}_d2"]
    assert snapshot(repo / f"{tiny.name}_d1") == kept


def test_cli_defaults_and_depth_lists():
    args = cli_args("ckpt.safetensors", "--name", "m", "--depths", "3,1")
    assert (args.depths, args.max_batch, args.precision, args.version, args.trt) == ([3, 1], 64, "fp32", 1, False)
    assert (args.repo, args.atol, args.parity_images) == (Path("model_repo"), 1e-4, 256)


def test_cli_turns_an_export_error_into_exit_code_2(tiny, tiny_checkpoint, tmp_path, capsys):
    args = cli_args(str(tiny_checkpoint), "--name", "no/slashes", "--repo", str(tmp_path / "repo"))
    assert main(args) == 2
    assert "export failed" in capsys.readouterr().out


def test_cli_rejects_a_malformed_depth_list():
    with pytest.raises(SystemExit):
        cli_args("ckpt.safetensors", "--name", "x", "--depths", "1,two")


@pytest.mark.parametrize(
    "preprocessing, fragment",
    [
        ({"channels": "CMYK"}, "could not follow its preprocessing: channels must be 'L' or 'RGB'"),
        ({"input_size": "8"}, "expected an integer"),
        ({"input_size": 4, "resize_size": 4}, r"makes \[1, 4, 4\] images but the model takes \[1, 8, 8\]"),
    ],
)
def test_metadata_whose_preprocessing_the_server_would_refuse_is_an_export_error(tiny, preprocessing, fragment):
    from export.pipeline import check_metadata

    meta = {"labels": tiny.labels, "preprocessing": {**tiny.preprocessing, **preprocessing}}
    with pytest.raises(ExportError, match=fragment):
        check_metadata(meta, tiny.cfg, Path("tiny.safetensors"))
