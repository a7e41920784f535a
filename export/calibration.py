"""Calibration and the adaptive policy, fitted at export on the held-out split's logits (numpy only).

The split is cut in two by image index, even and odd: temperatures and the policy are fitted on the first half
and every figure is also reported on the second, so the choice is not judged only on the data it was fitted on.

1. Per depth, the temperature that minimises the negative log-likelihood (a log-spaced grid), and the expected
   calibration error before and after (15 equal-width confidence bins).
2. Candidate policies: every increasing sequence of 2 to 3 exported depths, with a threshold per stage but the
   last from a grid (finer for fewer stages), answering with the last stage's probabilities or the mean of all
   stages run (`modelrepo.adaptive.COMBINES`: averaging helps some models and depths and hurts others). Each is
   simulated with `modelrepo.adaptive.simulate`, exactly as the server will run it; its compute is the mean
   FLOPs per image, as a fraction of the deepest depth's.
3. The choice: the cheapest candidate, if cheaper than the deepest depth alone, whose fit-half top-1 is within
   `TOLERANCE` of the deepest depth's less `MARGIN` (half the tolerance, kept for the images it was not fitted
   on); among equal cost, the more accurate.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from modelrepo.adaptive import COMBINES, AdaptivePolicy, Stage, calibrated, simulate

TOLERANCE = 0.001  # top-1 may fall at most 0.1 point below the deepest depth's
MARGIN = 0.0005  # of it, kept back when choosing on the fit half
BINS = 15
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(10.0), 400))
GRIDS = {1: np.round(np.linspace(0.40, 0.99, 60), 3), 2: np.round(np.linspace(0.40, 0.98, 20), 3),
         3: np.round(np.linspace(0.40, 0.96, 15), 3)}  # fmt: skip  # thresholds, by the number of them
MAX_STAGES = 3


@dataclass(frozen=True)
class Candidate:
    policy: AdaptivePolicy
    fit: dict  # {"top1", "compute"} on the fit half
    check: dict  # the same on the check half


@dataclass(frozen=True)
class Calibration:
    calibration: dict[int, dict]  # per depth: the manifest's `calibration` record
    policy: AdaptivePolicy | None  # None when no candidate keeps top-1 within the tolerance
    frontier: list[Candidate]  # the fit half's Pareto front, cheapest first


def halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(n)
    return index[index % 2 == 0], index[index % 2 == 1]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    rows = np.arange(len(labels))
    nll = [-np.log(calibrated(logits, t)[rows, labels] + 1e-12).mean() for t in TEMPERATURES]
    return round(float(TEMPERATURES[int(np.argmin(nll))]), 4)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: per confidence bin, |accuracy - mean confidence|, weighted by the bin's share."""
    confidence, correct = probs.max(axis=-1), probs.argmax(axis=-1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return round(float(total), 4)


def calibrate(logits: Mapping[int, np.ndarray], labels: np.ndarray, flops: Mapping[int, int],
              split: str) -> Calibration:  # fmt: skip
    """Temperatures, ECE and the policy from `logits` per exported depth on the whole held-out split."""
    fit, check = halves(len(labels))
    parts = {"fit": fit, "check": check}
    records, temperatures = {}, {}
    for depth, z in sorted(logits.items()):
        t = temperatures[depth] = fit_temperature(z[fit], labels[fit])
        records[depth] = {
            "temperature": t,
            "ece_before": {name: ece(calibrated(z[idx], 1.0), labels[idx]) for name, idx in parts.items()},
            "ece_after": {name: ece(calibrated(z[idx], t), labels[idx]) for name, idx in parts.items()},
            "split": split, "fit_images": len(fit), "check_images": len(check), "bins": BINS,
        }  # fmt: skip
    candidates = [evaluate(p, logits, labels, flops, fit, check) for p in candidate_policies(temperatures)]
    deepest = max(logits)
    reference = {name: top1(logits[deepest][idx], labels[idx]) for name, idx in parts.items()}
    chosen = choose(candidates, reference["fit"])
    policy = None
    if chosen is not None:
        expected = {
            "split": split, "fit": chosen.fit, "check": chosen.check, "deepest": deepest,
            "deepest_top1": reference, "tolerance": TOLERANCE, "margin": MARGIN,
            "compute": "mean FLOPs per image as a fraction of the deepest depth's",
        }  # fmt: skip
        policy = AdaptivePolicy(chosen.policy.stages, chosen.policy.combine, expected)
    return Calibration(records, policy, pareto(candidates))


def candidate_policies(temperatures: Mapping[int, float]):
    depths = sorted(temperatures)
    for size in range(2, min(MAX_STAGES, len(depths)) + 1):
        for sequence in itertools.combinations(depths, size):
            for thresholds in itertools.product(GRIDS[size - 1], repeat=size - 1):
                stages = [Stage(d, temperatures[d], float(t)) for d, t in zip(sequence, thresholds, strict=False)]
                last = Stage(sequence[-1], temperatures[sequence[-1]], None)
                for combine in COMBINES:
                    yield AdaptivePolicy((*stages, last), combine)


def evaluate(policy: AdaptivePolicy, logits, labels, flops, fit, check) -> Candidate:
    deepest = flops[max(logits)]
    figures = []
    for idx in (fit, check):
        outcome = simulate(policy, {d: z[idx] for d, z in logits.items()}, flops)
        compute = round(float(outcome.flops.mean() / deepest), 4)
        figures.append({"top1": top1(outcome.probs, labels[idx]), "compute": compute})
    return Candidate(policy, *figures)


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return round(float((scores.argmax(axis=-1) == labels).mean()), 4)


def choose(candidates: list[Candidate], deepest_top1: float) -> Candidate | None:
    floor = deepest_top1 - TOLERANCE + MARGIN - 1e-9
    eligible = [c for c in candidates if c.fit["top1"] >= floor and c.fit["compute"] < 1]
    return min(eligible, key=lambda c: (c.fit["compute"], -c.fit["top1"]), default=None)


def pareto(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on the fit half in both top-1 and compute, cheapest first."""
    front, best = [], -1.0
    for c in sorted(candidates, key=lambda c: (c.fit["compute"], -c.fit["top1"])):
        if c.fit["top1"] > best:
            front.append(c)
            best = c.fit["top1"]
    return front
