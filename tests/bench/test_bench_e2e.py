"""`srvit bench` against a real `srvit serve` process on a tiny exported model, over a socket."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import accuracy, cli, loadgen
from bench.images import load_pngs
from bench.loadgen import Target
from modelrepo.idx import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def pngs():
    return load_pngs(FASHION_MNIST_DIR, 64)[0]


def bench_cli(argv: list[str]) -> int:
    """`python -m bench ...` in this process: the package's own parser, as bench/__main__.py builds it."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(argv))


def served_count(server, depth: str) -> float:
    """srvit_requests_total{depth, status="200"} as the server itself counted it."""
    wanted = {"model": "tiny", "depth": depth, "status": "200", "protocol": "classify"}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == "srvit_requests_total" and sample.labels == wanted:
                return sample.value
    return 0.0


def test_closed_loop_summary_is_sane_and_matches_the_servers_count(server, pngs):
    before = served_count(server, "1")
    run = asyncio.run(loadgen.closed_loop(Target(server.url, "1"), pngs, concurrency=4, duration_s=2.0))
    s = loadgen.summarize(run)
    lat = s["latency_ms"]
    assert s["errors"] == {} and s["ok"] == s["requests"] > 20
    assert s["images_per_s"] == pytest.approx(s["ok"] / 2.0)
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] < 10_000
    assert s["depth_mix"] == {"1": 1.0}
    # Workers finish what they sent after the window closes: the server saw at least what was counted.
    assert s["ok"] <= served_count(server, "1") - before <= s["ok"] + 4


def test_open_loop_sends_the_offered_rate_whatever_the_answers(server, pngs):
    run = asyncio.run(loadgen.open_loop(Target(server.url, "auto"), pngs, rate=20.0, duration_s=1.5))
    s = loadgen.summarize(run)
    assert s["requests"] == 30 and s["ok"] == 30
    assert set(s["depth_mix"]) <= {"1", "2", "3"} and sum(s["depth_mix"].values()) == pytest.approx(1.0)


def test_load_command_writes_one_row_per_depth_and_concurrency(server, tmp_path):
    out = tmp_path / "load.json"
    argv = ["load", "--url", server.url, "--depth", "1,auto", "--concurrency", "2", "--duration", "1",
            "--warmup", "0", "--images", "16", "--json", str(out)]  # fmt: skip
    assert bench_cli(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["concurrency"]) for r in rows] == [("1", 2), ("auto", 2)]
    assert all(r["ok"] > 0 and r["errors"] == {} for r in rows)


def test_accuracy_command_scores_every_image_it_sent(server, tmp_path):
    out = tmp_path / "accuracy.json"
    argv = ["accuracy", "--url", server.url, "--depth", "1,2", "--limit", "48", "--concurrency", "4",
            "--json", str(out)]  # fmt: skip
    assert bench_cli(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["images"], r["answered"]) for r in rows] == [("1", 48, 48), ("2", 48, 48)]
    assert all(0 <= r["top1_http"] <= 1 and r["top1_manifest"] is None for r in rows)  # exported without data


def test_accuracy_compares_each_image_with_its_own_label():
    results = [loadgen.Result(0, 0.1, 200, 1, index) for index in (3, 1, 4, 1)] + [loadgen.Result(0, 0.1, 503)]
    row = accuracy.accuracy_row("1", results, np.array([3, 1, 5, 9, 2]), reference=0.6)
    assert (row["answered"], row["top1_http"], row["errors"]) == (4, 0.5, {"503": 1})
    assert row["difference"] == pytest.approx(-0.1)


def test_matrix_writes_every_run_the_closing_note_needs(tiny_repo, tmp_path, monkeypatch):
    """The whole pipeline at toy durations: two servers (batching on/off), raw ONNX Runtime, the auto run."""
    monkeypatch.setenv("SRVIT_SHUTDOWN_DELAY_S", "0")  # the matrix's servers take the caller's SRVIT_* settings
    argv = ["matrix", "--repo", str(tiny_repo), "--concurrency", "2", "--duration", "0.5",
            "--warmup", "0", "--raw-seconds", "0.3", "--out", str(tmp_path), "--tag", "toy"]  # fmt: skip
    assert bench_cli(argv) == 0
    report = json.loads((tmp_path / "toy.json").read_text())
    runs = {(r["batching"], r["depth"], r["concurrency"]) for r in report["server_runs"]}
    assert runs == {(b, d, c) for b in ("on", "off") for d in ("1", "3") for c in (2,)}  # shallowest and deepest
    assert all(r["mean_batch"] == 1 for r in report["server_runs"] if r["batching"] == "off")
    assert [r["depth"] for r in report["raw"]] == ["1", "3"] and all(r["server_over_raw"] > 0 for r in report["raw"])
    assert [r["depth"] for r in report["auto"]] == ["auto", "3"]
    assert report["machine"]["onnxruntime"] and report["setup"]["cores"]["sharing"]
    assert "## Overload" in (tmp_path / "toy.md").read_text()
