"""Native TensorRT engines: picked when they can run, refused or passed over (loudly) when they cannot."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from export.pipeline import export_checkpoint
from service.repository import RepositoryError, load_repository
from service.runtime import OrtRuntime, open_runtime, tensorrt_unavailable

pytestmark = pytest.mark.anyio


def fake_engine_folder(repo, depth: int) -> None:
    """A tensorrt_plan folder for `depth` (its bytes are not an engine; without TensorRT nothing reads them)."""
    src, dst = repo / f"tiny_d{depth}", repo / f"tiny_d{depth}_trt"
    shutil.copytree(src, dst)
    (dst / "1" / "model.onnx").rename(dst / "1" / "model.plan")
    manifest = json.loads((dst / "manifest.json").read_text())
    files = manifest["files"]
    files["1/model.plan"] = files.pop("1/model.onnx")
    manifest |= {"triton_name": dst.name, "platform": "tensorrt_plan", "model_file": "1/model.plan", "files": files,
                 "tensorrt": {"compute_capability": "0.0", "precision": "fp32"}}  # fmt: skip
    (dst / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT can run here; this checks the fallback")
def test_engine_that_cannot_run_here_falls_back_to_onnx_with_a_warning(repo_copy, caplog):
    fake_engine_folder(repo_copy, 2)
    artifacts = load_repository(repo_copy)["tiny"].artifacts[2]
    assert [a.platform for a in artifacts] == ["onnxruntime_onnx", "tensorrt_plan"]
    with caplog.at_level(logging.WARNING):
        runtime = open_runtime(artifacts, ("auto",))
    assert isinstance(runtime, OrtRuntime) and "instead of the TensorRT engine" in caplog.text


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT can run here; this checks the refusal")
def test_engine_only_depth_that_cannot_run_here_fails_start_up(repo_copy):
    fake_engine_folder(repo_copy, 3)
    shutil.rmtree(repo_copy / "tiny_d3")
    with pytest.raises(RepositoryError, match="only a TensorRT engine exists for depth 3"):
        open_runtime(load_repository(repo_copy)["tiny"].artifacts[3], ("auto",))


@pytest.fixture(scope="module")
def engine_repo(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("trt") / "model_repo"
    export_checkpoint(tiny_checkpoint, "tiny", repo, depths=[2], data=None, parity_images=8, max_batch=8, trt=True)
    return repo


@pytest.mark.gpu
def test_engine_runs_every_batch_size_like_onnxruntime(engine_repo):
    graph, engine = load_repository(engine_repo)["tiny"].artifacts[2]
    runtime, reference = open_runtime((graph, engine), ("auto",)), OrtRuntime(graph, ["CPUExecutionProvider"])
    try:
        assert runtime.provider == "TensorRT"
        for batch in (1, 3, 8):
            x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8), dtype=np.float32)
            np.testing.assert_allclose(runtime.run(x), reference.run(x), atol=1e-3)
        with pytest.raises(ValueError, match="accepts 1..8"):
            runtime.run(np.zeros((9, 1, 8, 8), np.float32))
    finally:
        runtime.close()


@pytest.mark.gpu
async def test_server_serves_the_engine(engine_repo, serving):
    from sample_images import png

    async with serving(repo=engine_repo) as (_, client):
        depth = (await client.get("/v1/models")).json()["models"][0]["depths"][0]
        r = await client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
    assert depth["runtime"] == "TensorRT" and r.status_code == 200


@pytest.mark.gpu
def test_explicit_cpu_provider_keeps_the_onnx_graph(engine_repo):
    runtime = open_runtime(load_repository(engine_repo)["tiny"].artifacts[2], ("cpu",))
    assert isinstance(runtime, OrtRuntime) and runtime.provider == "CPUExecutionProvider"
