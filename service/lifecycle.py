"""The server's life: load and warm up every depth, report readiness, count requests in flight, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.autodepth import AutoDepth, Policy
from service.classifier import Classifier, ServedModel
from service.device import Device
from service.errors import NotReady, Overloaded
from service.metrics import NONE, BatchMetrics, Metrics
from service.preprocess import Preprocessor
from service.profile import LatencyProfile, measure_ms, warmup_sizes
from service.repository import Model, RepositoryError, load_repository
from service.runtime import Runtime, open_runtime
from service.schemas import Depth
from service.settings import Settings

log = logging.getLogger(__name__)

STARTING, READY, DRAINING, STOPPED = "starting", "ready", "draining", "stopped"


class Service:
    """Ready only once every depth of every model has answered warm-up batches: a load balancer that sees
    /readyz 200 can send traffic that will be served at the profiled speed, not at first-call speed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.state = STARTING
        self.served: dict[str, ServedModel] = {}
        self.device: Device | None = None
        self.classifier: Classifier | None = None
        self.pool: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._start_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """Ready only while the batch executor runs: after a crash every request would fail with 500."""
        return self.state == READY and self.device.batcher.running

    async def start(self) -> None:
        """Idempotent: `srvit serve` calls it before uvicorn binds (so a bad repository exits with a plain
        message), and the app's lifespan calls it again for in-process use. Raises RepositoryError."""
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        s = self.settings
        models = await asyncio.to_thread(load_repository, s.repo)
        self.device = Device(s.max_queue_delay_ms, s.max_queue_images, BatchMetrics(self.metrics))
        try:
            for model in models.values():
                self.served[model.name] = await self._serve(model)
        except BaseException:
            await self.device.stop(drain=False, timeout_s=0)
            raise
        self.pool = ThreadPoolExecutor(s.preprocess_threads, thread_name_prefix="srvit-preprocess")
        self.classifier = Classifier(self.served, self.device, self.pool, self.metrics, s.default_top_k)
        self._idle = asyncio.Event()
        self._idle.set()
        self.device.start()
        self.state = READY
        log.info("ready: %s", ", ".join(f"{n} depths {m.model.depths}" for n, m in self.served.items()))

    async def _serve(self, model: Model) -> ServedModel:
        """Every depth loaded and warmed up on the device thread, into one latency profile for the model."""
        preprocessor = make_preprocessor(model, self.settings.max_pixels)
        profile = LatencyProfile()
        for depth in model.depths:
            await self._load_depth(model, depth, profile)
        s = self.settings
        auto = AutoDepth(model.depths, Policy(s.latency_target_ms, s.auto_headroom, s.auto_step_up_hold_s))
        self.metrics.watch_auto_depth(model.name, lambda: auto.current)
        return ServedModel(model, preprocessor, default_depth(s.default_depth, model.depths), auto)

    async def _load_depth(self, model: Model, depth: int, profile: LatencyProfile) -> None:
        """Open and warm one depth; a graph that loads but fails to run stops start-up like a corrupt file."""
        try:
            await self._open_and_warm(model, depth, profile)
        except RepositoryError:
            raise
        except Exception as e:  # ONNX Runtime and TensorRT raise their own types
            raise RepositoryError(f"{model.name} depth {depth}: warm-up failed ({type(e).__name__}: {e})") from e

    async def _open_and_warm(self, model: Model, depth: int, profile: LatencyProfile) -> None:
        s, key = self.settings, (model.name, depth)
        artifacts = model.artifacts[depth]
        runtime = await self.device.call(open_runtime, artifacts, s.providers, s.intra_op_threads, s.intra_op_spinning)
        limit = min(s.max_batch_size, artifacts[0].max_batch_size)
        self.device.add(key, runtime, limit, profile)  # added first, so a failed warm-up still closes it
        shape = tuple(model.manifest["input"]["shape"][1:])
        for batch in warmup_sizes(s.warmup_batch_sizes, limit):
            ms = await self.device.call(warm_up, runtime, shape, len(model.labels), batch, s.warmup_runs)
            profile.record(depth, batch, ms)
        self.metrics.watch_queue(key, lambda: self.device.batcher.queue_images(key))
        log.info("%s depth %d on %s: %s ms by batch size", model.name, depth, runtime.provider,
                 profile.to_dict()[str(depth)])  # fmt: skip

    # -- requests ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self) -> Iterator[Classifier]:
        """Admit one classification request and count it until its answer is built, so draining can wait."""
        self._admit()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield self.classifier
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _admit(self) -> None:
        """Called before the body is read: past max_in_flight, a flood of slow uploads would hold memory and
        sockets without bound, so the request is refused while it has cost nothing yet."""
        if self.state != READY:
            raise NotReady(f"the server is {self.state}: retry shortly or on another instance")
        if self._in_flight >= self.settings.max_in_flight:
            self.metrics.rejections.labels(NONE, "in_flight").inc()
            retry_after_s = self.device.retry_after_s()
            message = f"{self._in_flight} requests are in progress (max_in_flight): retry in {retry_after_s:.0f} s"
            raise Overloaded(message, retry_after_s)

    # -- shutdown ----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse new requests (503 not_ready, /readyz 503), let admitted ones finish, then empty the device,
        all within drain_timeout_s; what is still unfinished then fails with 503 not_ready."""
        if self.state != READY:
            return
        self.state = DRAINING
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.drain_timeout_s
        log.info("draining: %d request(s) in flight, %d image(s) on the device",
                 self._in_flight, self.device.batcher.pending_images())  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self._idle.wait()
        await self.device.batcher.stop(drain=True, timeout_s=max(0.0, until - loop.time()))
        log.info("drained")

    async def stop(self) -> None:
        """Drain, then release runtimes and threads. Safe to call in any state and more than once."""
        if self.state == STOPPED:
            return
        await self.drain()
        self.state = STOPPED
        if self.device is not None:
            await self.device.stop(drain=False, timeout_s=0)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def make_preprocessor(model: Model, max_pixels: int) -> Preprocessor:
    """The manifest's preprocessing must produce exactly the graph's input shape, or no request could run."""
    try:
        preprocessor = Preprocessor(model.manifest["preprocessing"], max_pixels)
    except (ValueError, KeyError, TypeError) as e:
        raise RepositoryError(f"model {model.name}: preprocessing cannot be followed ({e}); re-export it") from e
    expected = tuple(model.manifest["input"]["shape"][1:])
    if preprocessor.shape != expected:
        raise RepositoryError(
            f"model {model.name}: preprocessing makes {preprocessor.shape} but the graph takes {expected}; re-export it"
        )
    return preprocessor


def warm_up(runtime: Runtime, shape: tuple[int, ...], classes: int, batch: int, runs: int) -> float:
    """Time one batch size and check the answer: ready means the device actually answered, correctly shaped."""
    images = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)  # [batch, C, H, W]
    ms = measure_ms(runtime.run, images, runs)
    logits = runtime.run(images)
    if logits.shape != (batch, classes) or not np.isfinite(logits).all():
        raise RepositoryError(
            f"warm-up on {runtime.provider} returned {logits.shape} logits (finite: {np.isfinite(logits).all()}) "
            f"for a batch of {batch}; expected ({batch}, {classes}) finite values. Re-export the model."
        )
    return ms


def default_depth(setting: Depth | None, depths: list[int]) -> Depth:
    """The configured default, or the deepest served depth not above it; the deepest when unset."""
    if setting is None or setting == "auto":
        return setting or depths[-1]
    return max((d for d in depths if d <= setting), default=depths[0])
