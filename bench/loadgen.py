"""HTTP load generation against srvit's /classify (or a peer server's endpoint): closed- and open-loop runs, a sweep
of every image, their summary."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.hostile import v2_bytes_request

MAX_OPEN_CONNECTIONS = 256  # open loop: past this many in flight, new requests wait for a connection


# -- one run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """How a request carries its image and how the answer names the class. The default is srvit's /classify (the
    image as the body, `depth`, `top_k` and `model` as query parameters). A peer server serves one depth at a
    fixed path, with the image as the body, as a multipart `form_field`, or, `v2`, in a V2 binary BYTES
    request (Triton's), whose BYTES output `answer` holds the same JSON as /classify's."""

    path: str = "/classify"
    form_field: str | None = None
    v2: bool = False
    srvit: bool = True  # srvit's own /classify, with its query parameters and /metrics


SRVIT = Wire()


@dataclass(frozen=True)
class Target:
    """What every request of a run asks for: by default POST {url}/classify?depth=..&top_k=1[&model=..]."""

    url: str
    depth: str  # "1".."max", "auto" or "adaptive"; a peer's: the one depth it serves, for the record
    model: str | None = None
    timeout_s: float = 30.0
    wire: Wire = SRVIT

    @property
    def params(self) -> dict:
        if not self.wire.srvit:
            return {}
        params = {"depth": self.depth, "top_k": 1}
        return params | ({"model": self.model} if self.model else {})

    def request(self, image: bytes) -> tuple[dict[str, str], bytes | aiohttp.FormData]:
        """Headers and body of one request carrying `image`."""
        if self.wire.v2:
            return v2_bytes_request(image, outputs=[{"name": "answer", "parameters": {"binary_data": False}}])
        if self.wire.form_field:
            form = aiohttp.FormData()
            form.add_field(self.wire.form_field, image, filename="image", content_type=image_type(image))
            return {}, form
        return {"content-type": image_type(image)}, image


def image_type(image: bytes) -> str:
    """The media type of the benchmark's images: PNG (Fashion-MNIST) or JPEG (photos)."""
    return "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"


def read_answer(body: dict, wire: Wire) -> dict:
    """The /classify-shaped answer inside a response body: a V2 response's `answer` output, else the body."""
    if wire.v2:
        answer = next(o for o in body["outputs"] if o["name"] == "answer")["data"][0]
        return json.loads(answer)
    return body


@dataclass(frozen=True)
class Result:
    """One request: times in seconds on the run's clock; status an HTTP code or `error:<Exception>`."""

    started: float  # when it was sent (closed loop) or due (open loop: lateness counts as latency)
    finished: float
    status: int | str
    depth_used: int | None = None
    index: int | None = None  # top-1 class index
    sent: float | None = None  # when it was handed to the client, if later than `started`
    queue_ms: float | None = None  # the server's own `timing_ms.queue` of an answer
    gflops: float | None = None  # the compute the server reports it spent on the image

    @property
    def latency_s(self) -> float:
        return self.finished - self.started


@dataclass
class Run:
    """Results of one run and the window they are judged in (seconds on the run's clock)."""

    results: list[Result] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    client_cpu_s: float = 0.0


async def classify(client: aiohttp.ClientSession, target: Target, png: bytes, started: float, clock) -> Result:
    """Send one image; transport failures and unreadable answers become a Result too, so a run never dies of
    one bad request."""
    headers, data = target.request(png)
    sent = clock()
    try:
        async with client.post(
            target.url.rstrip("/") + target.wire.path, params=target.params, data=data, headers=headers
        ) as response:
            if response.status != 200:
                await response.read()
                return Result(started, clock(), response.status, sent=sent)
            body = read_answer(await response.json(content_type=None), target.wire)
            depth, index = body.get("depth_used"), body["predictions"][0]["index"]
    except Exception as e:  # connection errors, timeouts, a 200 without the expected JSON
        return Result(started, clock(), f"error:{type(e).__name__}", sent=sent)
    return Result(started, clock(), 200, depth, index, sent, body.get("timing_ms", {}).get("queue"), body.get("gflops"))


def _client(target: Target, connections: int) -> aiohttp.ClientSession:
    """aiohttp rather than httpx: measured here, httpx's connection pool cost 1.5 ms of client CPU per request
    at 8 connections and 7.8 ms at 64, aiohttp 0.2 ms at both; the load generator must not be the bottleneck."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=target.timeout_s),
    )


async def closed_loop(target: Target, pngs: Sequence[bytes], concurrency: int, duration_s: float,
                      warmup_s: float = 0.0) -> Run:  # fmt: skip
    """`concurrency` workers, each sending its next request as soon as the last one answered.

    Counts the requests that finished inside [warmup_s, warmup_s + duration_s], as wrk does; those
    still in flight at the end are awaited (so the server is idle afterwards) but not counted.
    """
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0
    end = warmup_s + duration_s
    results: list[Result] = []
    cpu0 = time.process_time()

    async def worker(offset: int) -> None:
        i = offset
        while clock() < end:
            results.append(await classify(client, target, pngs[i % len(pngs)], clock(), clock))
            i += concurrency

    async with _client(target, concurrency) as client:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    kept = [r for r in results if warmup_s <= r.finished <= end]
    return Run(kept, (warmup_s, end), time.process_time() - cpu0)


async def open_loop(target: Target, pngs: Sequence[bytes], rate: float, duration_s: float,
                    warmup_s: float = 0.0) -> Run:  # fmt: skip
    """`rate` requests per second, evenly spaced, whether or not earlier ones answered.

    Latency runs from when a request was due, so a late client cannot hide queueing (coordinated
    omission). Counts every request due inside the window, however late it finishes.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0
    end = warmup_s + duration_s
    cpu0 = time.process_time()
    tasks: list[asyncio.Task] = []
    async with _client(target, MAX_OPEN_CONNECTIONS) as client:
        for i in range(math.ceil(end * rate)):
            due = i / rate
            await asyncio.sleep(max(0.0, due - clock()))
            tasks.append(asyncio.create_task(classify(client, target, pngs[i % len(pngs)], due, clock)))
        results = await asyncio.gather(*tasks)
    kept = [r for r in results if warmup_s <= r.started < end]
    return Run(kept, (warmup_s, end), time.process_time() - cpu0)


async def sweep(target: Target, pngs: Sequence[bytes], concurrency: int) -> list[Result]:
    """Every image once, `concurrency` at a time; results in the images' order."""
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0
    results: list[Result | None] = [None] * len(pngs)
    todo = iter(range(len(pngs)))

    async def worker() -> None:
        for i in todo:  # one shared iterator: each index goes to exactly one worker
            results[i] = await classify(client, target, pngs[i], clock(), clock)

    async with _client(target, concurrency) as client:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def measure(target: Target, pngs: list[bytes], *, concurrency: int | None = None, rate: float | None = None,
            duration_s: float, warmup_s: float, within_ms: float | None = None) -> dict:  # fmt: skip
    """One run, closed loop at `concurrency` or open loop at `rate`, summarized (`within_ms`: see summarize)."""
    if rate is not None:
        run = asyncio.run(open_loop(target, pngs, rate, duration_s, warmup_s))
    else:
        run = asyncio.run(closed_loop(target, pngs, concurrency, duration_s, warmup_s))
    loop = {"concurrency": concurrency} if rate is None else {"rate": rate}
    return {"depth": target.depth, **loop, **summarize(run, within_ms)}


# -- summary ----------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ascending values: the smallest value with at least p% at or below it."""
    if not sorted_values:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summarize(run: Run, within_ms: float | None = None) -> dict:
    """Throughput, latency of the answered requests (and their percentiles 1..100, for a CDF), errors by status,
    depth mix; with `within_ms`, also the fraction of all requests answered within that many ms.

    Throughput spans the window or, when counted requests finished after it (open loop behind an
    overloaded server), until the last answer came: a server that falls behind shows it.
    """
    ok = [r for r in run.results if r.status == 200]
    latencies_ms = sorted(r.latency_s * 1000 for r in ok)
    window_s = max([run.window[1], *(r.finished for r in ok)]) - run.window[0]
    depths = Counter(r.depth_used for r in ok)
    return {
        "requests": len(run.results),
        "ok": len(ok),
        "errors": dict(sorted(Counter(str(r.status) for r in run.results if r.status != 200).items())),
        "images_per_s": len(ok) / window_s if window_s > 0 else math.nan,
        "latency_ms": {
            "p50": percentile(latencies_ms, 50),
            "p95": percentile(latencies_ms, 95),
            "p99": percentile(latencies_ms, 99),
            "mean": sum(latencies_ms) / len(latencies_ms) if ok else math.nan,
            "max": latencies_ms[-1] if ok else math.nan,
        },
        "latency_cdf_ms": [percentile(latencies_ms, p) for p in range(1, 101)] if ok else [],
        "depth_mix": {str(d): n / len(ok) for d, n in sorted(depths.items(), key=lambda kv: str(kv[0]))},
        "send_lag_ms_p99": percentile(sorted((r.sent - r.started) * 1000 for r in run.results if r.sent), 99),
        "window_s": window_s,
        "client_cpu_s": run.client_cpu_s,
    } | ({} if within_ms is None else {"within_ms": within_ms, "answered_within": _within(run, ok, within_ms)})


def _within(run: Run, ok: list[Result], within_ms: float) -> float:
    """Answered (200) within `within_ms`, as a fraction of every request of the run."""
    return sum(r.latency_s * 1000 <= within_ms for r in ok) / len(run.results) if run.results else math.nan
