"""Export test fixtures: Triton's config schema and TensorRT skips (the tiny model is in tests/conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
    """Triton's own ModelConfig schema. tritonclient[http] ships the generated module, but the
    tritonclient.grpc package refuses to import without grpcio, so then load the file itself."""
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install 'srvit[test]')")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
