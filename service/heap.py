"""Giving freed heap memory back to the operating system once large request bodies are gone (glibc only)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

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
    request is in progress returns the free pages: never mid-burst (they would only be taken again). It runs
    off the event loop (ctypes releases the GIL): a trim of a few hundred MiB of heap takes milliseconds."""

    def __init__(self, clock=time.monotonic):
        self._trim, self._clock = _malloc_trim(), clock
        self._released, self._last = 0, float("-inf")
        self.trims = 0

    def released(self, size_bytes: int, idle: bool) -> None:
        self._released += size_bytes
        if self._trim is None or not idle or self._released < TRIM_AFTER_BYTES:
            return
        if self._clock() - self._last >= MIN_INTERVAL_S:
            self._released, self._last = 0, self._clock()
            self.trims += 1
            asyncio.get_running_loop().run_in_executor(None, self._timed_trim)

    def _timed_trim(self) -> None:
        started = time.perf_counter()
        self._trim(0)
        log.debug("heap trimmed in %.1f ms", (time.perf_counter() - started) * 1000)
