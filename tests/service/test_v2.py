"""The Open Inference Protocol endpoints, spoken by Triton's own Python client against a real `srvit serve`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from server_process import ServerProcess
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    proc = ServerProcess(tiny_repo, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, 8, 8), dtype=np.float32)


def direct(tiny_repo, depth: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(tiny_repo / f"tiny_d{depth}" / "1" / "model.onnx"))
    return session.run(None, {"images": x})[0]


def infer(client, model: str, x: np.ndarray, binary: bool = True, **parameters):
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    return client.infer(model, [tensor], outputs=[output], parameters=parameters or None)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert client.get_model_metadata("tiny_d2", model_version="1")["versions"] == ["1"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_by_triton_folder_name_matches_onnxruntime(client, tiny_repo, binary):
    x = images(3)
    result = infer(client, "tiny_d2", x, binary)
    np.testing.assert_allclose(result.as_numpy("logits"), direct(tiny_repo, 2, x), atol=1e-5)
    assert result.get_response()["parameters"]["depth_used"] == 2


def test_depth_parameter_selects_the_graph(client, tiny_repo):
    x = images(2)
    np.testing.assert_allclose(infer(client, "tiny", x, depth=1).as_numpy("logits"), direct(tiny_repo, 1, x),
                               atol=1e-5)  # fmt: skip
    assert infer(client, "tiny", x).get_response()["parameters"]["depth_used"] == 3  # the default depth


def test_errors_reach_the_client_with_their_message(client):
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        infer(client, "nope", images(1))
    with pytest.raises(InferenceServerException, match=r"shape \[-1, 1, 8, 8\]"):
        infer(client, "tiny", np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InferenceServerException, match="depth 7 is not served"):
        infer(client, "tiny", images(1), depth=7)
