"""The heap trimmer: after large bodies, only when no request is in progress, at most once a second, and a
trim that comes too soon is put off, not dropped."""

from __future__ import annotations

import asyncio

import pytest

from service.heap import MIN_INTERVAL_S, TRIM_AFTER_BYTES, HeapTrimmer, _malloc_trim

MiB = 1024 * 1024
pytestmark = pytest.mark.anyio


def trimmer(now: list[float], idle: list[bool]) -> tuple[HeapTrimmer, list[int]]:
    calls: list[int] = []
    heap = HeapTrimmer(is_idle=lambda: idle[0], clock=lambda: now[0])
    heap._trim = calls.append  # the real malloc_trim returns pages; this one counts the calls
    return heap, calls


async def test_a_trim_waits_for_enough_released_bytes_and_an_idle_server():
    now, idle = [100.0], [True]
    heap, calls = trimmer(now, idle)
    heap.released(TRIM_AFTER_BYTES - 1)  # not enough yet
    idle[0] = False
    heap.released(8 * MiB)  # enough, but requests are in progress: mid-burst
    await asyncio.sleep(0.05)
    assert calls == []
    idle[0] = True
    heap.released(1000)
    await asyncio.sleep(0.05)
    assert calls == [0] and heap.trims == 1


async def test_a_trim_due_too_soon_after_the_last_runs_once_the_interval_has_passed():
    now, idle = [100.0], [True]
    heap, calls = trimmer(now, idle)
    heap.released(TRIM_AFTER_BYTES)
    await asyncio.sleep(0.05)
    heap.released(TRIM_AFTER_BYTES)  # the same instant: too soon, put off for MIN_INTERVAL_S
    heap.released(TRIM_AFTER_BYTES)  # still one put-off trim, not two
    await asyncio.sleep(0.05)
    assert calls == [0]
    now[0] += MIN_INTERVAL_S
    await asyncio.sleep(MIN_INTERVAL_S + 0.1)  # the loop's own timer fires
    assert calls == [0, 0] and heap.trims == 2


def test_glibc_s_malloc_trim_is_found_on_this_machine():
    """The images and CI run Debian: without it, the trimmer would silently do nothing there."""
    assert _malloc_trim() is not None
