"""One loaded graph per (model, depth): an ONNX Runtime session on the best provider, or a native TensorRT engine."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from modelrepo.gpu import find_gpu
from modelrepo.manifest import ONNX, TENSORRT
from service.repository import Artifact, RepositoryError

log = logging.getLogger(__name__)

# "auto" tries these in order; short names are what a person types into SRVIT_PROVIDERS.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": PROVIDER_ORDER[0], "cuda": PROVIDER_ORDER[1], "cpu": PROVIDER_ORDER[2]}


class Runtime(Protocol):
    """What the device thread calls: images [n, C, H, W] float32 -> logits [n, classes] float32.

    Not thread-safe by contract: one device thread owns it (TensorRT contexts and CUDA streams are per thread).
    """

    provider: str

    def run(self, images: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The ONNX Runtime provider list; an explicitly requested provider that is missing stops start-up."""
    if list(requested) == ["auto"]:
        return [p for p in PROVIDER_ORDER if p in available] or list(available)
    chosen = [SHORT_NAMES.get(name.lower(), name) for name in requested]
    missing = [p for p in chosen if p not in available]
    if missing:
        raise RepositoryError(
            f"execution provider(s) {missing} are not available in this onnxruntime build; available: "
            f"{list(available)} (set SRVIT_PROVIDERS=auto to use the best one present)"
        )
    return chosen


class OrtRuntime:
    """An InferenceSession tuned for one caller at a time: parallelism inside the operator, not across calls."""

    def __init__(self, artifact: Artifact, providers: list[str], intra_op_threads: int = 0, spinning: bool = False):
        self.input_name = artifact.manifest.input.name
        self.output_name = artifact.manifest.output.name
        try:
            self.session = ort.InferenceSession(
                str(artifact.path), session_options(intra_op_threads, spinning), providers
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise RepositoryError(f"{artifact.path}: ONNX Runtime cannot load it ({e}); re-export this model") from e
        self._check_signature(artifact)
        self.provider = self.session.get_providers()[0]

    def _check_signature(self, artifact: Artifact) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [self.input_name] or self.output_name not in outputs:
            raise RepositoryError(
                f"{artifact.path}: graph inputs {inputs} / outputs {outputs} do not match the manifest's "
                f"{self.input_name!r} / {self.output_name!r}; re-export this model"
            )

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def close(self) -> None:
        self.session = None


def session_options(intra_op_threads: int, spinning: bool) -> ort.SessionOptions:
    """How `srvit serve` opens every graph (also what benchmarks use, to measure what the server runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def tensorrt_unavailable() -> str | None:
    """Why a native TensorRT engine cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'srvit[tensorrt]')"
    if find_gpu() is None:
        return "no NVIDIA GPU: libcuda.so.1 is missing or reports no device"
    return None


def open_runtime(
    artifacts: Sequence[Artifact], providers: Sequence[str], intra_op_threads: int = 0, spinning: bool = False
) -> Runtime:
    """The depth's TensorRT engine when it can run here and TensorRT is wanted, else its ONNX graph."""
    engine = next((a for a in artifacts if a.platform == TENSORRT), None)
    graph = next((a for a in artifacts if a.platform == ONNX), None)
    wants_engine = list(providers) == ["auto"] or any(p.lower() in ("tensorrt", PROVIDER_ORDER[0]) for p in providers)
    why_not = _engine_unusable(engine) if engine is not None and wants_engine else "not wanted"
    if engine is not None and why_not is None:
        from service.tensorrt_runtime import TensorRTRuntime  # lazy: tensorrt is an optional, GPU-only dependency

        return TensorRTRuntime(engine)
    if graph is None:
        raise RepositoryError(
            f"{engine.folder}: only a TensorRT engine exists for depth {engine.depth}, and it cannot run here "
            f"({why_not}); export the ONNX graph too (srvit export without --trt) or serve on the engine's GPU"
        )
    if engine is not None:
        log.warning("%s: serving the ONNX graph instead of the TensorRT engine: %s", graph.folder.name, why_not)
    return OrtRuntime(graph, choose_providers(providers, ort.get_available_providers()), intra_op_threads, spinning)


def _engine_unusable(engine: Artifact) -> str | None:
    """An engine only runs on the GPU architecture it was built for; say so rather than fail to deserialize."""
    reason = tensorrt_unavailable()
    if reason is not None:
        return reason
    built_for, gpu = engine.manifest.compute_capability, find_gpu()
    here = gpu and gpu.compute_capability
    if built_for is not None and built_for != here:
        return f"it was built for compute capability {built_for}, this GPU is {here}; rebuild it here"
    return None
