"""90 s of `srvit bench soak` against a real `srvit serve`: mixed traffic on every protocol with faults, then
every request answered once, every good answer right, nothing growing (the 15-minute figures: docs/)."""

from __future__ import annotations

from pathlib import Path

from server_process import ServerProcess

from bench import soak

REPO = Path(__file__).parents[2] / "model_repo"  # the embedded srvit_fashion with the default limits
SECONDS = 90


def test_ninety_seconds_of_mixed_traffic_with_faults_lose_nothing_and_grow_nothing(tmp_path):
    proc = ServerProcess(REPO, tmp_path / "serve.log", env={"SRVIT_LOG_FORMAT": "json", "MALLOC_ARENA_MAX": "2"})
    try:
        proc.wait_ready()
        report = soak.run_soak_against(proc.url, proc.grpc_url, proc.proc.pid, proc.log_path, "srvit_fashion",
                                       SECONDS, workers=8)  # fmt: skip
    finally:
        proc.stop()
    print(soak.summary(report))
    assert report["checks"] == dict.fromkeys(report["checks"], True), soak.summary(report)
    kinds = report["server_answers_by_kind_and_status"]
    # every kind of traffic reached the server, hang-ups and cancellations while queued included
    assert {"good classify 200", "good v2 http 200", "good v2 grpc 200", "hang up http 499", "cancel grpc 499"} <= set(
        kinds
    )
    assert report["requests"] > 5000
