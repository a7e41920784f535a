"""Every config.pbtxt parses with Triton's own ModelConfig schema and says what the graph is."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from export.triton import config_pbtxt, preferred_batch_sizes


def parse(text: str, model_config_pb2):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_every_exported_config_parses_with_tritons_schema(exported, tiny, model_config_pb2):
    repo, _ = exported
    pb = model_config_pb2
    for depth in (1, 2, 3):
        config = parse((repo / f"{tiny.name}_d{depth}" / "config.pbtxt").read_text(), pb)
        assert config.name == f"{tiny.name}_d{depth}"
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
        [inp] = config.input
        assert (inp.name, inp.data_type, list(inp.dims)) == ("images", pb.TYPE_FP32, [1, 8, 8])
        [out] = config.output
        assert (out.name, out.data_type, list(out.dims)) == ("logits", pb.TYPE_FP32, [3])
        assert out.label_filename == "labels.txt"
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        [group] = config.instance_group
        assert (group.count, group.kind) == (1, pb.ModelInstanceGroup.KIND_CPU)
        assert config.version_policy.latest.num_versions == 1


def test_tensorrt_config_runs_on_the_gpu(model_config_pb2):
    config = parse(config_pbtxt("m_d2_trt", "tensorrt_plan", 64, (3, 224, 224), 1000), model_config_pb2)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 64
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.input[0].dims) == [3, 224, 224] and list(config.output[0].dims) == [1000]


@pytest.mark.parametrize(("max_batch", "expected"), [(1, [1]), (16, [8, 16]), (64, [8, 32, 64]), (256, [8, 32, 256])])
def test_preferred_batch_sizes_never_exceed_the_max(max_batch, expected):
    assert preferred_batch_sizes(max_batch) == expected
