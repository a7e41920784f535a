"""Export test fixtures: Triton's config schema and TensorRT skips (the tiny model is in tests/conftest.py)."""

from __future__ import annotations

import importlib.util

import pytest


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot be built here, or None when they can."""
    from export.tensorrt import gpu

    for module in ("tensorrt", "polygraphy"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'srvit[tensorrt]')"
    if gpu() is None:
        return "no NVIDIA GPU: libcuda.so.1 is missing or reports no device"
    return None


def pytest_runtest_setup(item):
    """Tests marked gpu build real TensorRT engines: skip them, saying why, where that cannot work."""
    if item.get_closest_marker("gpu") and (reason := tensorrt_unavailable()):
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tensorrt_missing() -> str | None:
    return tensorrt_unavailable()


@pytest.fixture(scope="session")
def model_config_pb2():
    """Triton's own ModelConfig schema, as the server reads config.pbtxt too (tritonclient's generated module,
    a base dependency since the gRPC front end)."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2
