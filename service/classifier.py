"""A classification request from checked parameters and image bytes to its answers: decode, pick depth, batch."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.autodepth import AutoDepth
from service.device import Device
from service.errors import InvalidParameter, ModelNotFound, Overloaded
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.repository import Model
from service.schemas import ClassifyParams, Depth

REQUESTED, DEFAULT = "requested", "default"
PRE_QUEUE_SMOOTHING = 0.1  # weight of each request in the moving average of time spent before the queue


@dataclass
class RequestContext:
    """What the route needs for its log line and metrics whatever happens: filled in as the request goes."""

    request_id: str
    received_at: float  # loop.time()
    model: str | None = None
    depth: int | None = None


@dataclass(frozen=True)
class ServedModel:
    """A model as this server serves it: repository entry, its preprocessing, its default and auto depth."""

    model: Model
    preprocessor: Preprocessor
    default_depth: Depth
    auto: AutoDepth


class Classifier:
    """Validates at the edge (model, depth, top_k before any decoding), decodes off the event loop, then
    picks the depth and queues on the device in one synchronous step, so concurrent auto requests each see
    the queue the previous ones left."""

    def __init__(self, served: dict[str, ServedModel], device: Device, pool: ThreadPoolExecutor, metrics: Metrics,
                 default_top_k: int):  # fmt: skip
        self.served, self.device, self.pool, self.metrics = served, device, pool, metrics
        self.default_top_k = default_top_k
        self.pre_queue_ms = 0.0  # moving average of the time requests spend before the device queue

    async def classify(self, params: ClassifyParams, images: list[bytes], ctx: RequestContext) -> list[dict]:
        served = self.resolve(params.model)
        ctx.model = served.model.name
        requested = params.depth if params.depth is not None else served.default_depth
        self.check_depth(served.model, requested)
        top_k = min(params.top_k or self.default_top_k, len(served.model.labels))
        deadline = None if params.timeout_ms is None else ctx.received_at + params.timeout_ms / 1000
        tensors, preprocess_s = await self.preprocess(served.preprocessor, images)
        depth, reason = self.choose_depth(
            served, requested, params.depth is None, len(images), ctx.received_at, deadline
        )
        ctx.depth = depth
        self.metrics.preprocess_seconds.labels(served.model.name, str(depth)).observe(preprocess_s)
        queued_at = asyncio.get_running_loop().time()
        rows = await self.submit(served, depth, tensors, ctx.received_at, deadline)
        meta = {"depth_requested": params.depth, "depth_used": depth, "depth_reason": reason}
        return self.answers(served.model, rows, top_k, meta, queued_at, ctx)

    async def submit(self, served: ServedModel, depth: int, images: np.ndarray, received_at: float,
                     deadline: float | None) -> np.ndarray:  # fmt: skip
        """Run the images at `depth` in the batcher; the answer's latency since arrival feeds the auto depth,
        whichever endpoint asked."""
        rows = await self.device.batcher.submit((served.model.name, depth), images, deadline)
        served.auto.observe(depth, (asyncio.get_running_loop().time() - received_at) * 1000)
        return rows

    def resolve(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.served) == 1:
                return next(iter(self.served.values()))
            raise InvalidParameter(f"this server serves several models: add model=one of {sorted(self.served)}")
        if name not in self.served:
            raise ModelNotFound(f"no model named {name!r}; served: {sorted(self.served)} (GET /v1/models)")
        return self.served[name]

    @staticmethod
    def check_depth(model: Model, depth: Depth) -> None:
        if depth != "auto" and depth not in model.depths:
            served = ", ".join(map(str, model.depths))
            raise InvalidParameter(f"depth {depth} is not served for {model.name}: use one of {served}, or auto")

    async def preprocess(self, preprocessor: Preprocessor, images: list[bytes]) -> tuple[np.ndarray, float]:
        """Decode every image in the pool; the first bad image fails the request before it reaches a batch."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        futures = [loop.run_in_executor(self.pool, preprocessor, data) for data in images]
        try:
            tensors = await asyncio.gather(*futures)
        except BaseException:  # a bad image or a gone client: the other decodes must not keep the pool busy
            for future in futures:
                future.cancel()
            raise
        return np.stack(tensors), time.perf_counter() - t0  # [n, C, H, W]

    def choose_depth(self, served: ServedModel, requested: Depth, by_default: bool, images: int,
                     received_at: float, deadline: float | None) -> tuple[int, str]:  # fmt: skip
        """An explicit depth is used exactly (the batcher may still refuse it); auto asks the AutoDepth.

        Times count from the request's arrival (loop time `received_at`), as the latency target does: the
        request's own time spent so far narrows its own choice, while the server-wide auto depth follows the
        moving average of that time over all requests, so one slow decode does not move it."""
        spent_ms = (asyncio.get_running_loop().time() - received_at) * 1000
        self.pre_queue_ms += PRE_QUEUE_SMOOTHING * (spent_ms - self.pre_queue_ms)
        if requested != "auto":
            return requested, DEFAULT if by_default else REQUESTED
        budget_ms = None if deadline is None else (deadline - received_at) * 1000
        name, depths = served.model.name, served.model.depths
        forecast = self.device.forecast(name, depths, images, spent_ms)
        probe = self.device.forecast(name, depths, 1, self.pre_queue_ms)
        decision = served.auto.decide(forecast, time.monotonic(), budget_ms, probe)
        if decision is None:
            self.metrics.rejections.labels(served.model.name, "auto_overload").inc()
            retry_after_s = self.device.retry_after_s()
            raise Overloaded(
                f"even depth {served.model.depths[0]} would miss the latency budget behind the work queued now: "
                f"retry in {retry_after_s:.0f} s",
                retry_after_s,
            )
        if decision.depth < served.model.depths[-1]:
            self.metrics.downgrades.labels(served.model.name, decision.reason).inc()
        return decision.depth, decision.reason

    def answers(self, model: Model, rows: np.ndarray, top_k: int, meta: dict, queued_at: float,
                ctx: RequestContext) -> list[dict]:  # fmt: skip
        loop_now = asyncio.get_running_loop().time()
        started, finished = rows["started"].min(), (rows["started"] + rows["run_s"]).max()
        timing = {
            "queue": _ms(started - queued_at),
            "inference": _ms(finished - started),
            "total": _ms(loop_now - ctx.received_at),
        }
        common = {"model": model.name, "model_version": str(model.version), **meta}
        return [
            {**common, "predictions": top_predictions(logits, model.labels, top_k), "timing_ms": timing,
             "request_id": ctx.request_id}
            for logits in rows["logits"]
        ]  # fmt: skip


def top_predictions(logits: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """Softmax in float64 (shifted by the max, so large logits cannot overflow), then the k most likely."""
    z = logits.astype(np.float64) - logits.max()
    probs = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in order]


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 3)
