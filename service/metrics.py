"""Prometheus metrics of one app: its own registry, srvit_ names, base units, labels from closed sets only."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.batcher import Key, Observer
from service.errors import ServiceError
from service.statistics import Statistics

# 0.5 ms .. 10 s: a small graph on a GPU and a deep one on a busy CPU land in the same buckets' range.
SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEPTH_BUCKETS = tuple(range(1, 13))  # exit depths of depth=adaptive
GFLOPS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # compute per image
# How a request's depth was chosen, for the compute per image: a fixed depth (asked for or the default), auto, adaptive.
DEPTH_MODES = ("fixed", "auto", "adaptive")
# Why a depth=adaptive image stopped where it did (modelrepo.adaptive and service.inference).
ADAPTIVE_REASONS = ("confident", "max_depth", "overload", "deadline")
NONE = ""  # label value before the model or depth is known (a request refused at the door)
# What depth=auto did with a request: "latency_target", the depth an idle server would give it (the latency target
# alone limits it); "overload", shallower because of the load; "refused". The share of the last two is the load
# that one more replica would serve at full accuracy: the autoscaling signal of deploy/kubernetes/.
AUTO_OUTCOMES = ("latency_target", "overload", "refused")
# The front end a request came by: POST /classify, the Open Inference Protocol over HTTP, or over gRPC.
PROTOCOLS = ("classify", "v2_http", "v2_grpc")


class Metrics:
    """Everything exported at /metrics. Model labels come from the repository, depth labels from its depths,
    status from the status-code contract, reasons from fixed sets; never a request id, path or user string."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        md = ("model", "depth")
        self.requests = self._counter("srvit_requests", "Classification requests by outcome and front end",
                                      (*md, "status", "protocol"))  # fmt: skip
        self.request_seconds = self._seconds("srvit_request_duration_seconds", "Successful request latency", md)
        self.queue_seconds = self._seconds("srvit_queue_wait_seconds", "Queued until its batch started", md)
        self.inference_seconds = self._seconds("srvit_inference_duration_seconds", "Time one batch ran", md)
        self.preprocess_seconds = self._seconds("srvit_preprocess_duration_seconds", "Decoding a request's images", md)
        self.batch_size = Histogram("srvit_batch_size_images", "Images per formed batch", md, buckets=BATCH_BUCKETS,
                                    registry=self.registry)  # fmt: skip
        self.images = self._counter("srvit_inference_images", "Images run through a graph", md)
        self.batches = self._counter("srvit_inference_batches", "Batches run", md)
        self.batch_failures = self._counter("srvit_inference_failures", "Batches whose inference failed", md)
        self.rejections = self._counter("srvit_rejections", "Requests refused before queueing", ("model", "reason"))
        self.drops = self._counter("srvit_dropped", "Queued requests that left without a result", ("model", "reason"))
        self.downgrades = self._counter("srvit_auto_depth_downgrades", "depth=auto requests served below the "
                                        "deepest depth", ("model", "reason"))  # fmt: skip
        self.auto_requests = self._counter("srvit_auto_depth_requests", "depth=auto requests by outcome: the "
                                           "idle depth, shallower for load, refused", ("model", "outcome"))  # fmt: skip
        self.adaptive_exits = Histogram("srvit_adaptive_exit_depth", "The depth each depth=adaptive image ended at, "
                                        "by why it stopped", ("model", "reason"), buckets=DEPTH_BUCKETS,
                                        registry=self.registry)  # fmt: skip
        self.adaptive_continued = self._counter("srvit_adaptive_continued_images", "depth=adaptive images sent on "
                                                "from one stage's depth to the next", ("model", "from_depth",
                                                "to_depth"))  # fmt: skip
        self.image_gflops = Histogram("srvit_image_gflops", "Compute spent per answered image (GFLOPs, summed over "
                                      "every depth it ran), by how its depth was chosen", ("model", "mode"),
                                      buckets=GFLOPS_BUCKETS, registry=self.registry)  # fmt: skip
        self.queue_images = Gauge("srvit_queue_images", "Images waiting per (model, depth)", md, registry=self.registry)
        self.auto_depth = Gauge("srvit_auto_depth", "The depth auto picks now", ["model"], registry=self.registry)
        self.max_depth = Gauge("srvit_max_depth", "The deepest served depth", ["model"], registry=self.registry)
        self.latency_target = Gauge("srvit_latency_target_seconds", "The completion time depth=auto aims for",
                                    registry=self.registry)  # fmt: skip
        self.ready = Gauge("srvit_ready", "1 while /readyz answers 200, else 0", registry=self.registry)

    def _counter(self, name: str, doc: str, labels: Sequence[str]) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _seconds(self, name: str, doc: str, labels: Sequence[str]) -> Histogram:
        return Histogram(name, doc, labels, buckets=SECONDS_BUCKETS, registry=self.registry)

    def watch_queue(self, key: Key, images: Callable[[], int]) -> None:
        self.queue_images.labels(*_md(key)).set_function(images)

    def watch_auto_depth(self, model: str, depth: Callable[[], int], max_depth: int) -> None:
        self.auto_depth.labels(model).set_function(depth)
        self.max_depth.labels(model).set(max_depth)
        for outcome in AUTO_OUTCOMES:  # every outcome exported from the start: a ratio over them is never empty
            self.auto_requests.labels(model, outcome)

    def watch_ready(self, ready: Callable[[], bool]) -> None:
        self.ready.set_function(lambda: float(ready()))

    def request(self, model: str, depth: int | None, status: int, protocol: str, seconds: float | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        labels = (model or NONE, NONE if depth is None else str(depth))
        self.requests.labels(*labels, str(status), protocol).inc()
        if status == 200 and seconds is not None:
            self.request_seconds.labels(*labels).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class BatchMetrics(Observer):
    """The batcher's events as metrics; the batcher itself never imports prometheus."""

    def __init__(self, metrics: Metrics, statistics: Statistics | None = None):
        self.m, self.statistics = metrics, statistics

    def on_delivered(self, key: Key, size: int, run_s: float) -> None:
        if self.statistics is not None:  # Triton counts the executions that succeeded
            self.statistics.batch(*key, size, run_s)

    def on_batch(self, key: Key, size: int, queue_wait_s: Sequence[float], run_s: float) -> None:
        labels = _md(key)
        self.m.batch_size.labels(*labels).observe(size)
        self.m.images.labels(*labels).inc(size)
        self.m.batches.labels(*labels).inc()
        self.m.inference_seconds.labels(*labels).observe(run_s)
        for wait in queue_wait_s:
            self.m.queue_seconds.labels(*labels).observe(wait)

    def on_error(self, key: Key, size: int, error: ServiceError) -> None:
        self.m.batch_failures.labels(*_md(key)).inc()

    def on_reject(self, key: Key, reason: str) -> None:
        self.m.rejections.labels(key[0], reason).inc()

    def on_drop(self, key: Key, reason: str) -> None:
        self.m.drops.labels(key[0], reason).inc()


def _md(key: Key) -> tuple[str, str]:
    model, depth = key
    return model, str(depth)
