"""TensorRT engines (GPU only): one per depth, held to ONNX Runtime, in their own Triton model folders."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format

from export.pipeline import export_checkpoint
from export.tensorrt import PARITY, profile


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_are_built_checked_and_published_per_depth(
    tiny, tiny_checkpoint, tmp_path, precision, model_config_pb2
):
    repo = tmp_path / "repo"
    rows = export_checkpoint(
        tiny_checkpoint, tiny.name, repo, depths=[1, 3], trt=True, precision=precision, data=None, max_batch=16
    )
    assert [(r["depth"], r["platform"]) for r in rows] == [
        (1, "onnxruntime_onnx"), (1, "tensorrt_plan"), (3, "onnxruntime_onnx"), (3, "tensorrt_plan"),
    ]  # fmt: skip
    for depth in (1, 3):
        folder = repo / f"{tiny.name}_d{depth}_trt"
        assert (folder / "1" / "model.plan").stat().st_size > 0
        m = json.loads((folder / "manifest.json").read_text())
        assert (m["platform"], m["model_file"], m["triton_name"]) == ("tensorrt_plan", "1/model.plan", folder.name)
        assert m["parity"]["reference"] == "onnxruntime"
        assert m["parity"]["top1_agreement"] >= PARITY[precision][1]
        assert set(m["tensorrt"]) == {"version", "gpu", "compute_capability", "precision", "profile"}
        assert m["tensorrt"]["precision"] == precision and m["tensorrt"]["profile"] == profile(16)
        assert m["versions"]["tensorrt"] == m["tensorrt"]["version"]
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.platform == "tensorrt_plan"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_the_profile_spans_one_to_max_batch():
    assert profile(64) == {"min": 1, "opt": 32, "max": 64}
    assert profile(8) == {"min": 1, "opt": 8, "max": 8}
