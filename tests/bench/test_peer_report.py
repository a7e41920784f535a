"""The peer benchmark's report: figures and target verdicts computed from the runs, sections only where there is
data, plots written and linked. The runs are synthetic, shaped as `srvit bench peers` writes them."""

from __future__ import annotations

import json
import struct

import pytest

from bench.model_level import derive
from bench.peer_report import markdown, targets, write_peer_report
from bench.report import finite

FASHION, SMALL = "srvit_fashion", "srvit_small_patch16_224"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(server, concurrency, images_per_s, p50, p99, *, depth="4", workload=FASHION, placement="pinned", round_=1,
        **extra) -> dict:  # fmt: skip
    cdf = [p50 * p / 50 if p <= 50 else p50 + (p99 - p50) * (p - 50) / 49 for p in range(1, 101)]
    return {"depth": depth, "concurrency": concurrency, "requests": 100, "ok": 100, "errors": {},
            "images_per_s": images_per_s, "latency_ms": {"p50": p50, "p95": p99 * 0.9, "p99": p99, "mean": p50,
            "max": p99}, "latency_cdf_ms": cdf, "depth_mix": {depth: 1.0}, "workload": workload,
            "placement": placement, "round": round_, "server": server, "kind": "closed"} | extra  # fmt: skip


def overload(server, depth, answered_within, p99, errors) -> dict:
    row = run(server, None, 150.0, 40.0, p99, depth=depth, kind="overload", rate=300.0, capacity=200.0, overload=1.5,
              within_ms=100.0, answered_within=answered_within, errors=errors)  # fmt: skip
    row.pop("concurrency")
    return row | {"requests": 1000, "ok": 1000 - sum(errors.values())}


def headline_runs() -> list[dict]:
    """Three rounds of c=1 and c=32 at max depth. Medians: c=32 srvit 310, triton 240 (1.29x), naive 105 images/s;
    c=1 p50 srvit 5.1, triton 4.95 ms (+0.15); c=1 images/s srvit 195, triton 199."""
    cells = {"srvit": ([300, 320, 310], [90, 95, 100], [205, 195, 192], [5.0, 5.2, 5.1]),
             "triton": ([200, 250, 240], [120, 130, 110], [200, 198, 199], [4.9, 5.0, 4.95]),
             "naive": ([100, 110, 105], [300, 310, 999], [90, 95, 92], [9.0, 9.5, 9.2])}  # fmt: skip
    rows = []
    for server, (rates, p99s, rates1, p50s) in cells.items():
        for i in range(3):
            rows.append(run(server, 32, rates[i], p99s[i] / 2, p99s[i], round_=i + 1))
            rows.append(run(server, 1, rates1[i], p50s[i], p50s[i] * 2, round_=i + 1))
    rows[-2]["latency_ms"]["p99"] = None  # naive's last c=32 round: NaN in the JSON, read back as null
    return rows


def base_report() -> dict:
    """A full run's fashion part; no tuning, no model-bound workload, no model level."""
    frontier = [run("srvit", c, 400.0 - 50 * int(d), 3.0 + int(d), 80.0, depth=d) for d in "123" for c in (1, 32)]
    frontier += [run("srvit", 1, 180.0, 5.5, 11.0, depth="auto", depth_mix={"4": 1.0}),
                 run("srvit", 32, 360.0, 70.0, 90.0, depth="auto", depth_mix={"1": 0.5, "4": 0.5}),
                 run("srvit", 1, 220.0, 4.0, 8.0, depth="adaptive"),
                 run("srvit", 32, 380.0, 65.0, 85.0, depth="adaptive", depth_mix={"1": 0.8, "3": 0.2})]  # fmt: skip
    # Round 1 also at c=8 (pinned) and shared: srvit ahead everywhere but shared c=1 (150 vs 160 images/s).
    extra = [run("srvit", 8, 250.0, 30.0, 50.0), run("triton", 8, 200.0, 35.0, 60.0), run("naive", 8, 90.0, 80, 90),
             run("srvit", 1, 150.0, 6.0, 12.0, placement="shared"), run("srvit", 32, 280, 90, 120, placement="shared"),
             run("triton", 1, 160.0, 5.5, 11.0, placement="shared"),
             run("triton", 32, 200.0, 140.0, 200.0, placement="shared")]  # fmt: skip
    overloads = [overload("srvit", "auto", 0.995, 95.0, {"503": 5}), overload("srvit", "4", 0.5, 400.0, {"503": 400}),
                 overload("triton", "4", 0.2, 1500.0, {"error:TimeoutError": 3})]  # fmt: skip
    peer = {"package": "nvidia-pytriton", "version": "0.7.0", "module": "bench.peers.pytriton_server",
            "config": {"max_batch": 32, "max_delay_ms": 1.0}}  # fmt: skip
    return {
        "machine": {"cpu": "Test CPU", "logical_cpus": 2, "cpus_usable": 2, "onnxruntime": "1.32.0",
                    "python": "3.11.7", "date": "2026-12-01T20:34:46+00:00", "git_commit": "5de2ca9148b2b745"},
        "plan": {"concurrency": [1, 8, 32], "duration_s": 8.0, "warmup_s": 2.0, "placements": ["pinned", "shared"],
                 "rounds": 3, "tune": False, "small_depths": [], "wrk": True, "overload": 1.5},
        "latency_target_ms": 100.0,
        "servers": {"srvit": {"version": "5de2ca9148b2b745", "config": {"SRVIT_LATENCY_TARGET_MS": "100"}},
                    "triton": peer, "naive": peer | {"package": "fastapi", "module": "bench.peers.naive"}},
        "runs": headline_runs() + frontier + extra + overloads,
        "tuning": [], "raw": [],
        "wrk": [{"requests_per_s": 330.0, "latency_ms": {"p50": 55.0, "p75": 60.0, "p90": 70.0, "p99": 99.0},
                 "non_2xx": 0, "socket_errors": 0, "workload": FASHION, "placement": "pinned", "round": 1,
                 "server": "srvit", "depth": "4", "concurrency": 32}],
        "top1": {FASHION: {"1": 0.90, "2": 0.92, "3": 0.93, "4": 0.935, "adaptive": 0.925}, SMALL: None},
    }  # fmt: skip


def model_level(model: str, ratios: dict[int, float]) -> dict:
    """bench.model_level's results for one depth, ONNX Runtime at `ratio` x eager's images/s per batch."""
    rate = lambda v: {"median": v, "min": v, "max": v}
    cells = [{"depth": 1, "batch": b, "flops_per_image": 1e9, "max_abs_diff": {"onnxruntime": 1e-6},
              "onnxruntime": rate(100.0 * r), "eager": rate(100.0)} for b, r in ratios.items()]  # fmt: skip
    results = {"model": model, "machine": {"cpu": "Test CPU", "cpus_usable": 1, "loadavg_at_start": [0.1, 0, 0]},
               "threads": {"onnxruntime": 1, "torch": 1}, "repetitions": 5, "seconds": 2.0,
               "versions": {"torch": "2.13", "onnxruntime": "1.32"}, "cells": cells,
               "peak": {"n": 2048, "gflops": 500.0, "best": "numpy",
                        **{r: rate(400.0) for r in ("onnxruntime", "numpy", "torch")}},
               "compile": {"enabled": False, "error": None}}  # fmt: skip
    return results | derive(results)


def full_report() -> dict:
    """With tuning, the model-bound workload (srvit ahead at depth 1, behind at depth 2) and the model level."""
    report = base_report()
    report["tuning"] = [run("triton", 32, v, 60.0, p, max_delay_ms=d) for d, v, p in ((0, 230, 140), (1, 240, 120))]
    report["plan"]["small_depths"] = [1, 2]
    small = {("srvit", "1"): (100.0, 200.0), ("triton", "1"): (98.0, 210.0), ("srvit", "2"): (50.0, 300.0),
             ("triton", "2"): (60.0, 250.0)}  # fmt: skip
    for (server, depth), (images_per_s, p99) in small.items():
        report["runs"] += [run(server, 64, images_per_s, p99 / 2, p99, depth=depth, workload=SMALL),
                           run(server, 1, images_per_s / 4, 20.0, 30.0, depth=depth, workload=SMALL)]  # fmt: skip
    report["raw"] = [{"workload": SMALL, "depth": d, "batch": 8, "images_per_s": v / 0.95, "server_images_per_s": v,
                      "server_over_raw": r} for d, v, r in (("1", 100.0, 0.95), ("2", 50.0, 0.92))]  # fmt: skip
    report["model_level"] = {FASHION: model_level(FASHION, {1: 1.5, 32: 1.2}),
                             SMALL: model_level(SMALL, {1: 1.4, 32: 1.15})}  # fmt: skip
    return report


def verdicts(report: dict) -> dict[str, tuple[bool | None, str]]:
    """Target -> (met, figures), keyed by the target's first words."""
    keys = {"fashion, pinned, c=32": "throughput", "fashion, every": "everywhere", "fashion, pinned, c=1: srvit's p50":
            "c1 p50", "fashion, pinned, c=1: srvit the": "c1 throughput", "model-bound, every depth: srvit >=": "small",
            "model-bound, every depth: srvit's p99": "small p99", "model-bound, every depth: srvit / ONNX": "raw",
            "overload": "overload", "model level": "model level"}  # fmt: skip
    out = {}
    for v in targets(report):
        name = next(k for prefix, k in keys.items() if v.target.startswith(prefix))
        out[name] = (v.met, v.figures)
    return out


def test_the_headline_ratio_is_srvits_median_over_the_best_peers_median():
    md = markdown(base_report())
    assert "srvit / best peer (triton) at c=32: **1.29x** (310.0 vs 240.0 images/s)" in md
    assert "lowest peer (triton) 4.95 ms: **+0.15 ms**" in md
    assert "| srvit | 310.0 (300.0-320.0) | 95.0 | 5.10 (5.00-5.20) | 195.0 (192.0-205.0) |" in md
    assert "| naive | 105.0 (100.0-110.0) | 305.0 |" in md  # a null p99 (no answers that round) is left out


def test_each_targets_verdict_follows_the_runs():
    v = verdicts(base_report())
    assert v["throughput"][0] is False  # 1.29x < 1.3x, though p99 is lower
    assert v["everywhere"] == (False, "ahead in 4/5 cells; closest 0.94x triton at c=1, shared")
    assert v["c1 p50"][0] is True  # +0.15 ms <= 0.3 ms
    assert v["c1 throughput"][0] is False  # triton's 199 > srvit's 195
    assert v["overload"][0] is True and "99.5%" in v["overload"][1] and "triton 1500.0 ms" in v["overload"][1]
    assert {v[k][0] for k in ("small", "small p99", "raw", "model level")} == {None}
    md = markdown(base_report())
    assert "| fashion, pinned, c=1: srvit's p50 within 0.3 ms of the best peer's | **met** |" in md
    assert "| fashion, pinned, c=32: srvit >= 1.3x the best peer's images/s and a lower p99 | **missed** |" in md


def test_a_faster_srvit_meets_the_throughput_target():
    report = base_report()
    for row in report["runs"]:
        if row["server"] == "srvit" and row.get("concurrency") == 32 and row["depth"] == "4":
            row["images_per_s"] *= 1.1  # median 341: 1.42x triton's 240
    met, figures = verdicts(report)["throughput"]
    assert met is True and figures.startswith("1.42x triton")


def test_the_frontier_weighs_autos_top1_by_the_depths_it_used():
    md = markdown(base_report())
    assert "| auto | 5.50 | 0.9350 | 360.0 | 90.0 | 0.9175 | d1:50% d4:50% |" in md  # 0.5 * 0.90 + 0.5 * 0.935
    assert "| adaptive | 4.00 | 0.9250 | 380.0 | 85.0 | 0.9250 |" in md  # the export's expected top-1


def test_overload_and_wrk_tables():
    md = markdown(base_report())
    assert "| fashion | pinned | srvit | auto | 300.0 | 200.0 | 99.5% | 99.5% | 5 | 0 |" in md
    assert "| fashion | pinned | triton | 4 | 300.0 | 200.0 | 99.7% | 20.0% | 0 | error:TimeoutError:3 |" in md
    assert "| srvit | fashion | pinned | 32 | 330.0 | 55.0 | 99.0 | 0 | 300.0 | 45.0 | 90.0 | 1.10 |" in md


def test_sections_are_left_out_without_their_data():
    md = markdown(base_report())
    for absent in ("## Model-bound", "## Model level", "Batch wait tried", "![", "| server | depth | concurrency"):
        assert (absent in md) == (absent == "| server | depth | concurrency"), absent  # that one is there
    bare = base_report() | {"runs": [], "wrk": [], "servers": {}}
    md = markdown(bare)
    for absent in (
        "## Headline",
        "## Every closed-loop",
        "## srvit across depths",
        "## Overload",
        "## wrk",
        "## Servers",
    ):
        assert absent not in md
    assert "## Machine and setup" in md and md.count("| not measured |") == 9


def test_the_model_bound_workload_tuning_and_model_level():
    report = full_report()
    v = verdicts(report)
    assert v["small"] == (False, "c=64: d1 1.02x triton, d2 0.83x triton")
    assert v["small p99"][0] is False and v["raw"][0] is True and v["model level"][0] is True
    md = markdown(report)
    assert "| 2 | 50.0 | triton | 60.0 | 0.83 | 8 | 52.6 | 0.92 |" in md
    assert "| triton | 1 | 240.0 | 120.0 | **chosen** |" in md and "| triton | 0 | 230.0 | 140.0 |  |" in md
    assert "### Model level: srvit_small_patch16_224" in md
    del report["model_level"][SMALL]
    assert verdicts(report)["model level"] == (None, "fashion batch 1: lowest 1.50x; fashion batch 32: lowest "
                                                     "1.20x; small not measured")  # fmt: skip
    report["model_level"][FASHION] = model_level(FASHION, {1: 1.2, 32: 1.2})
    assert verdicts(report)["model level"][0] is False  # 1.2x < 1.3x at batch 1


@pytest.mark.parametrize("small", [False, True])
def test_write_peer_report_writes_the_plots_the_markdown_links(tmp_path, small):
    report = json.loads(json.dumps(finite(full_report() if small else base_report())))  # as read back from the JSON
    paths = write_peer_report(report, tmp_path, "t")
    names = ["throughput", "latency-cdf", "frontier", "overload"] + (["small"] if small else [])
    assert paths == [tmp_path / "t.md", *(tmp_path / f"t-{n}.png" for n in names)]
    md = (tmp_path / "t.md").read_text()
    for path in paths[1:]:
        data = path.read_bytes()
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert data.startswith(PNG_SIGNATURE) and 800 <= width <= 1000 and 500 <= height <= 600
        assert len(data) > 20_000, path  # axes, lines and text, not a blank canvas
        assert f"]({path.name})" in md
    assert not (tmp_path / "t-small.png").exists() or small
