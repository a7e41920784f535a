"""One device (a GPU, or the CPU): its single inference thread, the batcher feeding it, its runtimes and profiles."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batcher import Batcher, Key, Observer
from service.forecast import Running
from service.profile import LatencyProfile
from service.runtime import Runtime


def row_dtype(classes: int) -> np.dtype:
    """A batch's output rows carry their batch's timing, so each caller learns its own queue and run time
    from the rows the batcher hands back, without the batcher knowing about timing."""
    return np.dtype([("logits", np.float32, (classes,)), ("started", np.float64), ("run_s", np.float64)])


class Device:
    """Runs one batch at a time in one thread: a GPU or an ONNX Runtime session already parallelizes inside
    a batch, and a second concurrent batch would only make both slower and the forecast wrong.

    Every (model, depth) key has a runtime, a batch limit and its model's latency profile. The device is
    the `QueueView` a `Forecaster` reads.
    """

    def __init__(self, max_queue_delay_ms: float, max_queue_images: int, observer: Observer | None = None):
        self.runtimes: dict[Key, Runtime] = {}
        self.limits: dict[Key, int] = {}
        self.profiles: dict[str, LatencyProfile] = {}
        self.running: Running | None = None
        self._stopped = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="srvit-device")
        self.batcher = Batcher(self._run_batch, max_batch_size=self.limits.__getitem__,
                               max_queue_delay_ms=max_queue_delay_ms, max_queue_images=max_queue_images,
                               observer=observer)  # fmt: skip

    def add(self, key: Key, runtime: Runtime, limit: int, profile: LatencyProfile) -> None:
        self.runtimes[key], self.limits[key], self.profiles[key[0]] = runtime, limit, profile

    def queue_images(self, key: Key) -> int:
        return self.batcher.queue_images(key)

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
