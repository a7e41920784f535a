"""depth=adaptive through the API: the tiny model's repository given a policy (1 -> 3), answers per image, exits
by the calibrated rule, the auto cap, deadlines, failures, metrics, and a manifest without a policy refused."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from sample_images import png

import service.loading
from bench.hostile import v2_bytes_request
from modelrepo.adaptive import AdaptivePolicy, Stage, calibrated
from modelrepo.manifest import dump, load, manifest_paths

pytestmark = pytest.mark.anyio
TEMPERATURES = {1: 0.5, 3: 2.0}  # not 1: the answer must be the calibrated one


def with_policy(repo: Path, threshold: float) -> Path:
    """Every manifest of the tiny repository given the same policy: depth 1, then depth 3 below `threshold`."""
    policy = AdaptivePolicy((Stage(1, TEMPERATURES[1], threshold), Stage(3, TEMPERATURES[3], None)))
    for path in manifest_paths(repo):
        dump(dataclasses.replace(load(path), adaptive=policy), path.parent)
    return repo


@pytest.fixture
def policy_repo(repo_copy, tmp_path):
    """`policy_repo(threshold)`: a fresh copy of the tiny repository with that policy."""
    numbers = itertools.count()

    def make(threshold: float) -> Path:
        copy = Path(shutil.copytree(repo_copy, tmp_path / f"repo{next(numbers)}"))
        return with_policy(copy, threshold)

    return make


def multipart(images: list[bytes], **params) -> dict:
    return {"params": params, "files": [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]}


IMAGES = [png(seed=s) for s in range(8)]


async def v2(client: httpx.AsyncClient, image: bytes, depth) -> dict:
    """One image over V2 (binary BYTES, as tritonclient sends it), logits only: the response body."""
    headers, body = v2_bytes_request(image, parameters={"depth": depth})
    r = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def confidences(client: httpx.AsyncClient) -> tuple[np.ndarray, np.ndarray]:
    """The calibrated top probability of each image at depth 1, and depth 3's calibrated top-1, from the logits
    the server returns at those fixed depths."""
    out = {}
    for depth in (1, 3):
        logits = [(await v2(client, image, depth))["outputs"][0]["data"] for image in IMAGES]
        out[depth] = calibrated(np.array(logits), TEMPERATURES[depth])
    return out[1].max(-1), out[3].argmax(-1)


async def test_a_model_without_a_policy_refuses_adaptive_clearly(serving):
    async with serving() as (_, client):
        r = await client.post("/classify", params={"depth": "adaptive"}, content=png(),
                              headers={"Content-Type": "image/png"})  # fmt: skip
        fixed = await client.post(
            "/classify", params={"depth": 1}, content=png(), headers={"Content-Type": "image/png"}
        )
    assert (r.status_code, r.json()["code"]) == (422, "invalid_parameter")
    assert "depth=adaptive is not available for tiny" in r.json()["error"] and "srvit export" in r.json()["error"]
    assert fixed.status_code == 200 and fixed.json()["depths_run"] == [1]


async def test_each_image_stops_where_its_calibrated_confidence_says(serving, policy_repo):
    """A threshold between the images' depth-1 confidences: the sure ones answer at depth 1, the others at
    depth 3 with depth 3's calibrated answer, in one request, in part order."""
    async with serving(repo=policy_repo(0.99)) as (_, client):
        sure, deep_answers = await confidences(client)
    threshold = float(np.median(sure))
    async with serving(repo=policy_repo(threshold)) as (_, client):
        r = await client.post("/classify", **multipart(IMAGES, depth="adaptive", top_k=3))
        models = (await client.get("/v1/models")).json()["models"][0]
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    gflops = {d["depth"]: d["gflops"] for d in models["depths"]}
    assert models["adaptive"]["stages"][0] == {"depth": 1, "temperature": 0.5, "threshold": threshold}
    stopped = [c >= threshold for c in sure]
    assert 0 < sum(stopped) < len(IMAGES)
    for early, deep, result in zip(stopped, deep_answers, results, strict=True):
        assert result["depth_requested"] == "adaptive"
        if early:
            assert (result["depth_used"], result["depths_run"], result["depth_reason"]) == (1, [1], "confident")
            assert result["gflops"] == pytest.approx(gflops[1])
            assert result["predictions"][0]["score"] >= threshold
        else:
            assert (result["depth_used"], result["depths_run"], result["depth_reason"]) == (3, [1, 3], "max_depth")
            assert result["gflops"] == pytest.approx(gflops[1] + gflops[3])
            assert result["predictions"][0]["index"] == deep


async def test_v2_reports_the_depths_and_reasons_per_image(serving, policy_repo):
    async with serving(repo=policy_repo(1.0)) as (_, client):  # nothing is that sure: every image goes on
        params = (await v2(client, IMAGES[0], "adaptive"))["parameters"]
    assert (params["depth_used"], params["depths_used"], params["depth_reasons"]) == (3, "3", "max_depth")
    assert params["gflops"] > 0


async def test_under_load_auto_caps_how_deep_an_image_may_go(serving, policy_repo):
    async with serving(repo=policy_repo(1.0)) as (app, client):
        auto = app.state.service.served["tiny"].auto
        auto.follow = lambda forecast, now: None  # hold the auto depth where the test puts it
        auto.current = 2  # as if the load had pushed auto down to depth 2
        r = await client.post("/classify", params={"depth": "adaptive"}, content=png(),
                              headers={"Content-Type": "image/png"})  # fmt: skip
        metrics = (await client.get("/metrics")).text
    body = r.json()
    assert (body["depth_used"], body["depths_run"], body["depth_reason"]) == (1, [1], "overload")
    assert 'srvit_adaptive_exit_depth_count{model="tiny",reason="overload"} 1.0' in metrics


async def test_a_deadline_the_next_depth_would_miss_returns_the_shallower_answer_not_a_504(serving, policy_repo,
                                                                                            slowed):  # fmt: skip
    slowed({1: 5, 2: 5, 3: 400})  # depth 3: 400 ms an image
    async with serving(repo=policy_repo(1.0), max_batch_size=1) as (_, client):
        r = await client.post("/classify", params={"depth": "adaptive", "timeout_ms": 200}, content=png(),
                              headers={"Content-Type": "image/png"})  # fmt: skip
        plenty = await client.post("/classify", params={"depth": "adaptive", "timeout_ms": 5000}, content=png(),
                                   headers={"Content-Type": "image/png"})  # fmt: skip
    assert r.status_code == 200
    assert (r.json()["depth_used"], r.json()["depths_run"], r.json()["depth_reason"]) == (1, [1], "deadline")
    assert r.json()["timing_ms"]["total"] < 200
    assert (plenty.json()["depths_run"], plenty.json()["depth_reason"]) == ([1, 3], "max_depth")


async def test_a_failing_deeper_batch_fails_its_requests_only(serving, policy_repo, monkeypatch):
    real = service.loading.open_runtime

    class Failing:
        provider = "failing"

        def __init__(self, inner):
            self.inner = inner

        def run(self, images):
            if len(images) == 1 and FAIL["on"]:
                raise RuntimeError("device fault")
            return self.inner.run(images)

        def close(self):
            self.inner.close()

    FAIL = {"on": False}

    def open_failing_depth_3(artifacts, *args):
        runtime = real(artifacts, *args)
        return Failing(runtime) if artifacts[0].depth == 3 else runtime

    monkeypatch.setattr(service.loading, "open_runtime", open_failing_depth_3)
    async with serving(repo=policy_repo(1.0)) as (_, client):
        FAIL["on"] = True
        failed = await client.post("/classify", params={"depth": "adaptive"}, content=png(),
                                   headers={"Content-Type": "image/png"})  # fmt: skip
        shallow = await client.post(
            "/classify", params={"depth": 1}, content=png(), headers={"Content-Type": "image/png"}
        )
        FAIL["on"] = False
        again = await client.post("/classify", params={"depth": "adaptive"}, content=png(),
                                  headers={"Content-Type": "image/png"})  # fmt: skip
    assert (failed.status_code, failed.json()["code"]) == (500, "internal")
    assert shallow.status_code == 200 and again.status_code == 200 and again.json()["depths_run"] == [1, 3]


async def test_metrics_count_exits_continuations_and_compute(serving, policy_repo):
    async with serving(repo=policy_repo(1.0)) as (_, client):
        for _ in range(3):
            await client.post("/classify", params={"depth": "adaptive"}, content=png(),
                              headers={"Content-Type": "image/png"})  # fmt: skip
        await client.post("/classify", params={"depth": 1}, content=png(), headers={"Content-Type": "image/png"})
        models = (await client.get("/v1/models")).json()["models"][0]
        metrics = (await client.get("/metrics")).text
    gflops = {d["depth"]: d["gflops"] for d in models["depths"]}
    assert 'srvit_adaptive_exit_depth_count{model="tiny",reason="max_depth"} 3.0' in metrics
    assert 'srvit_adaptive_exit_depth_bucket{le="2.0",model="tiny",reason="max_depth"} 0.0' in metrics
    assert 'srvit_adaptive_continued_images_total{from_depth="1",model="tiny",to_depth="3"} 3.0' in metrics
    spent = float(re.search(r'srvit_image_gflops_sum\{mode="adaptive",model="tiny"\} (\S+)', metrics).group(1))
    assert spent == pytest.approx(3 * (gflops[1] + gflops[3]), rel=1e-4)
    fixed = float(re.search(r'srvit_image_gflops_sum\{mode="fixed",model="tiny"\} (\S+)', metrics).group(1))
    assert fixed == pytest.approx(gflops[1], rel=1e-4)


def test_grpc_answers_adaptive_with_typed_parameters(repo_copy, tmp_path):
    """tritonclient's gRPC client, against a real `srvit serve`: depth_used as an int64, the per-image depths and
    reasons as strings, gflops as a double; a depth that is none of the three kinds is refused, naming them."""
    import tritonclient.grpc as tgrpc
    from server_process import ServerProcess
    from tritonclient.utils import InferenceServerException

    proc = ServerProcess(with_policy(repo_copy, 1.0), tmp_path / "serve.log")
    try:
        proc.wait_ready()
        client = tgrpc.InferenceServerClient(proc.grpc_url)
        tensor = tgrpc.InferInput("image", [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array(IMAGES[:2], dtype=object).reshape(-1, 1))
        response = client.infer("tiny", [tensor], parameters={"depth": "adaptive"}).get_response()
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
        assert (params["depth_used"], params["depths_used"], params["depth_reasons"]) == (
            3,
            "3,3",
            "max_depth,max_depth",
        )
        assert params["gflops"] > 0
        with pytest.raises(InferenceServerException, match="depth must be an integer, 'auto' or 'adaptive'"):
            client.infer("tiny", [tensor], parameters={"depth": "deepest"})
        client.close()
    finally:
        proc.stop()
