"""The protocol-neutral core: one request type, one result type, one `infer` call for every front end.

An adapter (`/classify`, V2 HTTP, later V2 gRPC) parses its wire format into an `InferRequest`, calls
`InferenceCore.infer`, and renders the `InferResult`. Everything about which model, which depth, deadlines,
decoding, batching and latency feedback is decided here, once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from modelrepo.adaptive import CONFIDENT, MAX_DEPTH, AdaptivePolicy, advance
from service.autodepth import OVERLOAD, AutoDepth
from service.batcher import Batcher
from service.errors import DeadlineExceeded, InvalidParameter, ModelNotFound, Overloaded
from service.forecast import Forecaster
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.repository import Model
from service.statistics import Statistics

Depth = int | Literal["auto", "adaptive"]
AUTO, ADAPTIVE = "auto", "adaptive"
Images = Sequence[bytes] | np.ndarray  # encoded files, or a decoded float32 [n, C, H, W] tensor
REQUESTED, DEFAULT = "requested", "default"  # depth reasons besides auto's latency_target and overload
DEADLINE = "deadline"  # adaptive: the next stage would not finish before the request's deadline
# (adaptive's other reasons: confident, max_depth from modelrepo.adaptive, and overload as auto's)
PRE_QUEUE_SMOOTHING = 0.1  # weight of each request in the moving average of time spent before the queue
T = TypeVar("T")


@dataclass
class RequestContext:
    """What accounting and the log line need whatever happens: filled in as the request goes."""

    request_id: str
    received_at: float  # loop.time()
    model: str | None = None
    depth: int | None = None
    held_bytes: int = 0  # of the server's max_buffered_bytes, given back when the request ends


@dataclass(frozen=True)
class InferRequest:
    """One request from any protocol. `images` are encoded files (decoded here, each checked before any
    reaches a batch) or an already decoded float32 tensor [n, C, H, W] of the model's input shape."""

    context: RequestContext
    images: Images
    model: str | None = None  # None: the only served model
    depth: Depth | None = None  # None: the model's default depth
    timeout_s: float | None = None  # from `context.received_at`; None: no deadline
    top_k: int | None = None  # predictions per image; None: the server's default_top_k
    predictions: bool = True  # False when the caller wants logits only (V2)
    priority: int | None = None  # 1 is the highest level (Triton's meaning); None: the default level


@dataclass(frozen=True)
class Timing:
    queue_ms: float  # queued until its batch started
    inference_ms: float  # its batch (or batches) ran
    total_ms: float  # received until the answer was built


@dataclass(frozen=True)
class ImageResult:
    depth: int  # where its answer came from
    depth_reason: str  # requested | default | latency_target | overload; adaptive: confident | max_depth | deadline
    logits: np.ndarray  # [classes] float32; adaptive: the log of the calibrated probabilities of its answer
    predictions: list[dict]  # top-k {"label", "index", "score"}; empty when not asked for
    depths_run: tuple[int, ...]  # every depth it went through: (depth,) but for adaptive
    gflops: float | None  # compute spent on it; None when the manifests predate FLOPs counts


@dataclass(frozen=True)
class InferResult:
    model: str
    model_version: str
    depth_requested: Depth | None
    images: list[ImageResult]  # each image's logits are a row of `logits`
    timing: Timing
    logits: np.ndarray  # [n, classes] float32, in request order


@dataclass(frozen=True)
class PriorityPolicy:
    """Levels 1 (highest) to `levels`; no level (Triton's 0) or one beyond `levels` is the default level, as
    in Triton. A request at level p lets work that arrives up to (p - 1) * step_s after it go first: among
    equal levels the order is arrival, and a lower level waits at most that much longer behind a stream of
    higher ones, so it is never starved."""

    levels: int = 1
    default_level: int = 1
    step_s: float = 0.0

    def level(self, priority: int | None) -> int:
        return priority if priority is not None and 1 <= priority <= self.levels else self.default_level

    def yield_s(self, priority: int | None) -> float:
        return (self.level(priority) - 1) * self.step_s


@dataclass(frozen=True)
class ServedModel:
    """A model as this server serves it: repository entry, its preprocessing, its default and auto depth."""

    model: Model
    preprocessor: Preprocessor
    default_depth: Depth
    auto: AutoDepth

    @property
    def name(self) -> str:
        return self.model.name


class MovingAverage:
    def __init__(self, weight: float):
        self.weight, self.value = weight, 0.0

    def observe(self, sample: float) -> None:
        self.value += self.weight * (sample - self.value)


class InferenceCore:
    """Validates at the edge (model, depth, top_k before any decoding), decodes off the event loop, then
    picks the depth and queues on the device in one synchronous step, so concurrent auto requests each see
    the queue the previous ones left."""

    def __init__(self, served: dict[str, ServedModel], batcher: Batcher, forecaster: Forecaster,
                 pool: ThreadPoolExecutor, metrics: Metrics, statistics: Statistics, default_top_k: int,
                 priority: PriorityPolicy | None = None, max_queue_wait_ms: float = math.inf,
                 inline_decode_max_pixels: int = 0):  # fmt: skip
        self.served, self.batcher, self.forecaster = served, batcher, forecaster
        self.pool, self.metrics, self.statistics, self.default_top_k = pool, metrics, statistics, default_top_k
        self.priority = priority or PriorityPolicy()
        self.max_queue_wait_ms = max_queue_wait_ms
        self.inline_decode_max_pixels = inline_decode_max_pixels
        self.pre_queue_ms = MovingAverage(PRE_QUEUE_SMOOTHING)  # time requests spend before the device queue

    async def infer(self, request: InferRequest) -> InferResult:
        ctx = request.context
        served = self.resolve(request.model)
        ctx.model = served.name
        requested = request.depth if request.depth is not None else served.default_depth
        check_depth(served.model, requested)
        if requested not in (AUTO, ADAPTIVE):
            ctx.depth = requested  # known now: a request that fails while decoding is counted at its depth
        deadline = None if request.timeout_s is None else ctx.received_at + request.timeout_s
        tensors, decode_s = await self.tensors(served, request.images)
        spent_ms = self._since(ctx.received_at)
        self.pre_queue_ms.observe(spent_ms)
        if requested == ADAPTIVE:
            return await self.adaptive(served, request, tensors, decode_s, deadline)
        budget_ms = None if request.timeout_s is None else request.timeout_s * 1000
        if requested == AUTO:
            self.follow_load(served)
        depth, reason = self.choose_depth(
            served, requested, by_default=request.depth is None, images=len(tensors), spent_ms=spent_ms,
            budget_ms=budget_ms,
        )  # fmt: skip
        ctx.depth = depth
        yield_s = self.priority.yield_s(request.priority)
        self.admit(served, depth, len(tensors), yield_s)
        if decode_s is not None:
            self.metrics.preprocess_seconds.labels(served.name, str(depth)).observe(decode_s)
        queued_at = asyncio.get_running_loop().time()
        rows = await self.batcher.submit((served.name, depth), tensors, deadline, yield_s=yield_s)
        served.auto.observe(depth, self._since(ctx.received_at))  # latency feedback, whichever protocol asked
        t0 = time.perf_counter()
        result = self._result(served, request, depth, reason, rows, queued_at)
        self._succeeded(served, result, depth, decode_s, t0, "auto" if requested == AUTO else "fixed")
        return result

    def _succeeded(self, served: ServedModel, result: InferResult, depth: int, decode_s: float | None, t0: float,
                   mode: str) -> None:  # fmt: skip
        t = result.timing
        self.statistics.succeeded(served.name, depth, total_s=t.total_ms / 1000, queue_s=t.queue_ms / 1000,
                                  decode_s=decode_s or 0.0, infer_s=t.inference_ms / 1000,
                                  output_s=time.perf_counter() - t0)  # fmt: skip
        for image in result.images:
            if image.gflops is not None:
                self.metrics.image_gflops.labels(served.name, mode).observe(image.gflops)

    async def adaptive(self, served: ServedModel, request: InferRequest, tensors: np.ndarray,
                       decode_s: float | None, deadline: float | None) -> InferResult:  # fmt: skip
        """depth=adaptive: every image runs the policy's first depth; the ones whose calibrated answer is unsure
        go on to the next stage's depth, queued as of when they first queued (ahead of newer arrivals). As
        `auto` does, a request that even the first depth would answer past its budget (timeout_ms, else the
        latency target) because of the work queued ahead is refused with 503 rather than queued. An
        image stops early, with the answer it has, when going on would not fit: past the depth auto has been
        pushed down to by the load (`overload`; on an idle server, no cap), past its queue-wait bound or a full
        queue (`overload`), or past the request's deadline (`deadline`). The request answers when its last
        image is done."""
        ctx, name, policy = request.context, served.name, served.model.adaptive
        loop = asyncio.get_running_loop()
        self.follow_load(served)  # the auto depth caps how deep an image may go
        yield_s = self.priority.yield_s(request.priority)
        first = policy.stages[0].depth
        ctx.depth = first
        budget_ms = None if request.timeout_s is None else request.timeout_s * 1000
        forecast = self.forecaster.forecast(name, [first], len(tensors), self._since(ctx.received_at))
        if served.auto.hopeless(forecast, first, budget_ms):  # as auto refuses: it would be late anyway
            self._refuse(name, "adaptive_overload", f"even depth {first} would miss the latency budget behind the "
                         "work queued now")  # fmt: skip
        self.admit(served, first, len(tensors), yield_s)
        if decode_s is not None:
            self.metrics.preprocess_seconds.labels(name, str(first)).observe(decode_s)
        run = AdaptiveRun(policy, len(tensors), len(served.model.labels))
        since, queue_s, infer_s = loop.time(), 0.0, 0.0
        for k, stage in enumerate(policy.stages):
            if k > 0:
                reason = self._stop_before(served, stage.depth, len(run.alive), deadline)
                if reason is not None:
                    run.stop_all(reason)
                    break
                went_on = self.metrics.adaptive_continued.labels(
                    name, str(policy.stages[k - 1].depth), str(stage.depth)
                )
                went_on.inc(len(run.alive))
            queued_at = loop.time()
            try:
                rows = await self.batcher.submit((name, stage.depth), tensors[run.alive], deadline, yield_s=yield_s,
                                                 since=since)  # fmt: skip
            except (Overloaded, DeadlineExceeded) as e:
                if k == 0:
                    raise
                run.stop_all(OVERLOAD if isinstance(e, Overloaded) else DEADLINE)
                break
            started, finished = rows["started"].min(), (rows["started"] + rows["run_s"]).max()
            queue_s, infer_s = queue_s + started - queued_at, infer_s + finished - started
            ctx.depth = stage.depth
            run.stage(k, rows["logits"])
            if not len(run.alive):
                break
        served.auto.observe(ctx.depth, self._since(ctx.received_at))
        t0 = time.perf_counter()
        result = self._adaptive_result(served, request, run, Timing(_ms(queue_s), _ms(infer_s),
                                       _ms(loop.time() - ctx.received_at)))  # fmt: skip
        for image in result.images:
            self.metrics.adaptive_exits.labels(name, image.depth_reason).observe(image.depth)
        self._succeeded(served, result, ctx.depth, decode_s, t0, ADAPTIVE)
        return result

    def _stop_before(self, served: ServedModel, depth: int, images: int, deadline: float | None) -> str | None:
        """Why the images still going must not go on to `depth`, or None: they may."""
        cap = served.auto.load_cap(self.forecaster.idle_ms(served.name, served.model.depths, 1))
        if cap is not None and depth > cap:
            return OVERLOAD
        if self.forecaster.queue_wait_ms((served.name, depth), images) > self.max_queue_wait_ms:
            return OVERLOAD
        if deadline is not None:
            loop = asyncio.get_running_loop()
            done_ms = self.forecaster.forecast(served.name, [depth], images).loaded_ms[depth]
            if loop.time() + done_ms / 1000 > deadline:
                return DEADLINE
        return None

    def _adaptive_result(self, served: ServedModel, request: InferRequest, run: AdaptiveRun,
                         timing: Timing) -> InferResult:  # fmt: skip
        labels, model = served.model.labels, served.model
        top_k = min(request.top_k or self.default_top_k, len(labels))
        logits = np.log(np.maximum(run.probs, 1e-30)).astype(np.float32)
        images = []
        for i in range(len(logits)):
            depths = tuple(run.depths_run[i])
            flops = [model.flops(d) for d in depths]
            gflops = None if None in flops else sum(flops) / 1e9
            predictions = top_from_probs(run.probs[i], labels, top_k) if request.predictions else []
            images.append(ImageResult(depths[-1], run.reasons[i], logits[i], predictions, depths, gflops))
        return InferResult(served.name, str(model.version), ADAPTIVE, images, timing, logits)

    def resolve(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.served) == 1:
                return next(iter(self.served.values()))
            raise InvalidParameter(f"this server serves several models: add model=one of {sorted(self.served)}")
        if name not in self.served:
            raise ModelNotFound(f"no model named {name!r}; served: {sorted(self.served)} (GET /v1/models)")
        return self.served[name]

    async def offload(self, fn: Callable[..., T], *args) -> T:
        """Run CPU-heavy parsing (a big JSON tensor) in the decoding pool, so health checks keep answering."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def tensors(self, served: ServedModel, images: Images) -> tuple[np.ndarray, float | None]:
        """[n, C, H, W] float32 and the seconds decoding took: decoded tensors pass through (None), encoded
        images are decoded in the pool."""
        if isinstance(images, np.ndarray):
            return images, None
        t0 = time.perf_counter()
        tensors = await self._decode(served.preprocessor, images)
        return tensors, time.perf_counter() - t0

    async def _decode(self, preprocessor: Preprocessor, images: Sequence[bytes]) -> np.ndarray:
        """Decode every image in the pool; the first bad image fails the request before it reaches a batch.
        A lone small image (a Fashion-MNIST PNG decodes in about 0.1 ms) is decoded here on the event loop:
        handing it to a thread and back costs more than that, measured at a lone request on one core."""
        if len(images) == 1 and (img := preprocessor.open_small(images[0], self.inline_decode_max_pixels)):
            return preprocessor.finish(img)[None]
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self.pool, preprocessor, data) for data in images]
        try:
            tensors = await asyncio.gather(*futures)
        except BaseException:  # a bad image or a gone client: the other decodes must not keep the pool busy
            for future in futures:
                future.cancel()
            raise
        return np.stack(tensors)  # [n, C, H, W]

    def follow_load(self, served: ServedModel) -> None:
        """Move the model's server-wide auto depth by the load a typical request (one image, the usual time
        before the queue) would meet now; called for every auto request, just before its depth is chosen."""
        probe = self.forecaster.forecast(served.name, served.model.depths, 1, self.pre_queue_ms.value)
        served.auto.follow(probe, time.monotonic())

    def choose_depth(self, served: ServedModel, requested: Depth, *, by_default: bool, images: int,
                     spent_ms: float, budget_ms: float | None) -> tuple[int, str]:  # fmt: skip
        """An explicit depth is used exactly (the batcher may still refuse it); auto asks the AutoDepth.
        Reads only: the server-wide auto depth moves in `follow_load`, the moving averages in `infer`.

        Times count from the request's arrival, as the latency target does: the request's own time spent so
        far (`spent_ms`) narrows its own choice, while the server-wide auto depth follows the moving average
        of that time over all requests, so one slow decode does not move it."""
        if requested != "auto":
            return requested, DEFAULT if by_default else REQUESTED
        name, depths = served.name, served.model.depths
        decision = served.auto.choose(self.forecaster.forecast(name, depths, images, spent_ms), budget_ms)
        if decision is None:
            self.metrics.auto_requests.labels(name, "refused").inc()
            self._refuse(name, "auto_overload", f"even depth {depths[0]} would miss the latency budget behind the "
                         "work queued now")  # fmt: skip
        self.metrics.auto_requests.labels(name, decision.reason).inc()
        if decision.depth < depths[-1]:
            self.metrics.downgrades.labels(name, decision.reason).inc()
        return decision.depth, decision.reason

    def admit(self, served: ServedModel, depth: int, images: int, yield_s: float = 0.0) -> None:
        """Refuse, before queueing, a request that would wait longer than max_queue_wait_ms for the device
        (its priority's yield included): it would be answered late anyway, and queueing it makes everyone
        behind it later still."""
        wait_ms = self.forecaster.queue_wait_ms((served.name, depth), images) + yield_s * 1000
        if wait_ms > self.max_queue_wait_ms:
            self._refuse(served.name, "queue_wait", f"depth {depth} would wait about {wait_ms:.0f} ms in the queue "
                         f"(max_queue_wait_ms {self.max_queue_wait_ms:g})")  # fmt: skip

    def _refuse(self, model: str, reason: str, why: str) -> None:
        """503 overloaded, counted by reason, with a Retry-After of the time the queued work needs."""
        self.metrics.rejections.labels(model, reason).inc()
        retry_after_s = self.forecaster.retry_after_s()
        raise Overloaded(f"{why}: retry in {retry_after_s:.0f} s", retry_after_s)

    def _result(self, served: ServedModel, request: InferRequest, depth: int, reason: str, rows: np.ndarray,
                queued_at: float) -> InferResult:  # fmt: skip
        labels = served.model.labels
        top_k = min(request.top_k or self.default_top_k, len(labels))
        flops = served.model.flops(depth)
        gflops = None if flops is None else flops / 1e9
        images = [
            ImageResult(
                depth,
                reason,
                logits,
                top_predictions(logits, labels, top_k) if request.predictions else [],
                (depth,),
                gflops,
            )  # fmt: skip
            for logits in rows["logits"]
        ]
        started, finished = rows["started"].min(), (rows["started"] + rows["run_s"]).max()
        loop_now = asyncio.get_running_loop().time()
        timing = Timing(_ms(started - queued_at), _ms(finished - started), _ms(loop_now - request.context.received_at))
        return InferResult(served.name, str(served.model.version), request.depth, images, timing, rows["logits"])

    @staticmethod
    def _since(received_at: float) -> float:
        return (asyncio.get_running_loop().time() - received_at) * 1000


def check_depth(model: Model, depth: Depth) -> None:
    if depth == ADAPTIVE and model.adaptive is None:
        why = ("its manifests predate calibration (format srvit-manifest/1)" if model.manifest.flops is None
               else "its export fitted no adaptive policy (no held-out data, or none kept top-1)")  # fmt: skip
        raise InvalidParameter(f"depth=adaptive is not available for {model.name}: {why}; re-export it with "
                               "`srvit export` on its held-out data, or ask for a depth or auto")  # fmt: skip
    if depth not in (AUTO, ADAPTIVE) and depth not in model.depths:
        served = ", ".join(map(str, model.depths))
        raise InvalidParameter(f"depth {depth} is not served for {model.name}: use one of {served}, auto or adaptive")


class AdaptiveRun:
    """One adaptive request's images as they go through the stages: which are still going, the answer each
    has so far, the depths each ran and why it stopped."""

    def __init__(self, policy: AdaptivePolicy, n: int, classes: int):
        self.policy = policy
        self.alive = np.arange(n)  # indices of the images still going, in order
        self.total: np.ndarray | None = None  # their summed calibrated probabilities (modelrepo.adaptive.advance)
        self.probs = np.zeros((n, classes))  # each image's answer so far
        self.depths_run: list[list[int]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n

    def stage(self, k: int, logits: np.ndarray) -> None:
        """Stage k's logits for the images still going: the confident ones (all of them at the last stage) stop."""
        depth, last = self.policy.stages[k].depth, k == len(self.policy.stages) - 1
        self.total, combined, stop = advance(self.policy, k, self.total, logits)
        self.probs[self.alive] = combined
        for i in self.alive:
            self.depths_run[i].append(depth)
        for i in self.alive[stop]:
            self.reasons[i] = MAX_DEPTH if last else CONFIDENT
        self.alive, self.total = self.alive[~stop], self.total[~stop]

    def stop_all(self, reason: str) -> None:
        """The images still going stop with the answer of the last stage they ran."""
        for i in self.alive:
            self.reasons[i] = reason
        self.alive = self.alive[:0]


def top_predictions(logits: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """Softmax in float64 (shifted by the max, so large logits cannot overflow), then the k most likely."""
    z = logits.astype(np.float64) - logits.max()
    return top_from_probs(np.exp(z) / np.exp(z).sum(), labels, k)


def top_from_probs(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in order]


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 3)
