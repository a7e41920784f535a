"""Calibration and policy fitting on synthetic logits whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from export.calibration import calibrate, ece, fit_temperature, halves
from modelrepo.adaptive import AdaptivePolicy, Stage, advance, calibrated, simulate

RNG = np.random.default_rng(0)


def sampled_logits(n: int, classes: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits z * scale where softmax(z) is calibrated (labels are drawn from it): over-confident for scale > 1,
    and the temperature that undoes it is `scale`."""
    z = RNG.normal(0, 2.5, (n, classes))
    p = calibrated(z, 1.0)
    labels = np.array([RNG.choice(classes, p=row) for row in p])
    return z * scale, labels


def test_the_fitted_temperature_undoes_a_known_one_and_removes_the_calibration_error():
    logits, labels = sampled_logits(20_000, 5, scale=2.0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    before, after = ece(calibrated(logits, 1.0), labels), ece(calibrated(logits, t), labels)
    assert before > 0.1 and after < 0.02


def easy_and_hard(n: int = 4000):
    """Depth 1 is sure and right on easy images (60%), unsure and right on only half of the hard ones; depth 2
    is sure and right on every image. The cheapest policy that keeps depth 2's top-1 sends exactly the hard
    images on."""
    labels = RNG.integers(0, 4, n)
    hard = RNG.random(n) < 0.4
    d1 = np.zeros((n, 4))
    d1[np.arange(n), labels] = np.where(hard, 0.2, 6.0)  # hard: top probability ~0.3, easy: ~0.99
    wrong = hard & (RNG.random(n) < 0.5)
    d1[np.flatnonzero(wrong), (labels[wrong] + 1) % 4] = 0.6  # half the hard ones lean to a wrong class
    d2 = np.zeros((n, 4))
    d2[np.arange(n), labels] = 8.0
    return {1: d1, 2: d2}, labels, hard


def test_the_policy_sends_on_exactly_the_images_depth_1_is_unsure_of():
    logits, labels, hard = easy_and_hard()
    flops = {1: 1_000, 2: 3_000}
    result = calibrate(logits, labels, flops, "synthetic")
    policy = result.policy
    assert policy is not None and policy.depths == (1, 2)
    outcome = simulate(policy, logits, flops)
    assert np.array_equal(outcome.exit_stage == 1, hard)  # continued: the hard ones, and only those
    assert (outcome.probs.argmax(-1) == labels).mean() == 1.0
    check = halves(len(labels))[1]
    assert policy.expected["check"]["compute"] == pytest.approx((1_000 + hard[check].mean() * 3_000) / 3_000, abs=1e-3)
    assert set(result.calibration) == {1, 2} and all(r["temperature"] > 0 for r in result.calibration.values())
    front = [c.fit["compute"] for c in result.frontier]
    assert front == sorted(front) and any(c.policy.stages == policy.stages for c in result.frontier)


def test_no_policy_when_no_sequence_cheaper_than_the_deepest_depth_keeps_its_top_1():
    """Depth 1 is sure and wrong on a quarter of the images: no threshold can tell those from the right ones."""
    labels = RNG.integers(0, 4, 4000)
    shown = np.where(RNG.random(4000) < 0.25, (labels + 1) % 4, labels)
    d1, d2 = np.zeros((4000, 4)), np.zeros((4000, 4))
    d1[np.arange(4000), shown] = 6.0
    d2[np.arange(4000), labels] = 6.0
    assert calibrate({1: d1, 2: d2}, labels, {1: 1, 2: 3}, "synthetic").policy is None


def test_advance_and_simulate_follow_the_stages_and_the_combine_rule():
    stages = (Stage(1, 1.0, 0.9), Stage(3, 1.0, None))
    logits = {1: np.array([[5.0, 0.0], [0.2, 0.0]]), 3: np.array([[0.0, 9.0], [0.0, 9.0]])}
    last = simulate(AdaptivePolicy(stages, "last"), logits, {1: 10, 3: 30})
    assert list(last.exit_stage) == [0, 1] and list(last.flops) == [10, 40]
    assert list(last.probs.argmax(-1)) == [0, 1]
    mean = simulate(AdaptivePolicy(stages, "mean"), logits, {1: 10, 3: 30})
    both = (calibrated(logits[1][1:], 1.0) + calibrated(logits[3][1:], 1.0)) / 2
    assert np.allclose(mean.probs[1], both[0])
    total, combined, stop = advance(AdaptivePolicy(stages, "mean"), 0, None, logits[1])
    assert list(stop) == [True, False] and np.allclose(total, combined)


@pytest.mark.parametrize(
    "stages, fragment",
    [
        ((Stage(1, 1.0, None),), "at least two stages"),
        ((Stage(2, 1.0, 0.5), Stage(1, 1.0, None)), "increasing"),
        ((Stage(1, 1.0, 1.5), Stage(2, 1.0, None)), "threshold in"),
        ((Stage(1, 1.0, 0.5), Stage(2, 1.0, 0.5)), "last stage's threshold must be null"),
        ((Stage(1, -1.0, 0.5), Stage(2, 1.0, None)), "temperatures must be positive"),
    ],
)
def test_a_policy_no_server_could_follow_cannot_be_built(stages, fragment):
    with pytest.raises(ValueError, match=fragment):
        AdaptivePolicy(stages)
