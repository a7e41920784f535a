"""Dynamic batching for one device: a bounded queue per (model, depth), one executor loop, one future per caller."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidParameter,
    NotReady,
    Overloaded,
    ServiceError,
)

log = logging.getLogger(__name__)

Key = Hashable  # (model name, depth)
RunBatch = Callable[[Key, np.ndarray], Awaitable[np.ndarray]]

RUN_S_SMOOTHING = 0.2  # weight of the newest batch in the moving average behind Retry-After


class Observer:
    """Metric hooks, so the batcher never imports prometheus: override what you need.

    They run on the event loop and must be quick; an exception in one is logged and ignored.
    Reject reasons: not_ready, too_many_images, deadline, queue_full. Drop reasons: cancelled,
    deadline, shutdown.
    """

    def on_batch(self, key: Key, size: int, queue_wait_s: Sequence[float], run_s: float) -> None:
        """Every batch that ran, failed or not: images in it, each request's wait, time in run_batch."""

    def on_delivered(self, key: Key, size: int, run_s: float) -> None:
        """A batch whose rows reached its callers (before on_batch, which also sees failed batches)."""

    def on_error(self, key: Key, size: int, error: ServiceError) -> None:
        """A batch whose run_batch raised; every request in it got `error`."""

    def on_reject(self, key: Key, reason: str) -> None:
        """A submit refused before it was queued."""

    def on_drop(self, key: Key, reason: str) -> None:
        """A request that left without its rows: its caller cancelled, its deadline passed, or shutdown."""


@dataclass(eq=False)  # identity equality: deque.remove must find this very request
class Request:
    key: Key
    images: np.ndarray  # [n, C, H, W]
    deadline: float | None  # loop.time() seconds
    future: asyncio.Future
    enqueued_at: float  # loop.time() seconds
    order: float  # place in its key's queue: enqueued_at + the time it yields to later work (priority)
    rank: float  # EDF order: the deadline, or order + default_budget_s if that is sooner
    timer: asyncio.TimerHandle | None = None
    queued: bool = True

    @property
    def n(self) -> int:
        return len(self.images)


class Batcher:
    """One device's batcher: `submit` from request handlers, one executor task calls `run_batch`.

    - Batches are homogeneous: one key (model, depth) per batch, since each key is its own graph.
    - A key's batch closes when its queue holds `max_batch_size` images or `max_queue_delay_ms` after the
      oldest queued request arrived. Requests are taken in order and never split across batches, except that
      a request larger than `max_batch_size` is split into `max_batch_size` chunks up front (each queued as
      its own request) and its rows are reassembled in order; if any chunk fails, the whole request fails.
    - The order is arrival (FIFO), except that a request submitted with `yield_s` lets work that arrives up to
      `yield_s` after it go first (how priority levels are served): it is queued as if it had arrived
      `yield_s` later, so it is delayed by at most that much, never starved.
    - The executor picks, among keys with a closed batch, the one whose batch holds the earliest deadline.
      A request without a deadline ranks as if due `default_budget_s` after it arrived (after its yield,
      below, when it has one): among themselves
      such requests go by arrival, and under sustained deadline traffic they still age into service. A
      deadline later than that ranks the same way, so a generous timeout is never served after none.
    - Deadlines are absolute times on the event loop's clock (`loop.time()`, which is `time.monotonic()`
      on asyncio's default loops). A request fails with DeadlineExceeded the moment its deadline passes,
      even while a long batch runs, and a request whose caller is gone (future cancelled) or whose deadline
      passed is removed and never sent to `run_batch`; the rest of its batch is unaffected.
    - Each key's queue holds at most `max_queue_images` images; a submit that would exceed it raises
      Overloaded at once, with a Retry-After estimate from the recent batch time.
    - An exception from `run_batch` fails every request of that batch (ServiceErrors pass through, anything
      else becomes InferenceFailed) and only that batch; the loop goes on with the next one.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int | Callable[[Key], int],
        max_queue_delay_ms: float,
        max_queue_images: int,
        default_budget_s: float = 1.0,
        observer: Observer | None = None,
    ):
        if max_queue_images < 1 or max_queue_delay_ms < 0:
            raise ValueError("need max_queue_images >= 1 and max_queue_delay_ms >= 0")
        self._run_batch = run_batch
        self._limit = max_batch_size if callable(max_batch_size) else (lambda key: max_batch_size)
        self.max_queue_delay_s = max_queue_delay_ms / 1000
        self.max_queue_images = max_queue_images
        self.default_budget_s = default_budget_s
        self.observer = observer or Observer()
        self._queues: dict[Key, deque[Request]] = {}
        self._queued: dict[Key, int] = {}
        self._running_images = 0
        self._run_s: float | None = None  # moving average of run_batch time
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._draining = False

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the executor task on the running loop; submits are refused until then."""
        if self._task is not None:
            raise RuntimeError("Batcher.start() called twice")
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._execute(), name="srvit-batcher")
        self._task.add_done_callback(self._executor_exited)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Refuse new submits with NotReady, then finish queued and running work (`drain`) within
        `timeout_s`, or fail it at once. Whatever is unfinished when this returns has failed with NotReady."""
        self._accepting = False
        if self.running and drain:
            self._draining = True
            self._wakeup.set()
            await asyncio.wait({self._task}, timeout=timeout_s)
        if self.running:
            self._task.cancel()  # the running batch's callers get NotReady
            await asyncio.wait({self._task})
        self._fail_queued(NotReady("the server is shutting down: retry on another instance"))

    def halt(self, error: ServiceError) -> None:
        """The device cannot run batches any more: refuse new submits, fail everything queued with `error`, and
        end the executor after the running batch (whose caller raises). Health then reports the executor gone."""
        self._accepting = False
        self._fail_queued(error)
        if self._task is not None:
            self._task.cancel()

    def _executor_exited(self, task: asyncio.Task) -> None:
        """A crashed executor must not leave callers waiting forever: refuse and fail everything."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batch executor crashed", exc_info=task.exception())
        self._accepting = False
        self._fail_queued(InferenceFailed("the batch executor stopped; the server needs a restart"))

    # -- submitting -------------------------------------------------------------------------------

    def submit(self, key: Key, images: np.ndarray, deadline: float | None = None, *,
               yield_s: float = 0.0, since: float | None = None) -> asyncio.Future:  # fmt: skip
        """Queue `images` [n, C, H, W] for `key`; the future resolves to its n output rows, in order.

        `since` (loop time) places the request in its key's queue as if it had arrived then, ahead of what came
        later: work that already waited in another queue (an adaptive image going deeper) does not queue again
        behind newer arrivals. Its batch window still starts now, so the next batch can fill around it.

        Raises at once (nothing queued): NotReady, InvalidParameter (n > max_queue_images),
        DeadlineExceeded (deadline already passed), Overloaded (the key's queue is full).
        Cancelling the future withdraws the request.
        """
        self._admit(key, images, deadline)
        limit = self._limit(key)
        chunks = range(0, len(images), limit)
        futures = [self._enqueue(key, images[i : i + limit], deadline, yield_s, since) for i in chunks]
        self._wakeup.set()
        return futures[0] if len(futures) == 1 else _joined(futures)

    def _admit(self, key: Key, images: np.ndarray, deadline: float | None) -> None:
        if not isinstance(images, np.ndarray) or images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty [n, C, H, W] array, got {getattr(images, 'shape', images)}")
        n, now = len(images), asyncio.get_running_loop().time()
        if not self._accepting:
            raise self._rejected(key, "not_ready", NotReady("the server is not accepting work now: retry shortly"))
        if n > self.max_queue_images:
            message = f"{n} images in one request; at most {self.max_queue_images} are accepted: send fewer"
            raise self._rejected(key, "too_many_images", InvalidParameter(message))
        if deadline is not None and deadline <= now:
            message = "the request's deadline had passed before it was queued"
            raise self._rejected(key, "deadline", DeadlineExceeded(message))
        if self.queue_images(key) + n > self.max_queue_images:
            retry_after_s = self._retry_after_s(key)
            message = f"the queue for {key} is full: retry in {retry_after_s:.0f} s"
            raise self._rejected(key, "queue_full", Overloaded(message, retry_after_s))

    def _rejected(self, key: Key, reason: str, error: ServiceError) -> ServiceError:
        self._notify("on_reject", key, reason)
        return error

    def _enqueue(self, key: Key, images: np.ndarray, deadline: float | None, yield_s: float,
                 since: float | None = None) -> asyncio.Future:  # fmt: skip
        loop = asyncio.get_running_loop()
        now = loop.time()
        order = (now if since is None else min(since, now)) + yield_s
        # A generous deadline must not rank behind requests that named none: those count as due after the budget.
        rank = order + self.default_budget_s if deadline is None else min(deadline, order + self.default_budget_s)
        req = Request(key, images, deadline, loop.create_future(), now, order, rank)
        if deadline is not None:
            req.timer = loop.call_at(deadline, self._expire, req)
        req.future.add_done_callback(lambda _: self._settled(req))
        queue = self._queues.setdefault(key, deque())
        at = len(queue)
        while at > 0 and queue[at - 1].order > order:  # without yields this is an append
            at -= 1
        queue.insert(at, req)
        self._queued[key] = self._queued.get(key, 0) + req.n
        return req.future

    def _expire(self, req: Request) -> None:
        """Deadline timer: answer 504 on time, even while a long batch runs or the request waits."""
        if not req.future.done():
            waited = asyncio.get_running_loop().time() - req.enqueued_at
            req.future.set_exception(
                DeadlineExceeded(f"the deadline passed after {waited:.3f} s: allow more time or ask for less depth")
            )

    def _settled(self, req: Request) -> None:
        """Every request's future ends here: free its queue slot at once and count it if it was dropped."""
        if req.timer is not None:
            req.timer.cancel()
        if req.queued:
            self._unqueue(req)
            self._queues[req.key].remove(req)
        reason = _drop_reason(req.future)
        if reason is not None:
            self._notify("on_drop", req.key, reason)

    def _unqueue(self, req: Request) -> None:
        req.queued = False
        self._queued[req.key] -= req.n

    # -- introspection ----------------------------------------------------------------------------

    def queue_images(self, key: Key) -> int:
        """Images queued for `key`, not counting a running batch."""
        return self._queued.get(key, 0)

    def pending_images(self) -> int:
        """Images this device still has to run: every key's queue plus the running batch."""
        return sum(self._queued.values()) + self._running_images

    def _retry_after_s(self, key: Key) -> float:
        """Time to work off what is ahead on this device, in whole seconds (at least 1) for Retry-After."""
        batches = math.ceil(self.pending_images() / max(1, self._limit(key)))
        return float(max(1, math.ceil(batches * (self._run_s or 0.0))))

    # -- executing --------------------------------------------------------------------------------

    async def _execute(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._run(*batch)
            await asyncio.sleep(0)  # let done-callbacks (cancellations, withdrawn chunks) run before the next take

    async def _next_batch(self) -> tuple[Key, list[Request]] | None:
        """Wait for a closed batch and take it; None once draining has emptied every queue."""
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            now = loop.time()
            ready = [key for key, queue in self._queues.items() if queue and self._closed(key, queue, now)]
            if ready:
                key = min(ready, key=self._urgency)
                batch = self._take(key, now)
                if batch:
                    return key, batch
                continue  # everything taken was dead: look again
            if self._draining and not any(self._queues.values()):
                return None
            await self._sleep(self._next_close_at(), loop)

    def _closed(self, key: Key, queue: deque[Request], now: float) -> bool:
        full = self._queued[key] >= self._limit(key)
        return self._draining or full or now >= _oldest(queue) + self.max_queue_delay_s

    def _next_close_at(self) -> float | None:
        oldest = [_oldest(queue) for queue in self._queues.values() if queue]
        return min(oldest) + self.max_queue_delay_s if oldest else None

    async def _sleep(self, until: float | None, loop: asyncio.AbstractEventLoop) -> None:
        """Until a submit wakes us or the oldest queued request's delay runs out."""
        timeout = None if until is None else max(0.0, until - loop.time())
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _urgency(self, key: Key) -> float:
        """The earliest rank among the requests the key's next batch would hold."""
        limit, size, rank = self._limit(key), 0, math.inf
        for req in self._queues[key]:
            if size + req.n > limit:
                break
            size, rank = size + req.n, min(rank, req.rank)
        return rank

    def _take(self, key: Key, now: float) -> list[Request]:
        """In queue order up to the key's batch limit; dead requests are dropped on the way and take no room."""
        queue, limit = self._queues[key], self._limit(key)
        batch, size = [], 0
        while queue and (_dead(queue[0], now) or size + queue[0].n <= limit):
            req = queue.popleft()
            self._unqueue(req)
            if not _dead(req, now):
                batch.append(req)
                size += req.n
            elif not req.future.done():
                req.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
        return batch

    async def _run(self, key: Key, batch: list[Request]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        size = sum(req.n for req in batch)
        self._running_images = size
        try:
            outputs = await self._call(key, batch, size)
            _deliver(batch, outputs)
            self._notify("on_delivered", key, size, loop.time() - started)
        except asyncio.CancelledError:
            _fail(batch, NotReady("the server stopped before this request finished: retry"))
            raise
        except ServiceError as error:
            _fail(batch, error)
            self._notify("on_error", key, size, error)
        finally:
            self._running_images = 0
            self._record(key, size, [started - req.enqueued_at for req in batch], loop.time() - started)

    async def _call(self, key: Key, batch: list[Request], size: int) -> np.ndarray:
        """run_batch on the concatenated images, with its failures and malformed outputs as ServiceErrors."""
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([req.images for req in batch])
            outputs = await self._run_batch(key, images)
        except ServiceError:
            raise
        except Exception as e:
            log.exception("run_batch failed for %s (%d images)", key, size)
            raise InferenceFailed(f"inference failed for {key}: {type(e).__name__}") from e
        if not isinstance(outputs, np.ndarray) or len(outputs) != size:
            got = getattr(outputs, "shape", type(outputs).__name__)
            raise InferenceFailed(f"inference for {key} returned {got} for a batch of {size} images")
        return outputs

    def _record(self, key: Key, size: int, queue_wait_s: list[float], run_s: float) -> None:
        a = RUN_S_SMOOTHING
        self._run_s = run_s if self._run_s is None else (1 - a) * self._run_s + a * run_s
        self._notify("on_batch", key, size, queue_wait_s, run_s)

    def _fail_queued(self, error: ServiceError) -> None:
        for key, queue in self._queues.items():
            while queue:
                req = queue.popleft()
                self._unqueue(req)
                if not req.future.done():
                    req.future.set_exception(error)
                    self._notify("on_drop", key, "shutdown")

    def _notify(self, hook: str, *args) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            log.exception("batcher observer %s failed", hook)


def _oldest(queue: deque[Request]) -> float:
    """When the queue's longest-waiting request arrived (not always the head: yields reorder)."""
    return min(req.enqueued_at for req in queue)


def _dead(req: Request, now: float) -> bool:
    """Caller gone (cancelled), already answered (expired), or past its deadline: not worth running."""
    return req.future.done() or (req.deadline is not None and req.deadline <= now)


def _drop_reason(future: asyncio.Future) -> str | None:
    if future.cancelled():
        return "cancelled"
    return "deadline" if isinstance(future.exception(), DeadlineExceeded) else None


def _deliver(batch: list[Request], outputs: np.ndarray) -> None:
    """Rows back to each caller in request order; callers gone meanwhile are skipped."""
    start = 0
    for req in batch:
        if not req.future.done():
            req.future.set_result(outputs[start : start + req.n])
        start += req.n


def _fail(batch: list[Request], error: ServiceError) -> None:
    for req in batch:
        if not req.future.done():
            req.future.set_exception(error)


def _joined(parts: list[asyncio.Future]) -> asyncio.Future:
    """One future over the chunks of a split request: rows concatenated in order; the first failure fails
    the whole and withdraws the other chunks; cancelling it withdraws every chunk."""
    joined = asyncio.get_running_loop().create_future()

    def withdraw_parts(_: asyncio.Future | None = None) -> None:
        for part in parts:
            part.cancel()  # no-op for parts already done

    def part_done(part: asyncio.Future) -> None:
        if joined.done():
            return
        if part.cancelled():
            joined.cancel()
        elif part.exception() is not None:
            joined.set_exception(part.exception())
            withdraw_parts()  # now, not a callback later, so the executor never takes them
        elif all(p.done() for p in parts):
            joined.set_result(np.concatenate([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(part_done)
    joined.add_done_callback(withdraw_parts)  # the caller cancelled
    return joined
