"""One device (a GPU, or the CPU): its single inference thread, the batcher feeding it, its runtimes and profiles."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batcher import Batcher, Key, Observer
from service.errors import NotReady
from service.forecast import Running
from service.profile import LatencyProfile
from service.runtime import Runtime

log = logging.getLogger(__name__)
STOP_WAIT_S = 5.0  # at stop, how long a batch still running may take before the device counts as hung


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

    def __init__(self, max_queue_delay_ms: float, max_queue_images: int, observer: Observer | None = None,
                 timeout_s: float = math.inf):  # fmt: skip
        self.runtimes: dict[Key, Runtime] = {}
        self.limits: dict[Key, int] = {}
        self.profiles: dict[str, LatencyProfile] = {}
        self.running: Running | None = None
        self._stopped = False
        self.timeout_s = timeout_s  # a batch running longer means the device hung
        self.hung = False
        self._inflight: asyncio.Future | None = None  # the running batch's call on the device thread
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
            logits = await self._watched(self.call(self.runtimes[key].run, images), key, len(images))
        finally:
            self.running = None
        run_s = loop.time() - started
        self.profiles[key[0]].observe(key[1], len(images), run_s * 1000)
        rows = np.empty(len(logits), row_dtype(logits.shape[1]))
        rows["logits"], rows["started"], rows["run_s"] = logits, started, run_s
        return rows

    async def _watched(self, run: Awaitable[np.ndarray], key: Key, size: int) -> np.ndarray:
        """The batch, or after `timeout_s` the verdict that the device hung (a driver stall): its thread cannot
        be interrupted, so the batcher halts: this batch and everything queued get 503 at once, new requests
        are refused, and liveness fails, so the orchestrator restarts the process."""
        self._inflight = asyncio.ensure_future(run)
        try:
            return await asyncio.wait_for(asyncio.shield(self._inflight), self.timeout_s)
        except TimeoutError:
            self.hung = True
            log.error("device hung: a batch of %d for %s ran past device_timeout_s (%g s); restart needed", size, key,
                      self.timeout_s)  # fmt: skip
            error = NotReady(f"the device hung (a batch ran past {self.timeout_s:g} s): retry on another instance")
            self.batcher.halt(error)
            raise error from None

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
        if self._inflight is not None and not self._inflight.done():  # a batch the stop cut short
            await asyncio.wait({self._inflight}, timeout=min(self.timeout_s, STOP_WAIT_S))
            if not self._inflight.done():
                self.hung = True
                log.error("device still busy %g s after stopping: treated as hung", min(self.timeout_s, STOP_WAIT_S))
        if not self.hung:  # a hung thread never takes the next call
            await self.call(self._close_runtimes)
        self.executor.shutdown(wait=False)

    def _close_runtimes(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes.clear()
