"""Predicted device time: latency profiles and a read-only view of the device's queues, nothing else."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from service.autodepth import Forecast
from service.batcher import Key
from service.profile import LatencyProfile


@dataclass(frozen=True)
class Running:
    key: Key
    size: int
    started: float  # loop.time()


class QueueView(Protocol):
    """What the forecaster reads of a device, never changes: batch limits, profiles, queues, the running batch."""

    limits: Mapping[Key, int]
    profiles: Mapping[str, LatencyProfile]
    running: Running | None

    def queue_images(self, key: Key) -> int: ...


class Forecaster:
    """Completion times for depth=auto and Retry-After. Pure reads: forecasting a request changes nothing."""

    def __init__(self, view: QueueView, max_queue_delay_ms: float):
        self.view = view
        self.max_queue_delay_ms = max_queue_delay_ms

    def cost_ms(self, key: Key, images: int) -> float:
        """Predicted device time for `images` of one key, in full batches and a remainder."""
        if images <= 0:
            return 0.0
        limit, predict = self.view.limits[key], self.view.profiles[key[0]].predict_ms
        full, rest = divmod(images, limit)
        return full * predict(key[1], limit) + (predict(key[1], rest) if rest else 0.0)

    def backlog_ms(self, joining: Key | None = None, images: int = 0) -> float:
        """Device time until a request of `images` for `joining` would be done, if queued now: the rest of
        the running batch, every queued image of every key, and its own images batched with its key's queue."""
        ahead = self._running_left_ms()
        for key in self.view.limits:
            extra = images if key == joining else 0
            ahead += self.cost_ms(key, self.view.queue_images(key) + extra)
        return ahead

    def queue_wait_ms(self, key: Key, images: int) -> float:
        """Predicted time a request of `images` for `key`, queued now, waits for the work ahead of it on the
        device (its own cost taken out). The batch window is not counted: it is a wait the settings chose."""
        return max(0.0, self.backlog_ms(key, images) - self.cost_ms(key, images))

    def _running_left_ms(self) -> float:
        running = self.view.running
        if running is None:
            return 0.0
        elapsed_ms = (asyncio.get_running_loop().time() - running.started) * 1000
        return max(0.0, self.cost_ms(running.key, running.size) - elapsed_ms)

    def forecast(self, model: str, depths: list[int], images: int, spent_ms: float = 0.0) -> Forecast:
        """Completion time of a request at each depth, counted from its arrival `spent_ms` ago: queued now,
        vs its own cost on an idle device. The time spent before the device queue (waiting for the event loop
        and the decoding pool) counts: when those back up, the device queue can stay short while requests
        are already late. The batch window counts as waiting because a request alone waits it out."""
        loaded = {d: spent_ms + self.max_queue_delay_ms + self.backlog_ms((model, d), images) for d in depths}
        return Forecast(loaded, self.idle_ms(model, depths, images), spent_ms)

    def idle_ms(self, model: str, depths: list[int], images: int) -> dict[int, float]:
        """Completion time at each depth on an idle device (the batch window and its own cost), without reading
        the queues."""
        return {d: self.max_queue_delay_ms + self.cost_ms((model, d), images) for d in depths}

    def retry_after_s(self) -> float:
        """Whole seconds until the work queued now is done; the Retry-After of an overloaded answer."""
        return float(max(1, math.ceil(self.backlog_ms() / 1000)))
