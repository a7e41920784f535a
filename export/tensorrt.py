"""TensorRT engines built from the exported ONNX graphs through Polygraphy; imported only for `--trt`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from export.errors import ExportError
from export.parity import Runner
from modelrepo.gpu import find_gpu

# Against ONNX Runtime fp32 on the parity images: (max |Δlogit| allowed or None, top-1 agreement needed).
# fp16 logits drift by ~1e-2, so only agreement is gated; fp32 without TF32 should match to ~1e-5.
PARITY = {"fp32": (1e-3, 0.995), "fp16": (None, 0.995)}


def check_available() -> dict:
    """Run before any work: without a GPU and TensorRT no engine can be built, so fail in milliseconds."""
    device = gpu()
    if device is None:
        raise ExportError(
            "--trt builds TensorRT engines, which needs an NVIDIA GPU and its driver (libcuda.so.1), and none was "
            "found. Export without --trt here, and build the engines on the GPU machine that will serve them."
        )
    try:
        import polygraphy.backend.trt  # noqa: F401
        import tensorrt
    except ImportError as e:
        raise ExportError(
            f"--trt needs TensorRT and Polygraphy ({e}); install them: pip install 'srvit[tensorrt]'"
        ) from e
    return {"version": tensorrt.__version__, **device}


def gpu() -> dict | None:
    """Device 0, for the manifest: an engine only runs on the GPU architecture it was built on."""
    found = find_gpu()
    return None if found is None else {"gpu": found.name, "compute_capability": found.compute_capability}


def profile(max_batch: int) -> dict:
    """The batch sizes the engine accepts; TensorRT tunes its kernels for `opt`."""
    return {"min": 1, "opt": min(32, max_batch), "max": max_batch}


def build_engine(onnx_path: Path, plan_path: Path, chw: tuple[int, ...], max_batch: int, precision: str):
    """Build and save one engine; the built engine is returned so parity runs on exactly what was saved."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    shapes = {key: (batch, *chw) for key, batch in profile(max_batch).items()}
    config = CreateConfig(tf32=False, fp16=precision == "fp16", profiles=[Profile().add("images", **shapes)])
    try:
        engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config)
    except Exception as e:  # Polygraphy reports parser and builder failures as its own exception type
        flags = " ".join(f"--trt-{key}-shapes images:[{','.join(map(str, shape))}]" for key, shape in shapes.items())
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path}: {e}. "
            f"Reproduce it with: polygraphy convert {onnx_path} -o model.plan {flags} --verbose"
        ) from e
    if engine is None:
        raise ExportError(f"TensorRT returned no engine for {onnx_path}; rerun with --verbose Polygraphy logging")
    save_engine(engine, path=str(plan_path))
    return engine


@contextlib.contextmanager
def runner(engine) -> Iterator[Runner]:
    """The engine as a Runner; outputs are copied because Polygraphy reuses its host buffers between calls."""
    from polygraphy.backend.trt import TrtRunner

    with TrtRunner(engine) as trt_runner:
        yield lambda images: trt_runner.infer({"images": images})["logits"].copy()
