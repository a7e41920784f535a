"""One health module for both surfaces: /healthz and /v2/health/live, /readyz and V2 readiness, listing and
metadata, give the same answer from the same state, starting, draining and after an executor crash."""

from __future__ import annotations

import asyncio

import pytest
from sample_images import png

pytestmark = pytest.mark.anyio

READINESS = ("/readyz", "/v2/health/ready", "/v2/models/tiny/ready")
DESCRIPTIONS = ("/v1/models", "/v2/models/tiny", "/v2/models/tiny_d2")
LIVENESS = ("/healthz", "/v2/health/live")


async def statuses(client, paths) -> list[int]:
    return [(await client.get(path)).status_code for path in paths]


async def test_ready_server_answers_every_surface(serving):
    async with serving() as (_, client):
        assert await statuses(client, READINESS + DESCRIPTIONS + LIVENESS) == [200] * 8


async def test_draining_server_is_live_unready_still_describes_its_models_and_refuses_inference(serving):
    async with serving() as (app, client):
        await app.state.service.drain()
        ready, described, live = [await statuses(client, p) for p in (READINESS, DESCRIPTIONS, LIVENESS)]
        classify = await client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        v2 = await client.post("/v2/models/tiny/infer", json={"inputs": []})
    assert ready == [503] * 3 and described == [200] * 3 and live == [200] * 2
    assert [(r.status_code, r.json()["code"]) for r in (classify, v2)] == [(503, "not_ready")] * 2


async def test_starting_server_is_live_and_neither_ready_nor_describing(serving):
    async with serving(start=False) as (_, client):
        ready, described, live = [await statuses(client, p) for p in (READINESS, DESCRIPTIONS, LIVENESS)]
    assert ready == [503] * 3 and described == [503] * 3 and live == [200] * 2


async def test_after_an_executor_crash_both_liveness_surfaces_say_restart(serving, monkeypatch):
    def bug(key):
        raise RuntimeError("a bug inside the executor loop")

    async with serving() as (app, client):
        monkeypatch.setattr(app.state.service.device.batcher, "_urgency", bug)
        await client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        live = [await client.get(path) for path in LIVENESS]
        ready = await statuses(client, READINESS)
        tensor = {"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}
        v2 = await client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
        classify = await client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
    assert [r.status_code for r in live] == [500, 500] and all("restart" in r.json()["error"] for r in live)
    assert ready == [503] * 3
    assert [(r.status_code, r.json()["code"]) for r in (classify, v2)] == [(503, "not_ready")] * 2  # the batch: 500
    assert all("restart" in r.json()["error"] for r in (classify, v2))  # refused at admission, saying why


async def test_leaving_server_is_unready_but_serves_until_the_delay_ends_then_refuses(serving):
    """SIGTERM's first step (Service.leave): balancers see unready while requests routed here are still served."""
    async with serving(shutdown_delay_s=60) as (app, client):
        svc = app.state.service
        leaving = asyncio.create_task(svc.leave())
        while svc.state != "leaving":
            await asyncio.sleep(0.001)
        ready, described, live = [await statuses(client, p) for p in (READINESS, DESCRIPTIONS, LIVENESS)]
        served = await client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        assert svc.cut_delay_short() and not leaving.done()
        await asyncio.wait_for(leaving, 10)  # the 60 s delay, cut short: drained
        refused = await client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
    assert ready == [503] * 3 and described == [200] * 3 and live == [200] * 2
    assert served.status_code == 200 and (refused.status_code, refused.json()["code"]) == (503, "not_ready")
    assert svc.cut_delay_short() is False  # nothing left to cut
