"""Triton's config.pbtxt for one exported model, written as text that Triton's ModelConfig schema parses."""

from __future__ import annotations

from modelrepo.manifest import LABELS_FILE, ONNX, TENSORRT

MAX_QUEUE_DELAY_US = 1000  # a 1 ms wait to fill a batch: small next to one batch's compute, big next to arrivals
KIND = {ONNX: "KIND_CPU", TENSORRT: "KIND_GPU"}


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """The sizes worth waiting for: 8 and 32 (TensorRT's opt profile) where they fit, and the max."""
    return sorted({min(8, max_batch), min(32, max_batch), max_batch})


def config_pbtxt(triton_name: str, platform: str, max_batch: int, chw: tuple[int, ...], num_classes: int) -> str:
    """Dims exclude the batch: with max_batch_size > 0 Triton adds it and batches requests itself."""
    return f"""\
name: "{triton_name}"
platform: "{platform}"
max_batch_size: {max_batch}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
  {{
    name: "images"
    data_type: TYPE_FP32
    dims: {_list(chw)}
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: {_list([num_classes])}
    label_filename: "{LABELS_FILE}"
  }}
]
dynamic_batching {{
  preferred_batch_size: {_list(preferred_batch_sizes(max_batch))}
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: {KIND[platform]}
  }}
]
"""


def _list(values) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"
