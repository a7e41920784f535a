"""`srvit bench` plumbing that needs no server: flags, reading /metrics, the written report."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import cli, matrix, scrape
from bench.report import write_report
from service.metrics import Metrics


def parse(*argv: str):
    parser = argparse.ArgumentParser(prog="python -m bench")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_load_flags_take_comma_lists():
    args = parse("load", "--url", "http://127.0.0.1:9", "--concurrency", "1,8,32", "--depth", "1,4,auto")
    assert (args.mode, args.concurrency, args.depth, args.rate) == ("load", [1, 8, 32], ["1", "4", "auto"], None)


@pytest.mark.parametrize(("flag", "value"), [("--depth", "0"), ("--depth", "deep"), ("--concurrency", "0,8")])
def test_bad_lists_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse("load", flag, value)
    assert "need" in capsys.readouterr().err


def test_cpu_lists_use_taskset_notation():
    args = parse("matrix", "--server-cpus", "1-3", "--client-cpus", "0")
    assert (args.server_cpus, args.client_cpus) == ({1, 2, 3}, {0})


def test_mean_batch_is_read_from_the_servers_own_histogram():
    """Built with the server's Metrics class, so a renamed metric fails here rather than in a benchmark."""
    metrics = Metrics()
    histogram = metrics.batch_size.labels("fashion", "4")
    histogram.observe(2)
    before = metrics.exposition().decode()
    for size in (8, 8, 5):
        histogram.observe(size)
    metrics.batch_size.labels("fashion", "1").observe(32)  # another depth does not leak in
    after = metrics.exposition().decode()
    assert scrape.mean_batch(before, after, "fashion", 4) == pytest.approx(7.0)
    assert scrape.mean_batch(after, after, "fashion", 4) is None  # no batch in between


def row(**overrides) -> dict:
    base = {"depth": "1", "images_per_s": 100.0, "ok": 10, "requests": 10, "errors": {}, "depth_mix": {"1": 1.0},
            "latency_ms": {"p50": 5.0, "p95": 8.0, "p99": float("nan"), "mean": 5.0, "max": 9.0}}  # fmt: skip
    return base | overrides


def test_report_is_standard_json_and_a_markdown_table(tmp_path):
    report = {
        "machine": {"cpu": "Test CPU", "logical_cpus": 2, "cpus_usable": 2, "loadavg_at_start": (0.5, 0, 0),
                    "onnxruntime": "1.0", "python": "3.11", "date": "today"},
        "setup": {"model": "fashion", "cores": {"sharing": "both share every CPU"}, "server_defaults": {"a": 1},
                  "warmup_s": 1.0, "duration_s": 2.0},
        "server_runs": [row(batching="on", concurrency=32, mean_batch=7.5, server_cpu_cores=1.2)],
        "raw": [{"depth": "1", "batch": 8, "images_per_s": 400.0, "server_images_per_s": 100.0,
                 "server_over_raw": 0.25}],
        "auto": [row(depth="auto", rate=150.0, depth_mix={"1": 0.5, "4": 0.5}, errors={"503": 3}, send_lag_ms_p99=2.0)],
    }  # fmt: skip
    write_report(report, tmp_path, "cpu")
    data = json.loads((tmp_path / "cpu.json").read_text())  # NaN became null: any JSON reader takes it
    assert data["server_runs"][0]["latency_ms"]["p99"] is None
    md = (tmp_path / "cpu.md").read_text()
    assert "| on | 1 | 32 | 100.0 | 5.0 | - | 7.5 | 1.20 | 0 |" in md
    assert "| 1 | 8 | 400.0 | 100.0 | 0.25 |" in md
    assert "| auto | 150.0 | 100.0 | 5.0 | 8.0 | - | d1:50% d4:50% | 503:3 | 2.0 |" in md


def test_matrix_servers_run_with_the_callers_srvit_settings(monkeypatch):
    """What the report records as the server's settings (read from the environment) is what its servers ran."""
    import contextlib
    from types import SimpleNamespace

    monkeypatch.setenv("SRVIT_MAX_QUEUE_DELAY_MS", "0")
    monkeypatch.setenv("UNRELATED", "x")
    seen = {}

    @contextlib.contextmanager
    def fake_served(repo, env, cpus=None):
        seen.update(env)
        raise RuntimeError("stop before any load")
        yield

    monkeypatch.setattr(matrix, "served", fake_served)
    args = SimpleNamespace(repo="model_repo", server_cpus=None)
    with pytest.raises(RuntimeError, match="stop before any load"):
        matrix.server_runs(args, None, [], "off", {"SRVIT_MAX_BATCH_SIZE": "1"}, [1])
    assert seen == {"SRVIT_MAX_QUEUE_DELAY_MS": "0", "SRVIT_MAX_BATCH_SIZE": "1"}
