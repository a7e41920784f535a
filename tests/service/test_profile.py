"""service.profile: interpolation between measured batch sizes, extrapolation, online correction."""

from __future__ import annotations

import pytest

from service.profile import LatencyProfile, measure_ms, warmup_sizes


def profile() -> LatencyProfile:
    p = LatencyProfile()
    for batch, ms in ((1, 2.0), (4, 5.0), (16, 17.0)):
        p.record(1, batch, ms)
    p.record(2, 8, 40.0)
    return p


def test_measured_sizes_are_exact_and_others_interpolate():
    p = profile()
    assert [p.predict_ms(1, b) for b in (1, 4, 16)] == [2.0, 5.0, 17.0]
    assert p.predict_ms(1, 2) == pytest.approx(3.0)
    assert p.predict_ms(1, 10) == pytest.approx(11.0)


def test_beyond_the_largest_size_grows_with_the_last_slope():
    assert profile().predict_ms(1, 32) == pytest.approx(33.0)


def test_single_point_scales_with_batch_and_never_drops_below_it():
    p = profile()
    assert p.predict_ms(2, 16) == pytest.approx(80.0)
    assert p.predict_ms(2, 1) == pytest.approx(40.0)  # smaller batches are not assumed to be cheaper


def test_live_batches_correct_the_prediction_gradually_and_boundedly():
    p = profile()
    for _ in range(50):
        p.observe(1, 4, 10.0)  # twice as slow as measured: a neighbour is using the device
    assert p.predict_ms(1, 4) == pytest.approx(10.0, rel=0.02)
    assert p.predict_ms(2, 8) == 40.0  # per depth
    for _ in range(100):
        p.observe(1, 4, 5000.0)
    assert p.predict_ms(1, 4) <= 4 * 5.0 + 1e-9


def test_profile_dict_is_what_was_measured():
    assert profile().to_dict()["1"] == {"1": 2.0, "4": 5.0, "16": 17.0}


def test_warmup_sizes_fit_the_batch_limit_and_include_it():
    assert warmup_sizes((1, 4, 16, 64), 8) == [1, 4, 8]
    assert warmup_sizes((1,), 1) == [1]


def test_measure_is_the_median_after_an_untimed_first_call():
    calls = []
    measure_ms(lambda images: calls.append(images), images="x", runs=3)
    assert len(calls) == 4
