"""depth=auto through the API, on a runtime slowed to a known cost per image and depth."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
from sample_images import png

import service.loading
import service.preprocess

pytestmark = pytest.mark.anyio

# Per image: depth 3 costs twice the 150 ms target, so real time passing can only make it miss by more; depth 2
# (10 ms, plus the 2 ms batch window) leaves 138 ms for the time before the device queue (decoding, the event loop).
STEEP = {1: 5, 2: 10, 3: 300}
IDLE_TARGET = {"latency_target_ms": 150, "max_queue_delay_ms": 2, "max_batch_size": 1}  # batch 1: a 1 s warm-up


def raw(**params) -> dict:
    return {"params": params, "content": png(), "headers": {"Content-Type": "image/png"}}


async def test_target_alone_picks_a_shallower_depth_on_an_idle_server(serving, slowed):
    slowed(STEEP)
    async with serving(**IDLE_TARGET) as (_, client):
        body = (await client.post("/classify", **raw(depth="auto"))).json()
    assert (body["depth_requested"], body["depth_used"], body["depth_reason"]) == ("auto", 2, "latency_target")


async def test_auto_goes_down_under_load_and_back_up_after_while_explicit_depth_never_changes(serving, slowed):
    slowed(4)  # depth 3 costs 12 ms an image: a dozen queued images use up the 150 ms target
    settings = {"latency_target_ms": 150, "max_queue_delay_ms": 2, "auto_step_up_hold_s": 0.3}
    async with serving(**settings) as (_, client):
        auto = [client.post("/classify", **raw(depth="auto")) for _ in range(40)]
        explicit = [client.post("/classify", **raw(depth=3)) for _ in range(6)]
        answers = await asyncio.gather(*auto, *explicit)
        after = await _until_deepest(client)
        metrics = (await client.get("/metrics")).text
    auto_answers, explicit_answers = answers[:40], answers[40:]
    served = [a.json() for a in auto_answers if a.status_code == 200]
    assert any(b["depth_used"] < 3 and b["depth_reason"] == "overload" for b in served), served
    for refused in (a for a in auto_answers if a.status_code != 200):
        assert (refused.status_code, refused.json()["code"]) == (503, "overloaded")
        assert int(refused.headers["retry-after"]) >= 1
    assert [(a.json()["depth_used"], a.json()["depth_reason"]) for a in explicit_answers] == [(3, "requested")] * 6
    assert (after["depth_used"], after["depth_reason"]) == (3, "latency_target")
    assert 'srvit_auto_depth_downgrades_total{model="tiny",reason="overload"}' in metrics
    outcomes = auto_outcomes(metrics)
    assert outcomes["refused"] == sum(a.status_code == 503 for a in auto_answers)
    assert outcomes["overload"] >= sum(b["depth_reason"] == "overload" for b in served) > 0  # probes may add more
    assert sum(outcomes.values()) >= 40


def auto_outcomes(metrics: str) -> dict[str, float]:
    """srvit_auto_depth_requests_total of model tiny by outcome, from an exposition."""
    pattern = r'^srvit_auto_depth_requests_total\{model="tiny",outcome="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, metrics, re.MULTILINE)}


async def test_auto_outcomes_are_exported_from_the_start_and_count_each_auto_request(serving, slowed):
    """The autoscaler's ratio (deploy/kubernetes/) divides by these: every outcome exists before any request."""
    slowed(STEEP)
    async with serving(**IDLE_TARGET) as (_, client):
        before = auto_outcomes((await client.get("/metrics")).text)
        for _ in range(3):  # idle: depth 2, the deepest within the target (depth 3 alone takes 300 ms)
            body = (await client.post("/classify", **raw(depth="auto"))).json()
            assert (body["depth_used"], body["depth_reason"]) == (2, "latency_target")
        await client.post("/classify", **raw(depth=1))  # an explicit depth is no auto decision
        after = auto_outcomes((await client.get("/metrics")).text)
    assert before == {"latency_target": 0.0, "overload": 0.0, "refused": 0.0}
    assert after == {"latency_target": 3.0, "overload": 0.0, "refused": 0.0}  # below the max, but not for load


async def _until_deepest(client, timeout_s: float = 10.0) -> dict:
    """Auto requests one at a time until the server is back at depth 3 (the hold is 0.3 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = (await client.post("/classify", **raw(depth="auto"))).json()
        if body["depth_used"] == 3 or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


async def test_default_depth_auto_is_a_setting(serving, slowed):
    slowed(STEEP)
    async with serving(**IDLE_TARGET, default_depth="auto") as (_, client):
        body = (await client.post("/classify", **raw())).json()
        models = (await client.get("/v1/models")).json()["models"][0]
    assert (body["depth_requested"], body["depth_used"], body["depth_reason"]) == (None, 2, "latency_target")
    assert models["default_depth"] == "auto"


async def test_time_spent_before_the_device_queue_counts_toward_the_target(serving, slowed, monkeypatch):
    """Backed-up decoding leaves the device queue empty while a request is already late: it is served shallower,
    but one slow request does not move the server-wide auto depth."""
    slowed(10)  # an idle device: depth 1, 2, 3 take 10, 20, 30 ms, plus a 2 ms batch window
    # Every image through the decoding pool (none decoded on the event loop), where the slow decode below sits.
    settings = {"latency_target_ms": 100, "max_queue_delay_ms": 2, "auto_step_up_hold_s": 60,
                "inline_decode_max_pixels": 0}  # fmt: skip
    async with serving(**settings) as (_, client):
        fast = (await client.post("/classify", **raw(depth="auto"))).json()
        decode = service.preprocess.Preprocessor.__call__

        def slow_decode(self, data):
            time.sleep(0.07)  # 70 ms before the queue: depth 3 (70 + 32 ms) would miss 100 ms
            return decode(self, data)

        monkeypatch.setattr(service.preprocess.Preprocessor, "__call__", slow_decode)
        late = (await client.post("/classify", **raw(depth="auto"))).json()
        model = (await client.get("/v1/models")).json()["models"][0]
    assert (fast["depth_used"], fast["depth_reason"]) == (3, "latency_target")
    assert late["depth_used"] < 3 and late["depth_reason"] == "overload"
    assert late["timing_ms"]["total"] >= 70
    assert model["auto_depth"] == 3


async def test_late_answers_on_the_v2_endpoint_also_step_auto_down(serving, slowed, monkeypatch):
    """A Triton client's requests share the device with /classify: when their answers come back later than the
    target for reasons no forecast sees (here a loop slow to hand the results back), auto steps down for all."""
    slowed(2)  # depth 3 takes 6 ms an image: the forecast alone keeps depth 3
    settings = {"latency_target_ms": 100, "max_queue_delay_ms": 2, "auto_step_up_hold_s": 60}
    async with serving(**settings) as (app, client):
        first = (await client.post("/classify", **raw(depth="auto"))).json()
        batcher = app.state.service.device.batcher
        submit = batcher.submit

        async def late_submit(*args, **kwargs):
            rows = await submit(*args, **kwargs)
            await asyncio.sleep(0.15)  # every answer 150 ms late, after the device: the 100 ms target is missed
            return rows

        monkeypatch.setattr(batcher, "submit", late_submit)
        x = np.zeros((1, 1, 8, 8), dtype=np.float32)
        body = {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
        for _ in range(10):
            assert (await client.post("/v2/models/tiny_d3/infer", json=body)).status_code == 200
        monkeypatch.setattr(batcher, "submit", submit)
        after = (await client.post("/classify", **raw(depth="auto"))).json()
    assert (first["depth_used"], first["depth_reason"]) == (3, "latency_target")
    assert (after["depth_used"], after["depth_reason"]) == (2, "overload")
