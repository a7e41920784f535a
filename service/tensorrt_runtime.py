"""A native TensorRT engine (model.plan) as a Runtime: one execution context, one stream, buffers for the max batch.

Imported only when a tensorrt_plan folder can run here: tensorrt is an optional, GPU-only dependency.
"""

from __future__ import annotations

import numpy as np
import tensorrt as trt

from service.cuda_driver import CudaDevice, CudaError
from service.repository import Artifact, RepositoryError

PROFILE = 0  # the exporter builds one optimization profile over the batch dimension


class TensorRTRuntime:
    """Deserialize once, then per batch: set the batch dim, copy in, enqueue, copy out, wait.

    The device buffers hold the profile's largest batch, so nothing is allocated per request.
    """

    provider = "TensorRT"

    def __init__(self, artifact: Artifact):
        self.input_name = artifact.manifest.input.name
        self.output_name = artifact.manifest.output.name
        self.cuda = CudaDevice()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = self._deserialize(artifact)
        self.context = self.engine.create_execution_context()
        self.max_batch = self._profile_max_batch(artifact)
        self.chw = artifact.manifest.chw
        self.classes = artifact.manifest.output.shape[1]
        self.stream = self.cuda.stream()
        self.d_input = self.cuda.alloc(self.max_batch * int(np.prod(self.chw)) * 4)
        self.d_output = self.cuda.alloc(self.max_batch * self.classes * 4)
        self._bind()

    def _deserialize(self, artifact: Artifact):
        self._runtime = trt.Runtime(self._logger)  # kept: TensorRT wants the runtime to outlive its engines
        engine = self._runtime.deserialize_cuda_engine(artifact.path.read_bytes())
        if engine is None:
            raise RepositoryError(
                f"{artifact.path}: TensorRT {trt.__version__} cannot deserialize this engine (built by another "
                "TensorRT version or for another GPU); rebuild it here with `srvit export --trt`"
            )
        return engine

    def _profile_max_batch(self, artifact: Artifact) -> int:
        """The engine's own batch range decides; the manifest's max_batch_size must not exceed it."""
        _min, _opt, largest = self.engine.get_tensor_profile_shape(self.input_name, PROFILE)
        if artifact.max_batch_size > largest[0]:
            raise RepositoryError(
                f"{artifact.path}: the manifest allows batches of {artifact.max_batch_size} but the engine's "
                f"profile stops at {largest[0]}; re-export this model"
            )
        return int(largest[0])

    def _bind(self) -> None:
        self.context.set_optimization_profile_async(PROFILE, self.stream)
        ok = self.context.set_tensor_address(self.input_name, self.d_input)
        ok = ok and self.context.set_tensor_address(self.output_name, self.d_output)
        if not ok:
            raise RepositoryError(f"the engine has no tensors named {self.input_name!r} / {self.output_name!r}")

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n}: the engine accepts 1..{self.max_batch}")
        images = np.ascontiguousarray(images, dtype=np.float32)  # [n, C, H, W]
        logits = np.empty((n, self.classes), dtype=np.float32)  # [n, classes]
        self.cuda.make_current()
        if not self.context.set_input_shape(self.input_name, images.shape):
            raise ValueError(f"the engine refused input shape {images.shape}")
        self.cuda.to_device(self.d_input, images, self.stream)
        if not self.context.execute_async_v3(self.stream):
            raise CudaError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        self.cuda.to_host(logits, self.d_output, self.stream)
        self.cuda.synchronize(self.stream)  # also keeps `images` alive until the copy has read it
        return logits

    def close(self) -> None:
        self.cuda.make_current()
        self.cuda.synchronize(self.stream)
        self.context = self.engine = self._runtime = None
        for ptr in (self.d_input, self.d_output):
            self.cuda.free(ptr)
        self.cuda.destroy_stream(self.stream)
        self.cuda.release()
