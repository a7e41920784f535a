"""The server's life and composition root: load every model, start the device, serve, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import start_http_server

from service.accounting import Accounting
from service.auth import KeyCheck, StartupKeyError, api_key
from service.device import Device
from service.forecast import Forecaster
from service.health import DRAINING, LEAVING, READY, SERVING, STARTING, STOPPED, is_ready, refusal
from service.inference import InferenceCore, PriorityPolicy, ServedModel
from service.loading import serve_model
from service.metrics import NONE, BatchMetrics, Metrics
from service.repository import load_repository
from service.settings import Settings
from service.statistics import Statistics

log = logging.getLogger(__name__)

GRPC_CLOSE_S = 5.0  # after draining, for gRPC calls still open (as uvicorn's graceful close for HTTP)


class StartupError(Exception):
    """Start-up cannot finish for a reason outside the repository (a port in use)."""


class Service:
    """Ready only once every depth of every model has answered warm-up batches: a load balancer that sees
    /readyz 200 can send traffic that will be served at the profiled speed, not at first-call speed.

    Adapters use `core` (inference), `accounting` (admission and counting) and `describe()`; the state is
    read through `service.health`.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.state = STARTING
        self.served: dict[str, ServedModel] = {}
        self.device: Device | None = None
        self.forecaster: Forecaster | None = None
        self.core: InferenceCore | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.grpc = None  # the GrpcFrontEnd, while grpc_port is on
        self.statistics = Statistics()
        self.keys = KeyCheck(None, lambda: self.metrics.rejections.labels(NONE, "unauthorized").inc())
        self._metrics_server = None  # the metrics_port's server, when set
        s = settings
        self.accounting = Accounting(self.metrics, self.statistics, s.max_in_flight, s.max_buffered_bytes,
                                     lambda: refusal(self), self._retry_after_s)  # fmt: skip
        self.metrics.latency_target.set(settings.latency_target_ms / 1000)
        self.metrics.watch_ready(lambda: is_ready(self))
        self._start_task: asyncio.Task | None = None
        self._delay_over: asyncio.Event | None = None  # set to end the shutdown delay early

    @property
    def executor_running(self) -> bool:
        return self.device is not None and self.device.batcher.running

    def _retry_after_s(self) -> float:
        return self.forecaster.retry_after_s() if self.forecaster is not None else 1.0

    async def start(self) -> None:
        """Idempotent: `srvit serve` calls it before uvicorn binds (so a bad repository exits with a plain
        message), and the app's lifespan calls it again for in-process use. Raises RepositoryError."""
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        s = self.settings
        try:
            self.keys.key = api_key(s)
        except StartupKeyError as e:
            raise StartupError(str(e)) from e
        models = await asyncio.to_thread(load_repository, s.repo)
        self.device = Device(s.max_queue_delay_ms, s.max_queue_images, BatchMetrics(self.metrics, self.statistics),
                             s.device_timeout_s)  # fmt: skip
        self.forecaster = Forecaster(self.device, s.max_queue_delay_ms)
        try:
            for model in models.values():
                self.served[model.name] = await serve_model(model, self.device, s, self.metrics)
        except BaseException:
            await self.device.stop(drain=False, timeout_s=0)
            raise
        self.pool = ThreadPoolExecutor(s.preprocess_threads, thread_name_prefix="srvit-preprocess")
        priority = PriorityPolicy(s.priority_levels, s.default_priority_level, s.priority_step_ms / 1000)
        self.core = InferenceCore(self.served, self.device.batcher, self.forecaster, self.pool, self.metrics,
                                  self.statistics, s.default_top_k, priority, s.max_queue_wait_ms,
                                  s.inline_decode_max_pixels)  # fmt: skip
        self.device.start()
        await self._start_front_ends()
        self.state = READY
        log.info("ready: %s", ", ".join(f"{n} depths {m.model.depths}" for n, m in self.served.items()))

    async def _start_front_ends(self) -> None:
        """gRPC on the same loop and core, and /metrics on a port of its own, when their ports are set; a port
        that cannot be bound stops start-up, with what was started stopped again."""
        s = self.settings
        try:
            if s.grpc_port:
                from service.grpc_server import GrpcFrontEnd  # grpc loads only when the port is on

                self.grpc = GrpcFrontEnd(self)
                await self.grpc.start()
            if s.metrics_port:
                try:
                    self._metrics_server, _ = start_http_server(s.metrics_port, s.host, self.metrics.registry)
                except OSError as e:
                    raise OSError(f"cannot serve /metrics on {s.host}:{s.metrics_port}: {e.strerror}") from e
        except OSError as e:
            if self.grpc is not None:
                await self.grpc.stop(0)
            await self.device.stop(drain=False, timeout_s=0)
            raise StartupError(str(e)) from e

    def describe(self) -> list[dict]:
        """Every served model as GET /v1/models shows it: depths, accuracy, measured latency, runtime, limits."""
        return [self._describe_model(served) for served in self.served.values()]

    def _describe_model(self, served: ServedModel) -> dict:
        model, profile = served.model, self.device.profiles[served.name].to_dict()
        return {
            "name": model.name,
            "version": str(model.version),
            "max_depth": model.max_depth,
            "default_depth": served.default_depth,
            "auto_depth": served.auto.current,
            "labels": len(model.labels),
            "input_shape": list(model.manifest.input.shape),
            "adaptive": None if model.adaptive is None else model.adaptive.to_dict(),
            "depths": [
                {
                    "depth": depth,
                    "accuracy": model.accuracy(depth),
                    "gflops": None if model.flops(depth) is None else model.flops(depth) / 1e9,
                    "latency_ms": profile[str(depth)],
                    "runtime": self.device.runtimes[(model.name, depth)].provider,
                    "max_batch_size": self.device.limits[(model.name, depth)],
                }
                for depth in model.depths
            ],
        }

    # -- shutdown ----------------------------------------------------------------------------------

    async def leave(self) -> None:
        """SIGTERM's first step: unready at once (/readyz and V2 readiness 503) while new requests are still
        served for shutdown_delay_s, or until `cut_delay_short`; then `drain`. Behind a load balancer or a
        Kubernetes Service, requests routed here before the endpoint is removed are served, not refused."""
        if self.state != READY:
            return
        self.state = LEAVING
        self._delay_over = asyncio.Event()
        log.info("leaving: unready, still serving for %.1f s", self.settings.shutdown_delay_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_delay_s):
                await self._delay_over.wait()
        await self.drain()

    def cut_delay_short(self) -> bool:
        """End the shutdown delay now (a second signal); False when there is none to cut."""
        if self.state != LEAVING:
            return False
        self._delay_over.set()
        return True

    async def drain(self) -> None:
        """Refuse new requests (503 not_ready, /readyz 503), let admitted ones finish, then empty the device,
        all within drain_timeout_s; what is still unfinished then fails with 503 not_ready."""
        if self.state not in SERVING:
            return
        self.state = DRAINING
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.drain_timeout_s
        log.info("draining: %d request(s) in flight, %d image(s) on the device",
                 self.accounting.in_flight, self.device.batcher.pending_images())  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self.accounting.idle.wait()
        await self.device.batcher.stop(drain=True, timeout_s=max(0.0, until - loop.time()))
        log.info("drained")

    async def stop(self) -> None:
        """Drain, then release runtimes and threads. Safe to call in any state and more than once."""
        if self.state == STOPPED:
            return
        await self.drain()
        self.state = STOPPED
        if self.grpc is not None:
            await self.grpc.stop(GRPC_CLOSE_S)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.device is not None:
            await self.device.stop(drain=False, timeout_s=0)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
