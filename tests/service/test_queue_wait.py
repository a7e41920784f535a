"""Admission bounded by time: max_queue_wait_ms against a runtime slowed to a known cost."""

from __future__ import annotations

import asyncio

import pytest
from test_auto_depth_api import raw

pytestmark = pytest.mark.anyio
LIMIT_MS, IMAGE_MS = 200, 60  # depth 3 of the slowed runtime: 60 ms an image, batches of one


async def test_requests_that_would_wait_past_the_limit_are_refused_and_no_answer_waited_longer(serving, slowed):
    slowed(IMAGE_MS / 3)  # depth d costs d * 20 ms: depth 3 is 60 ms
    settings = {"max_queue_wait_ms": LIMIT_MS, "max_batch_size": 1, "max_queue_delay_ms": 0, "warmup_runs": 1}
    async with serving(**settings) as (_, client):
        answers = await asyncio.gather(*[client.post("/classify", **raw(depth=3)) for _ in range(20)])
        after = await client.post("/classify", **raw(depth=3))  # the queue has drained: admitted again
        metrics = (await client.get("/metrics")).text
    served = [a.json() for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    waits = sorted(b["timing_ms"]["queue"] for b in served)
    print(f"{len(served)} served, {len(refused)} refused; queue waits ms {waits}")
    assert served and refused
    assert max(waits) <= LIMIT_MS + IMAGE_MS + 30  # the limit plus one batch, and scheduling slack
    for r in refused:
        assert (r.status_code, r.json()["code"]) == (503, "overloaded") and int(r.headers["retry-after"]) >= 1
        assert "max_queue_wait_ms" in r.json()["error"]
    assert after.status_code == 200
    assert f'srvit_rejections_total{{model="tiny",reason="queue_wait"}} {float(len(refused))}' in metrics
