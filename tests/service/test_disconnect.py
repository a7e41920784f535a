"""A client that hangs up while its images wait: they leave the queue, and the rest of the batch is answered."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batcher import Batcher
from service.body import unless_disconnected
from service.errors import ClientClosedRequest

KEY = ("fashion", 1)


class Connection:
    """The part of a Starlette request that `unless_disconnected` listens to."""

    def __init__(self):
        self.closed = asyncio.Event()

    async def receive(self) -> dict:
        await self.closed.wait()
        return {"type": "http.disconnect"}


def image(i: int) -> np.ndarray:
    return np.full((1, 1, 1, 1), i, np.float32)


def test_a_gone_client_is_dropped_before_its_batch_runs():
    async def body():
        gate, ran = asyncio.Event(), []

        async def run_batch(key, images):
            ran.append(images.ravel().tolist())
            await gate.wait()
            return images.reshape(len(images), 1)

        batcher = Batcher(run_batch, max_batch_size=8, max_queue_delay_ms=0, max_queue_images=64)
        batcher.start()
        blocker = batcher.submit(KEY, image(99))  # occupies the executor until the gate opens
        await asyncio.sleep(0.01)
        connection = Connection()
        kept = batcher.submit(KEY, image(1))
        leaving = asyncio.ensure_future(unless_disconnected(connection, batcher.submit(KEY, image(2))))
        await asyncio.sleep(0.01)
        connection.closed.set()
        with pytest.raises(ClientClosedRequest):
            await leaving
        assert batcher.queue_images(KEY) == 1  # only the kept request still waits
        gate.set()
        assert (await kept).ravel().tolist() == [1.0]
        await blocker
        await batcher.stop()
        return ran

    assert asyncio.run(asyncio.wait_for(body(), 10)) == [[99.0], [1.0]]


def test_the_answer_comes_back_when_the_client_stays():
    async def body():
        connection = Connection()

        async def work():
            await asyncio.sleep(0.01)
            return "answer"

        answer = await unless_disconnected(connection, work())
        connection.closed.set()  # a close after the answer changes nothing
        return answer

    assert asyncio.run(asyncio.wait_for(body(), 10)) == "answer"
