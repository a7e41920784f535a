"""Request accounting for every adapter: admission, the in-flight count that draining waits for, one metrics line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Iterator

from service.errors import ClientClosedRequest, NotReady, Overloaded, ServiceError
from service.heap import HeapTrimmer
from service.inference import RequestContext
from service.metrics import NONE, Metrics
from service.statistics import Statistics

log = logging.getLogger("service.requests")  # one line per request, every protocol
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # safe to echo in a header and to write to a log


def request_id(client_id: str | None) -> str:
    """The client's own request id when it is sane, else a fresh one: for every protocol's log lines."""
    return client_id if client_id and SANE_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex


class Accounting:
    """`track` wraps one request from before its body is read to its rendered answer, whatever the protocol."""

    def __init__(self, metrics: Metrics, statistics: Statistics, max_in_flight: int, max_buffered_bytes: int,
                 refusal: Callable[[], str | None], retry_after_s: Callable[[], float]):  # fmt: skip
        self.metrics, self.statistics, self.max_in_flight = metrics, statistics, max_in_flight
        self._refusal, self._retry_after_s = refusal, retry_after_s  # why the server takes no requests now
        self.in_flight = 0
        self.max_buffered_bytes, self.buffered_bytes = max_buffered_bytes, 0
        self.heap = HeapTrimmer(is_idle=lambda: self.in_flight == 0)
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def track(self, request_id: str, protocol: str) -> Iterator[RequestContext]:
        """Admit the request and count it until its answer is built; count its outcome in metrics (and a
        failure in the model's statistics), model and depth as far as the core learnt them. A cancelled request
        (the client went away) counts as 499. `protocol` is one of metrics.PROTOCOLS."""
        loop = asyncio.get_running_loop()
        ctx, status = RequestContext(request_id, loop.time()), 500
        try:
            self._admit()
            self.in_flight += 1
            self.idle.clear()
            try:
                yield ctx
            finally:
                self.in_flight -= 1
                self.buffered_bytes -= ctx.held_bytes
                self.heap.released(ctx.held_bytes)
                if self.in_flight == 0:
                    self.idle.set()
            status = 200
        except ServiceError as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = ClientClosedRequest.status
            raise
        finally:
            seconds = loop.time() - ctx.received_at
            self.metrics.request(ctx.model, ctx.depth, status, protocol, seconds)
            fields = {"request_id": ctx.request_id, "protocol": protocol, "model": ctx.model, "depth": ctx.depth,
                      "status": status, "duration_ms": round(seconds * 1000, 3)}  # fmt: skip
            log.info("%s %s depth %s: %d in %.1f ms (request %s)", protocol, ctx.model, ctx.depth, status,
                     seconds * 1000, ctx.request_id, extra={"request": fields})  # fmt: skip
            if status != 200 and ctx.model is not None:
                self.statistics.failed(ctx.model, ctx.depth, seconds)

    def hold(self, ctx: RequestContext, size_bytes: int) -> None:
        """Reserve room for a body of up to `size_bytes` before reading it, until the request ends. max_in_flight
        bounds requests, not bytes: 64 uploads of 16 MiB would hold 1 GiB. Past the budget the request is refused
        while it has cost nothing yet (its body unread); the room frees as soon as other requests end."""
        if self.buffered_bytes + size_bytes > self.max_buffered_bytes:
            self.metrics.rejections.labels(ctx.model or NONE, "buffered_bytes").inc()
            held, limit = self.buffered_bytes, self.max_buffered_bytes
            raise Overloaded(f"the server holds {held} bytes of request bodies and this one may bring {size_bytes} "
                             f"more; max_buffered_bytes is {limit}: retry in 1 s")  # fmt: skip
        self.buffered_bytes += size_bytes
        ctx.held_bytes += size_bytes

    def _admit(self) -> None:
        """Called before the body is read: past max_in_flight, a flood of slow uploads would hold memory and
        sockets without bound, so the request is refused while it has cost nothing yet."""
        refusal = self._refusal()
        if refusal is not None:
            raise NotReady(refusal)
        if self.in_flight >= self.max_in_flight:
            self.metrics.rejections.labels(NONE, "in_flight").inc()
            retry_after_s = self._retry_after_s()
            message = f"{self.in_flight} requests are in progress (max_in_flight): retry in {retry_after_s:.0f} s"
            raise Overloaded(message, retry_after_s)
