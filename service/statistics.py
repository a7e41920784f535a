"""Triton's model statistics (the statistics extension), kept per (model, depth) for every protocol."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += round(seconds * 1e9)

    def merge(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns

    def to_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Stats:
    """One model folder's statistics, as Triton keeps them: per request (success, fail, and the time each
    successful request spent queued, decoding its input, in its batch, building its output) and per batch."""

    last_inference_ms: int = 0  # wall clock, ms since the epoch
    inference_count: int = 0  # images run
    execution_count: int = 0  # batches run
    phases: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in PHASES})
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))  # size -> compute_infer

    def merge(self, other: Stats) -> None:
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        for phase, d in other.phases.items():
            self.phases[phase].merge(d)
        for size, d in other.batches.items():
            self.batches[size].merge(d)

    def to_dict(self, name: str, version: str) -> dict:
        """Triton's JSON for one model version; compute_input and compute_output per batch are not split out
        of the batch here (decoding happens per request, before the batch), so they read 0."""
        zero = {"count": 0, "ns": 0}
        phases = {p: d.to_dict() for p, d in self.phases.items()}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": phases | {"cache_hit": zero, "cache_miss": zero},
            "batch_stats": [
                {"batch_size": size, "compute_input": zero, "compute_infer": d.to_dict(), "compute_output": zero}
                for size, d in sorted(self.batches.items())
            ],
        }


class Statistics:
    """Fed by the core (each answered request), by accounting (each failed one) and by the batcher's observer
    (each batch), whatever protocol the request came by."""

    def __init__(self):
        self._by_key: dict[tuple[str, int | None], Stats] = defaultdict(Stats)

    def succeeded(self, model: str, depth: int, *, total_s: float, queue_s: float, decode_s: float,
                  infer_s: float, output_s: float) -> None:  # fmt: skip
        stats = self._by_key[(model, depth)]
        stats.last_inference_ms = int(time.time() * 1000)
        for phase, seconds in (("success", total_s), ("queue", queue_s), ("compute_input", decode_s),
                               ("compute_infer", infer_s), ("compute_output", output_s)):  # fmt: skip
            stats.phases[phase].add(seconds)

    def failed(self, model: str, depth: int | None, seconds: float) -> None:
        """A request that reached a model and ended in an error; depth None: refused before one was chosen."""
        self._by_key[(model, depth)].phases["fail"].add(seconds)

    def batch(self, model: str, depth: int, size: int, run_s: float) -> None:
        stats = self._by_key[(model, depth)]
        stats.inference_count += size
        stats.execution_count += 1
        stats.batches[size].add(run_s)

    def collect(self, model: str, depth: int | None) -> Stats:
        """One depth's statistics, or (depth None) the sum over every depth of the model."""
        total = Stats()
        for (m, d), stats in list(self._by_key.items()):
            if m == model and (depth is None or d == depth):
                total.merge(stats)
        return total
