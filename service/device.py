"""One device (a GPU, or the CPU): its single inference thread, the batcher feeding it, and its work forecast."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.autodepth import Forecast
from service.batcher import Batcher, Key, Observer
from service.profile import LatencyProfile
from service.runtime import Runtime


@dataclass(frozen=True)
class Running:
    key: Key
    size: int
    started: float  # loop.time()


def row_dtype(classes: int) -> np.dtype:
    """A batch's output rows carry their batch's timing, so each caller learns its own queue and run time
    from the rows the batcher hands back, without the batcher knowing about timing."""
    return np.dtype([("logits", np.float32, (classes,)), ("started", np.float64), ("run_s", np.float64)])


class Device:
    """Runs one batch at a time in one thread: a GPU or an ONNX Runtime session already parallelizes inside
    a batch, and a second concurrent batch would only make both slower and the forecast wrong.

    Every (model, depth) key has a runtime, a batch limit and its model's latency profile.
    """

    def __init__(self, max_queue_delay_ms: float, max_queue_images: int, observer: Observer | None = None):
        self.runtimes: dict[Key, Runtime] = {}
        self.limits: dict[Key, int] = {}
        self.profiles: dict[str, LatencyProfile] = {}
        self.running: Running | None = None
        self._stopped = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="srvit-device")
        self.max_queue_delay_ms = max_queue_delay_ms
        self.batcher = Batcher(self._run_batch, max_batch_size=self.limits.__getitem__,
                               max_queue_delay_ms=max_queue_delay_ms, max_queue_images=max_queue_images,
                               observer=observer)  # fmt: skip

    def add(self, key: Key, runtime: Runtime, limit: int, profile: LatencyProfile) -> None:
        self.runtimes[key], self.limits[key], self.profiles[key[0]] = runtime, limit, profile

    async def call(self, fn: Callable, *args):
        """Run `fn` on the device thread: loading and warm-up happen where inference will (CUDA contexts)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run_batch(self, key: Key, images: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.running = Running(key, len(images), started)
        try:
            logits = await self.call(self.runtimes[key].run, images)
        finally:
            self.running = None
        run_s = loop.time() - started
        self.profiles[key[0]].observe(key[1], len(images), run_s * 1000)
        rows = np.empty(len(logits), row_dtype(logits.shape[1]))
        rows["logits"], rows["started"], rows["run_s"] = logits, started, run_s
        return rows

    # -- forecasting ------------------------------------------------------------------------------

    def cost_ms(self, key: Key, images: int) -> float:
        """Predicted device time for `images` of one key, in full batches and a remainder."""
        if images <= 0:
            return 0.0
        limit, predict = self.limits[key], self.profiles[key[0]].predict_ms
        full, rest = divmod(images, limit)
        return full * predict(key[1], limit) + (predict(key[1], rest) if rest else 0.0)

    def backlog_ms(self, joining: Key | None = None, images: int = 0) -> float:
        """Device time until a request of `images` for `joining` would be done, if queued now: the rest of
        the running batch, every queued image of every key, and its own images batched with its key's queue."""
        ahead = self._running_left_ms()
        for key in self.limits:
            extra = images if key == joining else 0
            ahead += self.cost_ms(key, self.batcher.queue_images(key) + extra)
        return ahead

    def _running_left_ms(self) -> float:
        running = self.running
        if running is None:
            return 0.0
        elapsed_ms = (asyncio.get_running_loop().time() - running.started) * 1000
        return max(0.0, self.cost_ms(running.key, running.size) - elapsed_ms)

    def forecast(self, model: str, depths: list[int], images: int, spent_ms: float = 0.0) -> Forecast:
        """Completion time of a request at each depth, counted from its arrival `spent_ms` ago: queued now,
        vs its own cost on an idle device. The time spent before the device queue (waiting for the event loop
        and the decoding pool) counts: when those back up, the device queue can stay short while requests
        are already late. The batch window counts as waiting because a request alone waits it out."""
        delay = self.max_queue_delay_ms
        loaded = {d: spent_ms + delay + self.backlog_ms((model, d), images) for d in depths}
        idle = {d: delay + self.cost_ms((model, d), images) for d in depths}
        return Forecast(loaded, idle, spent_ms)

    def retry_after_s(self) -> float:
        """Whole seconds until the work queued now is done; the Retry-After of an overloaded answer."""
        return float(max(1, math.ceil(self.backlog_ms() / 1000)))

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()

    async def stop(self, drain: bool, timeout_s: float) -> None:
        """Finish (or fail) queued and running work, then release the runtimes on their own thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.batcher.running:
            await self.batcher.stop(drain=drain, timeout_s=timeout_s)
        await self.call(self._close_runtimes)
        self.executor.shutdown(wait=False)

    def _close_runtimes(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes.clear()
