"""service.batcher without a server: batch formation, ordering, failures, cancellation, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest

from service.batcher import Batcher, Observer
from service.errors import DeadlineExceeded, InferenceFailed, InvalidParameter, NotReady, Overloaded

A, B = ("fashion", 1), ("fashion", 2)


def images(*ids: int) -> np.ndarray:
    """[n, 1, 1, 1] images whose single pixel is an id, so outputs can be traced back to requests."""
    return np.asarray(ids, np.float32).reshape(-1, 1, 1, 1)


def ids(rows: np.ndarray) -> list[int]:
    return [int(v) for v in rows.reshape(len(rows), -1)[:, 0]]


class Device:
    """Fake run_batch: records (key, ids) per batch, answers each image's id, can be held, slowed and made to fail."""

    def __init__(self, fail_batches: tuple[int, ...] = (), error: Exception | None = None, hold: bool = False,
                 run_s: float = 0.0):  # fmt: skip
        self.batches: list[tuple[tuple, list[int]]] = []
        self.fail_batches, self.error = fail_batches, error or RuntimeError("device fell over")
        self.run_s = run_s  # each batch takes at least this long once the gate is open
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        if not hold:
            self.gate.set()

    async def __call__(self, key, batch: np.ndarray) -> np.ndarray:
        self.batches.append((key, ids(batch)))
        self.started.set()
        await self.gate.wait()
        if self.run_s:
            await asyncio.sleep(self.run_s)
        if len(self.batches) in self.fail_batches:
            raise self.error
        return batch.reshape(len(batch), -1)[:, :1] * 1.0  # [n, 1]: the ids

    def seen(self) -> list[int]:
        return [i for _, batch in self.batches for i in batch]


class Events(Observer):
    def __init__(self):
        self.batches, self.rejects, self.drops, self.errors = [], [], [], []

    def on_batch(self, key, size, queue_wait_s, run_s):
        self.batches.append((key, size, list(queue_wait_s), run_s))

    def on_error(self, key, size, error):
        self.errors.append((key, size, error))

    def on_reject(self, key, reason):
        self.rejects.append((key, reason))

    def on_drop(self, key, reason):
        self.drops.append((key, reason))


@asynccontextmanager
async def batcher(device: Device, **kw):
    settings = {"max_batch_size": 8, "max_queue_delay_ms": 20, "max_queue_images": 64, **kw}
    b = Batcher(device, **settings)
    b.start()
    try:
        yield b
    finally:
        await b.stop(drain=False, timeout_s=1)


def run(test):
    """Run an async test body with a hard cap, so a bug hangs nothing."""

    @functools.wraps(test)
    def wrapper(*args, **kw):
        asyncio.run(asyncio.wait_for(test(*args, **kw), timeout=10))

    return wrapper


async def hold_device(b: Batcher, device: Device, key=A) -> asyncio.Future:
    """Occupy the executor with a batch (id 99) that runs until device.gate opens."""
    blocker = b.submit(key, images(99))
    await device.started.wait()
    return blocker


@run
async def test_full_batch_closes_without_waiting_for_the_delay():
    device = Device()
    async with batcher(device, max_queue_delay_ms=10_000) as b:
        t0 = time.monotonic()
        results = await asyncio.gather(*(b.submit(A, images(i)) for i in range(8)))
        assert time.monotonic() - t0 < 5  # far below the 10 s window: the size closed the batch
    assert device.batches == [(A, list(range(8)))]
    assert [ids(r) for r in results] == [[i] for i in range(8)]


@run
async def test_lone_request_runs_alone_after_the_delay():
    device, events = Device(run_s=0.1), Events()  # runs twice as long as it waits: the two cannot be confused
    async with batcher(device, max_queue_delay_ms=50, observer=events) as b:
        t0 = time.monotonic()
        assert ids(await b.submit(A, images(7))) == [7]
        assert time.monotonic() - t0 >= 0.045
    assert device.batches == [(A, [7])]
    (key, size, waits, run_s), *_ = events.batches
    assert (key, size) == (A, 1) and waits[0] >= 0.045 and run_s >= 0.095


@run
async def test_depths_never_share_a_batch_and_results_keep_their_order():
    device = Device()
    async with batcher(device) as b:
        futures = [b.submit(A if i % 2 == 0 else B, images(i)) for i in range(12)]
        results = await asyncio.gather(*futures)
    assert [ids(r) for r in results] == [[i] for i in range(12)]
    assert sorted(key for key, _ in device.batches) == [A, B]
    for key, batch in device.batches:
        assert batch == sorted(batch) and {i % 2 for i in batch} == {0 if key == A else 1}


@run
async def test_multi_image_requests_count_as_many_images_and_are_never_split():
    device = Device()
    async with batcher(device, max_queue_delay_ms=50) as b:
        futures = [b.submit(A, images(*range(3 * k, 3 * k + 3))) for k in range(3)]
        results = await asyncio.gather(*futures)
    assert [len(batch) for _, batch in device.batches] == [6, 3]  # a third request of 3 would make 9 > 8
    assert [ids(r) for r in results] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@run
async def test_request_larger_than_a_batch_is_split_and_reassembled_in_order():
    device = Device()
    async with batcher(device) as b:
        result = await b.submit(A, images(*range(20)))
    assert [len(batch) for _, batch in device.batches] == [8, 8, 4]
    assert ids(result) == list(range(20))


@run
async def test_failed_batch_fails_every_caller_in_it_and_only_that_batch():
    device, events = Device(fail_batches=(1,)), Events()
    async with batcher(device, observer=events) as b:
        first = await asyncio.gather(*(b.submit(A, images(i)) for i in range(3)), return_exceptions=True)
        second = await asyncio.gather(*(b.submit(A, images(i)) for i in range(3, 5)))
    assert all(isinstance(e, InferenceFailed) for e in first)
    assert isinstance(first[0].__cause__, RuntimeError) and "Traceback" not in str(first[0])
    assert [ids(r) for r in second] == [[3], [4]]
    assert [(key, size) for key, size, _ in events.errors] == [(A, 3)]


@run
async def test_service_errors_from_run_batch_pass_through_unchanged():
    device = Device(fail_batches=(1,), error=Overloaded("device busy", retry_after_s=3))
    async with batcher(device) as b:
        with pytest.raises(Overloaded) as caught:
            await b.submit(A, images(1))
    assert caught.value.retry_after_s == 3


@run
async def test_wrong_number_of_output_rows_is_an_inference_failure():
    async def short(key, batch):
        return batch[:-1]

    async with batcher(short) as b:
        with pytest.raises(InferenceFailed, match="batch of 2"):
            await asyncio.gather(b.submit(A, images(1)), b.submit(A, images(2)))


@run
async def test_cancelled_request_is_dropped_and_the_rest_of_its_batch_still_answered():
    device, events = Device(hold=True), Events()
    async with batcher(device, observer=events) as b:
        blocker = await hold_device(b, device)
        futures = [b.submit(A, images(i)) for i in (1, 2, 3)]
        futures[1].cancel()
        await asyncio.sleep(0)
        assert b.queue_images(A) == 2  # the slot is freed at once, not when the batch forms
        device.gate.set()
        assert [ids(r) for r in await asyncio.gather(blocker, futures[0], futures[2])] == [[99], [1], [3]]
    assert device.batches[1] == (A, [1, 3])
    assert (A, "cancelled") in events.drops


@run
async def test_deadline_passing_in_the_queue_answers_at_once_and_never_runs():
    device, events = Device(hold=True), Events()
    async with batcher(device, observer=events) as b:
        blocker = await hold_device(b, device)
        loop = asyncio.get_running_loop()
        late = b.submit(A, images(1), deadline=loop.time() + 0.05)
        patient = b.submit(A, images(2))
        with pytest.raises(DeadlineExceeded):
            await late
        assert not device.gate.is_set()  # answered while the slow batch was still running
        assert b.queue_images(A) == 1
        device.gate.set()
        assert ids(await patient) == [2] and ids(await blocker) == [99]
    assert 1 not in device.seen()
    assert (A, "deadline") in events.drops


@run
async def test_deadline_passed_when_the_batch_forms_is_dropped_even_if_its_timer_had_no_chance():
    """A run_batch that blocks the loop keeps the deadline timer from firing; the check at batch time catches it."""
    seen = []

    async def blocking(key, batch):
        seen.extend(ids(batch))
        time.sleep(0.1)  # holds the event loop: no timer runs until the next batch has been taken
        return batch.reshape(len(batch), -1)

    async with batcher(blocking, max_batch_size=1, max_queue_delay_ms=0) as b:
        first = b.submit(A, images(1))
        late = b.submit(A, images(2), deadline=asyncio.get_running_loop().time() + 0.03)
        with pytest.raises(DeadlineExceeded):
            await late
        await first
    assert seen == [1]


@run
async def test_deadline_already_passed_is_refused_without_queueing():
    events = Events()
    async with batcher(Device(), observer=events) as b:
        with pytest.raises(DeadlineExceeded):
            b.submit(A, images(1), deadline=asyncio.get_running_loop().time() - 1)
        assert b.queue_images(A) == 0
    assert events.rejects == [(A, "deadline")]


@run
async def test_full_queue_refuses_at_once_counting_images_per_key():
    device, events = Device(hold=True), Events()
    async with batcher(device, max_queue_images=4, observer=events) as b:
        await hold_device(b, device)
        accepted = [b.submit(A, images(i)) for i in range(4)]
        with pytest.raises(Overloaded) as caught:
            b.submit(A, images(5))
        assert caught.value.retry_after_s >= 1
        accepted.append(b.submit(B, images(6, 7, 8)))  # another key has its own queue
        with pytest.raises(Overloaded):
            b.submit(B, images(9, 10))  # 3 + 2 images > 4
        accepted.append(b.submit(B, images(11)))
        with pytest.raises(InvalidParameter):
            b.submit(B, images(*range(5)))  # could never fit: retrying would not help
        assert (b.queue_images(A), b.queue_images(B), b.pending_images()) == (4, 4, 9)
        device.gate.set()
        await asyncio.gather(*accepted)
    assert [reason for _, reason in events.rejects] == ["queue_full", "queue_full", "too_many_images"]


@run
async def test_earliest_deadline_first_across_keys_and_a_generous_deadline_ranks_as_no_deadline():
    device = Device(hold=True)
    keys = [("m", d) for d in range(1, 5)]
    async with batcher(device, max_queue_delay_ms=0, default_budget_s=5) as b:
        blocker = await hold_device(b, device, key=("other", 1))
        now = asyncio.get_running_loop().time()
        futures = [
            b.submit(keys[0], images(10), deadline=now + 9),  # later than the budget: ranks as now + 5
            b.submit(keys[1], images(20)),  # ranks as now + 5, just after, by arrival
            b.submit(keys[2], images(30)),  # and just after that
            b.submit(keys[3], images(40), deadline=now + 2),
        ]
        device.gate.set()
        await asyncio.gather(blocker, *futures)
    assert [batch for _, batch in device.batches] == [[99], [40], [10], [20], [30]]


@run
async def test_drain_finishes_queued_work_and_refuses_new_submits():
    device = Device(hold=True)
    b = Batcher(device, max_batch_size=2, max_queue_delay_ms=10_000, max_queue_images=64)
    b.start()
    blocker = b.submit(A, images(98, 99))  # a full batch: runs at once and holds the device
    await device.started.wait()
    queued = [b.submit(A, images(i)) for i in range(1, 4)]  # [1, 2] is full; [3] alone would wait 10 s
    t0 = time.monotonic()
    stopping = asyncio.create_task(b.stop(drain=True, timeout_s=5))
    await asyncio.sleep(0)
    with pytest.raises(NotReady):
        b.submit(A, images(9))
    device.gate.set()
    await stopping
    assert time.monotonic() - t0 < 5  # draining closed the last partial batch instead of waiting it out
    assert [ids(r) for r in await asyncio.gather(blocker, *queued)] == [[98, 99], [1], [2], [3]]
    assert [batch for _, batch in device.batches] == [[98, 99], [1, 2], [3]]
    assert not b.running


@run
async def test_stop_without_drain_fails_running_and_queued_work_with_not_ready():
    device = Device(hold=True)
    b = Batcher(device, max_batch_size=8, max_queue_delay_ms=0, max_queue_images=64)
    b.start()
    blocker = await hold_device(b, device)
    queued = [b.submit(A, images(i)) for i in (1, 2)]
    await b.stop(drain=False)
    results = await asyncio.gather(blocker, *queued, return_exceptions=True)
    assert all(isinstance(r, NotReady) for r in results)
    assert device.seen() == [99] and b.pending_images() == 0


@run
async def test_drain_that_runs_out_of_time_fails_the_rest_with_not_ready():
    device = Device(hold=True)  # never released
    b = Batcher(device, max_batch_size=8, max_queue_delay_ms=0, max_queue_images=64)
    b.start()
    blocker = await hold_device(b, device)
    queued = b.submit(A, images(1))
    await b.stop(drain=True, timeout_s=0.1)
    results = await asyncio.gather(blocker, queued, return_exceptions=True)
    assert all(isinstance(r, NotReady) for r in results)


@run
async def test_submit_before_start_is_not_ready():
    b = Batcher(Device(), max_batch_size=8, max_queue_delay_ms=0, max_queue_images=64)
    with pytest.raises(NotReady):
        b.submit(A, images(1))


@run
async def test_a_broken_observer_does_not_break_batching():
    class Broken(Observer):
        def on_batch(self, key, size, queue_wait_s, run_s):
            raise RuntimeError("metrics backend down")

    async with batcher(Device(), observer=Broken()) as b:
        assert ids(await b.submit(A, images(1))) == [1]
        assert ids(await b.submit(A, images(2))) == [2]


@run
async def test_a_crashed_executor_fails_waiting_callers_instead_of_leaving_them_hanging():
    def bug(key):
        raise KeyError(key)

    b = Batcher(Device(), max_batch_size=8, max_queue_delay_ms=0, max_queue_images=64)
    b._urgency = bug  # a bug in batch selection kills the executor task
    b.start()
    with pytest.raises(InferenceFailed):
        await b.submit(A, images(1))
    assert not b.running
    with pytest.raises(NotReady):
        b.submit(A, images(2))


@run
async def test_split_request_fails_whole_when_one_chunk_fails_and_withdraws_the_rest():
    device = Device(fail_batches=(1,), hold=True)
    async with batcher(device) as b:
        whole = b.submit(A, images(*range(20)))  # chunks of 8, 8, 4
        await device.started.wait()
        device.gate.set()
        with pytest.raises(InferenceFailed):
            await whole
        await asyncio.sleep(0)
        assert b.queue_images(A) == 0  # the chunks still queued were withdrawn, not run
    assert [len(batch) for _, batch in device.batches] == [8]


@run
async def test_a_yielding_request_lets_later_work_go_first_but_only_for_its_yield():
    """Priority levels: level 2 yields 0.2 s. Queued behind a busy device, the level-1 requests that arrive
    within 0.2 s after it run first; one that arrives later than that runs after it, so it never starves."""
    device = Device(hold=True)
    async with batcher(device, max_batch_size=1, max_queue_delay_ms=0) as b:
        blocker = await hold_device(b, device)
        low = b.submit(A, images(1), yield_s=0.2)
        high = [b.submit(A, images(i)) for i in (2, 3)]
        await asyncio.sleep(0.3)  # past the low request's yield
        late = b.submit(A, images(4))
        device.gate.set()
        await asyncio.gather(blocker, low, late, *high)
    assert device.seen() == [99, 2, 3, 1, 4]


@run
async def test_yields_reorder_the_queue_but_the_batch_window_counts_from_the_oldest_arrival():
    device = Device()
    async with batcher(device, max_batch_size=8, max_queue_delay_ms=100) as b:
        t0 = time.monotonic()
        first = b.submit(A, images(1), yield_s=5.0)  # queued as if it arrived 5 s later
        await asyncio.sleep(0.05)
        second = b.submit(A, images(2))
        await asyncio.gather(first, second)
        waited = time.monotonic() - t0
    assert device.batches == [(A, [2, 1])] and 0.09 <= waited < 1.0


@run
async def test_work_that_already_waited_rejoins_ahead_of_newer_arrivals_but_waits_out_its_own_window():
    """An adaptive image going deeper (`since` its first queueing) goes ahead of requests queued after that
    time, behind older ones, and its batch window starts when it rejoins, so the deeper batch fills around it."""
    device = Device(hold=True)
    async with batcher(device, max_batch_size=1, max_queue_delay_ms=0) as b:
        blocker = await hold_device(b, device)
        loop = asyncio.get_running_loop()
        first_queued = loop.time()
        older = b.submit(A, images(1))  # queued before the continued image first queued
        await asyncio.sleep(0.02)
        newer = [b.submit(A, images(i)) for i in (2, 3)]
        continued = b.submit(A, images(4), since=first_queued + 0.01)
        device.gate.set()
        await asyncio.gather(blocker, older, continued, *newer)
    assert device.seen() == [99, 1, 4, 2, 3]
    device = Device()
    async with batcher(device, max_batch_size=8, max_queue_delay_ms=100) as b:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        continued = b.submit(A, images(1), since=loop.time() - 5.0)  # waited 5 s elsewhere
        await asyncio.sleep(0.05)
        joining = b.submit(A, images(2))
        rows = await asyncio.gather(continued, joining)
        waited = time.monotonic() - t0
    assert [ids(r) for r in rows] == [[1], [2]] and device.batches == [(A, [1, 2])]  # one batch
    assert 0.09 <= waited < 1.0  # after its own window, not at once for having waited elsewhere
