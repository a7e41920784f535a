"""A device that hangs (a driver stall): after device_timeout_s its batch and the queue get 503 at once, new
requests are refused, and liveness fails so that the orchestrator restarts the process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sample_images import png

import service.loading
from service.repository import RepositoryError

pytestmark = pytest.mark.anyio


class Hanging:
    """A runtime that stalls once `stall` is set, until `release` (as a wedged GPU driver would, minus the end)."""

    def __init__(self, inner, stall: threading.Event, release: threading.Event):
        self.inner, self.stall, self.release, self.provider = inner, stall, release, inner.provider

    def run(self, images):
        if self.stall.is_set():
            self.release.wait(30)
        return self.inner.run(images)

    def close(self):
        self.inner.close()


@pytest.fixture
def hanging(monkeypatch):
    stall, release = threading.Event(), threading.Event()
    real = service.loading.open_runtime
    monkeypatch.setattr(service.loading, "open_runtime", lambda *args: Hanging(real(*args), stall, release))
    yield stall
    release.set()  # let the stuck thread go, so the test process can exit


def raw(depth: int = 3) -> dict:
    return {"params": {"depth": depth}, "content": png(), "headers": {"Content-Type": "image/png"}}


async def test_a_batch_past_device_timeout_fails_fast_and_the_server_asks_to_be_restarted(serving, hanging):
    async with serving(device_timeout_s=0.5, max_queue_delay_ms=0) as (_, client):
        assert (await client.post("/classify", **raw())).status_code == 200  # healthy first
        hanging.set()
        t0 = time.monotonic()
        stuck = asyncio.create_task(client.post("/classify", **raw()))
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(client.post("/classify", **raw(depth=1)))
        stuck_answer, queued_answer = await stuck, await queued
        waited = time.monotonic() - t0
        live, ready = await client.get("/healthz"), await client.get("/readyz")
        later = await client.post("/classify", **raw())
        metrics = (await client.get("/metrics")).text
    assert (stuck_answer.status_code, stuck_answer.json()["code"]) == (503, "not_ready")
    assert "device hung" in stuck_answer.json()["error"]
    assert (queued_answer.status_code, queued_answer.json()["code"]) == (503, "not_ready")
    assert 0.5 <= waited < 3  # the timeout, not the stall's 30 s
    assert live.status_code == 500 and "restart" in live.json()["error"]
    assert ready.status_code == 503 and later.status_code == 503
    assert "srvit_ready 0.0" in metrics


class FailingOnce:
    """A runtime whose next batch raises once `fail` is set, then recovers."""

    def __init__(self, inner, fail: threading.Event):
        self.inner, self.fail, self.provider = inner, fail, inner.provider

    def run(self, images):
        if self.fail.is_set():
            self.fail.clear()
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.run(images)

    def close(self):
        self.inner.close()


async def test_a_failing_batch_fails_only_its_requests_with_500_and_the_next_batch_succeeds(serving, monkeypatch):
    fail = threading.Event()
    real = service.loading.open_runtime
    monkeypatch.setattr(service.loading, "open_runtime", lambda *args: FailingOnce(real(*args), fail))
    async with serving(max_queue_delay_ms=0) as (_, client):
        fail.set()
        broken = await client.post(
            "/classify", **raw() | {"headers": {"Content-Type": "image/png", "X-Request-ID": "r-1"}}
        )
        after = await client.post("/classify", **raw())
        live = await client.get("/healthz")
    body = broken.json()
    assert (broken.status_code, body["code"], body["request_id"]) == (500, "internal", "r-1")
    assert "illegal memory" not in body["error"]  # the cause is logged, never shown
    assert after.status_code == 200 and live.status_code == 200


async def test_a_device_timeout_a_full_batch_could_reach_stops_start_up_with_what_to_change(serving, slowed):
    """Depth 3 at 30 ms an image: a batch of 4 takes 120 ms, more than half of a 0.2 s watchdog."""
    slowed(10)
    with pytest.raises(RepositoryError, match=r"tiny depth 3: a batch of 4 took \d+ ms .* SRVIT_DEVICE_TIMEOUT_S"):
        async with serving(device_timeout_s=0.2, warmup_batch_sizes=(1, 4), max_batch_size=4):
            pass
