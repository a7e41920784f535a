"""Latency profile of one model: measured ms per (depth, batch size), predicted in between, corrected online."""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np

CORRECTION_SMOOTHING = 0.1  # weight of the newest batch in the measured/predicted ratio
CORRECTION_CLAMP = (0.25, 4.0)  # one stalled batch (a GC pause, a page fault storm) moves it only so far


class LatencyProfile:
    """What depth=auto and the queue forecasts rely on.

    Warm-up measures a few batch sizes per depth on an idle device; between them the time is interpolated
    linearly, beyond the largest it grows with the slope of the last two points. Live batches then correct
    each depth by a smoothed ratio of measured to predicted time, so a device slowed by a neighbour (or
    faster once caches are warm) is forecast as it is now, not as it was at start-up.
    """

    def __init__(self):
        self._points: dict[int, dict[int, float]] = {}
        self._sizes: dict[int, list[int]] = {}  # each depth's measured batch sizes, ascending
        self._correction: dict[int, float] = {}

    def record(self, depth: int, batch_size: int, ms: float) -> None:
        self._points.setdefault(depth, {})[batch_size] = ms
        self._sizes[depth] = sorted(self._points[depth])  # once here, not in every forecast
        self._correction.setdefault(depth, 1.0)

    def predict_ms(self, depth: int, batch_size: int) -> float:
        return self.measured_ms(depth, batch_size) * self._correction[depth]

    def measured_ms(self, depth: int, batch_size: int) -> float:
        """The warm-up curve alone; below the smallest measured batch a batch costs what that one cost."""
        points, sizes = self._points[depth], self._sizes[depth]
        if batch_size <= sizes[0] or len(sizes) == 1:
            return points[sizes[0]] * max(1.0, batch_size / sizes[0])
        i = min(bisect.bisect_left(sizes, batch_size), len(sizes) - 1)
        lo, hi = sizes[i - 1], sizes[i]
        slope = (points[hi] - points[lo]) / (hi - lo)
        return points[lo] + slope * (batch_size - lo)

    def observe(self, depth: int, batch_size: int, ms: float) -> None:
        """Fold one live batch into the depth's correction."""
        expected = self.measured_ms(depth, batch_size)
        if expected > 0:
            a, (low, high) = CORRECTION_SMOOTHING, CORRECTION_CLAMP
            ratio = min(high, max(low, ms / expected))
            self._correction[depth] = (1 - a) * self._correction[depth] + a * ratio

    def to_dict(self) -> dict[str, dict[str, float]]:
        """{depth: {batch size: ms}} as measured at warm-up, JSON-ready."""
        return {str(d): {str(b): round(ms, 3) for b, ms in sorted(p.items())} for d, p in sorted(self._points.items())}


def measure_ms(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, runs: int) -> float:
    """Median of `runs` timed calls after one untimed call (first-call allocations and kernel selection)."""
    run(images)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(images)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def warmup_sizes(requested: Iterable[int], max_batch_size: int) -> list[int]:
    """The requested sizes that fit, plus the batch limit itself, so full batches are measured, never guessed."""
    return sorted({b for b in requested if b <= max_batch_size} | {max_batch_size})
