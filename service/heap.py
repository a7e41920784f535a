"""Giving freed heap memory back to the operating system once large request bodies are gone (glibc only)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 16 * 1024 * 1024  # of bodies released since the last trim
MIN_INTERVAL_S = 1.0  # malloc_trim walks every arena: at most once a second


def _malloc_trim():
    """glibc's malloc_trim, or None on another C library (musl, macOS), where there is nothing to call."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """glibc keeps freed memory in its arenas for reuse, so after a burst of large bodies the resident size
    stays wherever the burst left it. Once TRIM_AFTER_BYTES of bodies have been released, the next moment no
    request is in progress (`is_idle`) returns the free pages: never mid-burst (they would only be taken again).
    A trim due less than MIN_INTERVAL_S after the last one is put off until then, not dropped: the end of a
    burst is exactly when it pays. It runs off the event loop (ctypes releases the GIL): a few milliseconds."""

    def __init__(self, is_idle: Callable[[], bool], clock=time.monotonic):
        self._trim, self._is_idle, self._clock = _malloc_trim(), is_idle, clock
        self._released, self._last, self._later = 0, float("-inf"), None
        self.trims = 0

    def released(self, size_bytes: int) -> None:
        """Call on the event loop when a request that held `size_bytes` of body ends."""
        self._released += size_bytes
        self._maybe_trim()

    def _put_off_over(self) -> None:
        self._later = None
        self._maybe_trim()

    def _maybe_trim(self) -> None:
        if self._trim is None or self._released < TRIM_AFTER_BYTES or not self._is_idle():
            return
        wait_s = self._last + MIN_INTERVAL_S - self._clock()
        if wait_s > 0:
            if self._later is None:
                self._later = asyncio.get_running_loop().call_later(wait_s, self._put_off_over)
            return
        self._released, self._last = 0, self._clock()
        self.trims += 1
        asyncio.get_running_loop().run_in_executor(None, self._timed_trim)

    def _timed_trim(self) -> None:
        started = time.perf_counter()
        self._trim(0)
        log.debug("heap trimmed in %.1f ms", (time.perf_counter() - started) * 1000)
