"""The heap trimmer: after large bodies, only when no request is in progress, at most once a second."""

from __future__ import annotations

import asyncio

import pytest

from service.heap import MIN_INTERVAL_S, TRIM_AFTER_BYTES, HeapTrimmer, _malloc_trim

MiB = 1024 * 1024
pytestmark = pytest.mark.anyio


def trimmer(now: list[float]) -> tuple[HeapTrimmer, list[int]]:
    calls: list[int] = []
    heap = HeapTrimmer(clock=lambda: now[0])
    heap._trim = calls.append  # the real malloc_trim returns pages; this one counts the calls
    return heap, calls


async def test_a_trim_waits_for_enough_released_bytes_and_an_idle_server():
    now = [100.0]
    heap, calls = trimmer(now)
    heap.released(TRIM_AFTER_BYTES - 1, idle=True)  # not enough yet
    heap.released(8 * MiB, idle=False)  # enough, but requests are in progress: mid-burst
    await asyncio.sleep(0.05)
    assert calls == []
    heap.released(1000, idle=True)
    await asyncio.sleep(0.05)
    assert calls == [0] and heap.trims == 1


async def test_trims_are_at_most_once_a_second():
    now = [100.0]
    heap, calls = trimmer(now)
    heap.released(TRIM_AFTER_BYTES, idle=True)
    heap.released(TRIM_AFTER_BYTES, idle=True)  # the same instant: too soon
    now[0] += MIN_INTERVAL_S
    heap.released(0, idle=True)  # the bytes held back last time count now
    await asyncio.sleep(0.05)
    assert calls == [0, 0]


def test_glibc_s_malloc_trim_is_found_on_this_machine():
    """The images and CI run Debian: without it, the trimmer would silently do nothing there."""
    assert _malloc_trim() is not None
