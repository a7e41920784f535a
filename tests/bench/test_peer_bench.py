"""The peer benchmark's harness, not its timings: a peer started as `srvit bench peers` starts one answers what the
model answers, its cells are tagged and summarized, wrk's cross-check parses, and the process group is gone after.

The naive peer runs in the project's own .venv here (it needs only FastAPI, uvicorn and ONNX Runtime); the real run
gives it .venv-peers/naive, like every other peer its own venv.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from bench import loadgen, peer_bench
from bench.images import load_pngs
from bench.loadgen import SRVIT, Target, Wire
from bench.peer_bench import QUICK, Bench, peer_served
from bench.peers.common import Classifier
from bench.wrk import parse_wrk
from modelrepo.idx import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "model_repo" / "srvit_fashion_d4"
NAIVE = replace(next(p for p in peer_bench.PEERS if p.name == "naive"), venv=".venv")

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def pngs():
    return load_pngs(FASHION_MNIST_DIR, 48)[0]


def test_a_peer_answers_what_the_model_answers_and_its_process_group_is_stopped(pngs):
    expected = [answer["predictions"][0]["index"] for answer in Classifier(FOLDER).classify(pngs)]
    with peer_served(NAIVE, FOLDER, None, 0.0) as server:
        results = asyncio.run(loadgen.sweep(Target(server.url, "4", wire=NAIVE.wire), pngs, 4))
        bad = httpx.post(server.url + NAIVE.wire.path, content=b"not an image", headers={"content-type": "image/png"})
        still = httpx.post(server.url + NAIVE.wire.path, content=pngs[0], headers={"content-type": "image/png"})
        group = server.process.pid
    assert [r.status for r in results] == [200] * len(pngs)
    assert [r.index for r in results] == expected
    assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]
    assert still.status_code == 200
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_peer_cells_are_tagged_summarized_and_cross_checked_by_wrk(pngs, tmp_path):
    plan = replace(QUICK, duration_s=1.0, warmup_s=0.3)
    report = {"runs": [], "wrk": []}
    bench = Bench(plan, report, tmp_path / "peers.json")
    tag = {"workload": "srvit_fashion", "placement": "pinned", "round": 1}
    bench.peer_cells(NAIVE, 0.0, FOLDER, pngs, "pinned", tag, (1, 4), 4, overload=True, wrk=True)
    bench.save()
    closed = [r for r in report["runs"] if r["kind"] == "closed"]
    assert [(r["server"], r["concurrency"], r["depth"]) for r in closed] == [("naive", 1, "4"), ("naive", 4, "4")]
    assert all(r["ok"] > 0 and r["errors"] == {} and len(r["latency_cdf_ms"]) == 100 for r in closed)
    (overload,) = [r for r in report["runs"] if r["kind"] == "overload"]
    capacity = max(r["images_per_s"] for r in closed)
    assert overload["rate"] == pytest.approx(1.5 * capacity) and 0 <= overload["answered_within"] <= 1
    (wrk,) = report["wrk"]
    assert wrk["server"] == "naive" and wrk["requests"] > 0 and wrk["non_2xx"] == 0 and wrk["socket_errors"] == 0
    assert 0 < wrk["latency_ms"]["p50"] <= wrk["latency_ms"]["p99"]
    assert json.loads((tmp_path / "peers.json").read_text())["runs"][0]["server"] == "naive"


def test_the_wire_formats_carry_the_image_and_read_the_answer():
    png = b"\x89PNG\r\n\x1a\n" + b"rest"
    assert Target("http://x", "4").request(png) == ({"content-type": "image/png"}, png)
    assert Target("http://x", "4").params == {"depth": "4", "top_k": 1}
    peer = Target("http://x", "4", wire=Wire("/predict", srvit=False))
    assert peer.params == {} and peer.request(b"\xff\xd8jpeg")[0] == {"content-type": "image/jpeg"}
    v2 = Target("http://x", "4", wire=Wire("/v2/models/m/infer", v2=True, srvit=False))
    headers, body = v2.request(png)
    header = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    assert header["inputs"][0]["datatype"] == "BYTES" and body.endswith(png)
    answer = {"predictions": [{"index": 3, "label": "Dress", "probability": 0.9}]}
    response = {"outputs": [{"name": "answer", "datatype": "BYTES", "shape": [1, 1], "data": [json.dumps(answer)]}]}
    assert loadgen.read_answer(response, v2.wire) == answer
    assert loadgen.read_answer(answer, SRVIT) == answer


def test_wrk_output_is_read_with_its_units():
    text = """Running 10s test @ http://127.0.0.1:8000/classify
  1 threads and 32 connections
  Latency Distribution
     50%  850.00us
     75%    2.50ms
     90%    1.20s
     99%    1.50m
  6019 requests in 10.01s, 2.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:    601.26
"""
    row = parse_wrk(text)
    assert row["requests_per_s"] == 601.26 and row["requests"] == 6019
    assert row["latency_ms"] == {"p50": 0.85, "p75": 2.5, "p90": 1200.0, "p99": 90_000.0}
    assert (row["non_2xx"], row["socket_errors"]) == (7, 5)
    with pytest.raises(RuntimeError, match="no Requests/sec"):
        parse_wrk("wrk: connection refused")


def test_top1_reads_every_depth_and_the_adaptive_policy_from_the_manifests():
    top1 = peer_bench.top1(ROOT / "model_repo", "srvit_fashion")
    manifests = {
        d: json.loads((ROOT / f"model_repo/srvit_fashion_d{d}/manifest.json").read_text()) for d in range(1, 5)
    }
    assert top1 == {str(d): m["accuracy"]["top1"] for d, m in manifests.items()} | {
        "adaptive": manifests[4]["adaptive"]["expected"]["check"]["top1"]
    }
