"""The soak's own judgement: what counts as lost, and a memory slope one outlier cannot fake or hide."""

from __future__ import annotations

from bench.soak import Sample, lost, slope_mib_per_min


def test_a_request_answered_twice_or_never_is_lost_but_a_cancelled_call_the_server_never_read_is_not():
    sent = {"a": "good classify", "b": "good classify", "c": "cancel grpc", "d": "cancel grpc", "e": "hang up http"}
    logged = {"a": [200], "b": [200, 200], "d": [499, 200]}
    assert lost(sent, logged) == ["b", "d", "e"]


def test_the_slope_follows_a_steady_creep_and_ignores_one_sample_caught_mid_release():
    creep = [Sample(t_s=60 * m, rss_mib=300 + 0.5 * m, fds=17, threads=18) for m in range(10)]
    assert abs(slope_mib_per_min(creep) - 0.5) < 1e-9
    creep[2] = Sample(t_s=120, rss_mib=340, fds=17, threads=18)  # +39 MiB once, early: least squares says -0.7
    assert abs(slope_mib_per_min(creep) - 0.5) < 0.05
