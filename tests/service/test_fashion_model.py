"""The real model_repo/ (srvit_fashion) served by `srvit serve`: answers match ONNX Runtime and are mostly right."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from sample_images import encode
from server_process import ServerProcess

from service.preprocess import Preprocessor
from service.repository import load_repository
from srvit.data import FASHION_MNIST_DIR, load_fashion_mnist

REPO = Path(__file__).parents[2] / "model_repo"
NAME = "srvit_fashion"
IMAGES = 16


def _has_fashion_model() -> bool:
    for path in REPO.glob("*/manifest.json"):
        if not path.parent.name.startswith(".") and json.loads(path.read_text()).get("name") == NAME:
            return True
    return False


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    assert _has_fashion_model(), "model_repo/ must hold the embedded srvit_fashion (srvit export, see README)"
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    server = ServerProcess(REPO, tmp_path_factory.mktemp("log") / "serve.log").wait_ready()
    try:
        yield server, images[:IMAGES].numpy(), labels[:IMAGES].numpy()
    finally:
        server.stop()


def direct_top1(artifact, data: list[bytes]) -> list[int]:
    """onnxruntime on the same bytes through the same preprocessing, without the server."""
    x = np.stack([Preprocessor(artifact.manifest.preprocessing, 10**7)(d) for d in data])  # [n, C, H, W]
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    return list(np.argmax(session.run(None, {artifact.manifest.input.name: x})[0], axis=1))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_served_predictions_match_onnxruntime_and_are_mostly_right(fashion, fmt):
    server, images, labels = fashion
    model = load_repository(REPO)[NAME]
    data = [encode(Image.fromarray(img, "L"), fmt, **({"quality": 95} if fmt == "JPEG" else {})) for img in images]
    files = [("image", (f"{i}.{fmt.lower()}", d, f"image/{fmt.lower()}")) for i, d in enumerate(data)]
    for depth in model.depths:
        r = httpx.post(f"{server.url}/classify", files=files, params={"depth": depth, "top_k": 1}, timeout=60)
        assert r.status_code == 200, r.text
        served = [res["predictions"][0]["index"] for res in r.json()["results"]]
        onnx_artifact = next(a for a in model.artifacts[depth] if a.platform == "onnxruntime_onnx")
        assert served == direct_top1(onnx_artifact, data), f"depth {depth}"
        assert [res["predictions"][0]["label"] for res in r.json()["results"]] == [model.labels[i] for i in served]
    correct = np.mean(np.asarray(served) == labels)
    assert correct >= 0.7, f"only {correct:.0%} of {IMAGES} {fmt} test images right at depth {model.depths[-1]}"
