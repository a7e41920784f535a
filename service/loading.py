"""Loading one model for serving: every depth opened on the device thread, warmed up, and profiled."""

from __future__ import annotations

import logging

import numpy as np

from service.autodepth import AutoDepth, Policy
from service.device import Device
from service.inference import Depth, ServedModel
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.profile import LatencyProfile, measure_ms, warmup_sizes
from service.repository import Model, RepositoryError
from service.runtime import Runtime, open_runtime
from service.settings import Settings

log = logging.getLogger(__name__)


async def serve_model(model: Model, device: Device, settings: Settings, metrics: Metrics) -> ServedModel:
    """Every depth loaded and warmed up on the device thread, into one latency profile for the model."""
    preprocessor = make_preprocessor(model, settings.max_pixels)
    profile = LatencyProfile()
    for depth in model.depths:
        await _load_depth(model, depth, profile, device, settings, metrics)
    s = settings
    auto = AutoDepth(model.depths, Policy(s.latency_target_ms, s.auto_headroom, s.auto_step_up_hold_s))
    metrics.watch_auto_depth(model.name, lambda: auto.current, model.depths[-1])
    return ServedModel(model, preprocessor, default_depth(s.default_depth, model.depths), auto)


async def _load_depth(model: Model, depth: int, profile: LatencyProfile, device: Device, settings: Settings,
                      metrics: Metrics) -> None:  # fmt: skip
    """Open and warm one depth; a graph that loads but fails to run stops start-up like a corrupt file."""
    try:
        await _open_and_warm(model, depth, profile, device, settings)
    except RepositoryError:
        raise
    except Exception as e:  # ONNX Runtime and TensorRT raise their own types
        raise RepositoryError(f"{model.name} depth {depth}: warm-up failed ({type(e).__name__}: {e})") from e
    key = (model.name, depth)
    metrics.watch_queue(key, lambda: device.queue_images(key))


async def _open_and_warm(model: Model, depth: int, profile: LatencyProfile, device: Device, s: Settings) -> None:
    artifacts = model.artifacts[depth]
    runtime = await device.call(open_runtime, artifacts, s.providers, s.intra_op_threads, s.intra_op_spinning)
    limit = min(s.max_batch_size, artifacts[0].max_batch_size)
    device.add((model.name, depth), runtime, limit, profile)  # added first, so a failed warm-up still closes it
    for batch in warmup_sizes(s.warmup_batch_sizes, limit):
        ms = await device.call(warm_up, runtime, model.manifest.chw, len(model.labels), batch, s.warmup_runs)
        profile.record(depth, batch, ms)
    check_watchdog_margin(model.name, depth, limit, ms, s.device_timeout_s)
    log.info("%s depth %d on %s: %s ms by batch size", model.name, depth, runtime.provider,
             profile.to_dict()[str(depth)])  # fmt: skip


def check_watchdog_margin(name: str, depth: int, batch: int, ms: float, device_timeout_s: float) -> None:
    """A full batch must run well inside device_timeout_s, or a busy but healthy device would be declared hung
    and restarted under load: refuse to start with what to change (half the timeout leaves room for a
    machine that is slower under load than at warm-up)."""
    if ms > device_timeout_s * 1000 / 2:
        raise RepositoryError(
            f"{name} depth {depth}: a batch of {batch} took {ms:.0f} ms at warm-up, more than half of "
            f"device_timeout_s ({device_timeout_s:g} s), so a healthy device could be declared hung: raise "
            f"SRVIT_DEVICE_TIMEOUT_S above {ms * 2 / 1000:.0f} s or lower SRVIT_MAX_BATCH_SIZE"
        )


def make_preprocessor(model: Model, max_pixels: int) -> Preprocessor:
    """The manifest's preprocessing (already checked against the graph's input by the contract) on this server."""
    try:
        return Preprocessor(model.manifest.preprocessing, max_pixels)
    except ValueError as e:
        raise RepositoryError(f"model {model.name}: preprocessing cannot be followed ({e}); re-export it") from e


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
