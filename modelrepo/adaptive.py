"""depth=adaptive: the calibrated early-exit policy one export fits and every server follows, in one place.

An image runs the first stage's depth; while its answer's calibrated top probability stays below the stage's
threshold, it runs the next stage's depth, up to the last. The answer after a stage is that stage's calibrated
probabilities (`combine` "last"), or their mean over the stages run so far ("mean"): the exporter picks whichever
is more accurate for the model. Each stage is a whole graph (the
recursion is per block, so a deeper graph shares no work with a shallower one): an image that reaches a stage
pays that stage's full cost. The exporter fits the policy (`export/calibration.py`) by simulating it with
`simulate`, and the server (`service/inference.py`) answers with `advance`: what was fitted is what is served.

Torch-free and numpy-only, like the rest of the contract (`modelrepo.manifest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

COMBINES = ("last", "mean")  # the answer after k stages: the last stage's calibrated probabilities, or their mean
CONFIDENT, MAX_DEPTH = "confident", "max_depth"  # why an image stopped where the policy put it


@dataclass(frozen=True)
class Stage:
    depth: int
    temperature: float  # the depth's logits are divided by it before the softmax
    threshold: float | None  # stop when the combined top probability reaches it; None on the last stage


@dataclass(frozen=True)
class AdaptivePolicy:
    """The stages in order, and the exporter's record of what the policy is expected to give (`expected`:
    top-1 and compute on the halves of the held-out split it was fitted and checked on)."""

    stages: tuple[Stage, ...]
    combine: str = "last"
    expected: dict | None = None

    def __post_init__(self):
        problems = _problems(self.stages) + ([] if self.combine in COMBINES else [f"combine must be one of {COMBINES}"])
        if problems:
            raise ValueError("adaptive policy: " + "; ".join(problems))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(stage.depth for stage in self.stages)

    @classmethod
    def from_dict(cls, raw: Any) -> AdaptivePolicy:
        """Raises ValueError for a policy a server could not follow."""
        if (
            not isinstance(raw, Mapping)
            or raw.get("combine") not in COMBINES
            or not isinstance(raw.get("stages"), list)
        ):
            raise ValueError(f"adaptive policy must be {{'combine': one of {COMBINES}, 'stages': [...]}}")
        try:
            stages = tuple(Stage(s["depth"], s["temperature"], s["threshold"]) for s in raw["stages"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"adaptive policy: each stage needs depth, temperature and threshold ({e})") from None
        expected = raw.get("expected")
        if expected is not None and not isinstance(expected, dict):
            raise ValueError("adaptive policy: expected must be an object or null")
        return cls(stages, raw["combine"], expected)

    def to_dict(self) -> dict:
        stages = [{"depth": s.depth, "temperature": s.temperature, "threshold": s.threshold} for s in self.stages]
        return {"combine": self.combine, "stages": stages, "expected": self.expected}


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64, shifted by the max so large logits cannot overflow."""
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def advance(policy: AdaptivePolicy, k: int, total: np.ndarray | None, logits: np.ndarray):
    """Stage k's logits [m, classes] for the m images that ran it, with `total`, the sum of their calibrated
    probabilities over stages 0..k-1 (None at stage 0). Returns (the new total, the answer's probabilities, and
    which images stop here: the confident ones, or all at the last stage)."""
    stage = policy.stages[k]
    p = calibrated(logits, stage.temperature)
    total = p if total is None else total + p
    combined = total / (k + 1) if policy.combine == "mean" else p
    stop = np.ones(len(p), bool) if stage.threshold is None else combined.max(axis=-1) >= stage.threshold
    return total, combined, stop


@dataclass(frozen=True)
class Outcome:
    exit_stage: np.ndarray  # [n] index of the stage each image stopped at
    probs: np.ndarray  # [n, classes] the combined probabilities each answer gives
    flops: np.ndarray  # [n] compute spent on each image: the sum of the FLOPs of the depths it ran


def simulate(policy: AdaptivePolicy, logits: Mapping[int, np.ndarray], flops: Mapping[int, float]) -> Outcome:
    """The policy on precomputed logits per depth ([n, classes] each, same images in the same order), exactly as
    the server runs it image by image."""
    n, classes = next(iter(logits.values())).shape
    exit_stage, probs, spent = np.zeros(n, int), np.zeros((n, classes)), np.zeros(n)
    alive, total = np.arange(n), None
    for k, stage in enumerate(policy.stages):
        spent[alive] += flops[stage.depth]
        total, combined, stop = advance(policy, k, total, logits[stage.depth][alive])
        exit_stage[alive[stop]], probs[alive[stop]] = k, combined[stop]
        alive, total = alive[~stop], total[~stop]
        if len(alive) == 0:
            break
    return Outcome(exit_stage, probs, spent)


def _problems(stages: tuple[Stage, ...]) -> list[str]:
    if len(stages) < 2:
        return ["needs at least two stages"]
    depths = [s.depth for s in stages]
    checks = [
        (all(_positive_int(d) for d in depths) and depths == sorted(set(depths)),
         f"stage depths must be increasing positive integers, got {depths}"),
        (all(_number(s.temperature) and s.temperature > 0 for s in stages), "temperatures must be positive numbers"),
        (all(_number(s.threshold) and 0 < s.threshold <= 1 for s in stages[:-1]),
         "every stage but the last needs a threshold in (0, 1]"),
        (stages[-1].threshold is None, "the last stage's threshold must be null: every image stops there"),
    ]  # fmt: skip
    return [message for ok, message in checks if not ok]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
