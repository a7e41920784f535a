"""Memory of a real `srvit serve` under repeated abuse: flat across rounds, its peak bounded by max_buffered_bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from server_process import ServerProcess

from bench import hostile, memory, photos

REPO = Path(__file__).parents[2] / "model_repo"  # the embedded srvit_fashion, as users serve it
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """The embedded model with the default limits (16 MiB bodies, 64 MiB buffered), as in the image."""
    proc = ServerProcess(REPO, tmp_path_factory.mktemp("log") / "serve.log", env={"MALLOC_ARENA_MAX": "2"})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_memory_is_flat_over_five_rounds_of_photos_and_abuse_and_each_peak_is_bounded(defaults):
    report = memory.run_rounds(defaults.url, defaults.proc.pid, "srvit_fashion", 16 * MiB, rounds=5)
    rounds = report["rounds"]
    print(memory.summary(report))
    assert [r["unexpected"] for r in rounds] == [[]] * 5  # every probe got the contract's answer
    assert all(r["statuses"]["200"] == 16 for r in rounds)  # every 12 MP photo was classified
    assert rounds[4]["after_mib"] - rounds[1]["after_mib"] <= 8  # a leak would grow every round
    assert max(r["peak_mib"] - r["before_mib"] for r in rounds) <= 96


def test_eight_concurrent_64_mib_bodies_raise_the_peak_by_under_128_mib(defaults):
    workload = memory.Workload("127.0.0.1", defaults.port, "srvit_fashion", 16 * MiB, photos=[], probes=False)
    result = asyncio.run(workload.run(defaults.proc.pid))
    assert set(result.statuses) <= {"413", "503", "0"} and not result.unexpected
    assert result.peak_mib - result.before_mib < 128


def test_a_body_past_the_buffer_budget_is_refused_before_it_is_read(tiny_repo, tmp_path):
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--max-body-bytes", "100000", "--max-buffered-bytes",
                         "150000", "--body-timeout-s", "5")  # fmt: skip
    expect = {"Content-Type": "image/png", "Content-Length": "60000", "Expect": "100-continue"}

    async def scenario():
        # a slow chunked upload holds max_body_bytes of the budget until it ends
        slow = asyncio.ensure_future(hostile.post("127.0.0.1", proc.port, "/classify", {"Content-Type": "image/png"},
                                                  hostile.zeros(80_000, 0.3, 10_000)))  # fmt: skip
        await asyncio.sleep(0.5)
        refused = await hostile.post("127.0.0.1", proc.port, "/classify", expect, hostile.zeros(60_000))
        photo = photos.jpeg("chelsea.png", (300, 200))
        later = await hostile.post("127.0.0.1", proc.port, "/classify", {"Content-Type": "image/jpeg"}, photo)
        return refused, [await slow, later]

    try:
        proc.wait_ready()
        refused, (slow, later) = asyncio.run(scenario())
    finally:
        proc.stop()
    assert (refused.status, refused.json()["code"], refused.headers["retry-after"]) == (503, "overloaded", "1")
    assert "max_buffered_bytes" in refused.json()["error"]
    assert slow.status == 400 and later.status == 200  # the room came back when the slow upload ended
