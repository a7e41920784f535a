"""A real Prometheus scrapes a real `srvit serve`, started with the image's own command, and answers queries."""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pytest
from containerfiles import (
    ALERTS,
    FAST_START,
    PROMETHEUS_CONFIG,
    dashboard_queries,
    dockerfile_cmd,
    load_yaml,
    serve,
    with_option,
)
from containerfiles import prometheus as prometheus_server

from bench import images, servers

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")


@pytest.fixture(scope="module")
def srvit_server(tiny_repo, tmp_path_factory):
    """The Dockerfile's CMD, on loopback and a free port instead of 0.0.0.0:8000."""
    port = servers.free_port()
    argv = with_option(with_option(dockerfile_cmd(), "--host", "127.0.0.1"), "--port", str(port))
    variables = FAST_START | {"SRVIT_REPO": str(tiny_repo)}
    server = serve(argv, variables, tmp_path_factory.mktemp("srvit") / "serve.log", port)
    yield server
    servers.stop(server.process)


@pytest.fixture(scope="module")
def prometheus(srvit_server, tmp_path_factory):
    """docker/prometheus/prometheus.yml and its alert rules, with the target moved to the test server and a 1 s
    scrape interval."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    target = srvit_server.url.removeprefix("http://")
    for job in config["scrape_configs"]:
        for group in job.get("static_configs", []):
            group["targets"] = [target if t == "srvit:8000" else t for t in group["targets"]]
    shutil.copy(ALERTS, folder)  # rule_files are found beside the config
    with prometheus_server(config, folder) as server:
        yield server


def query(prometheus: servers.Server, promql: str) -> list[dict]:
    body = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    return body["data"]["result"]


def eventually(prometheus: servers.Server, promql: str, timeout_s: float = 20.0) -> list[dict]:
    """The query's result once it is non-empty: scrapes come every second, rates need two of them."""
    deadline = time.monotonic() + timeout_s
    while not (result := query(prometheus, promql)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def classify(server: servers.Server, depth: str, n: int) -> None:
    png = images.encode_png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    for _ in range(n):
        response = httpx.post(f"{server.url}/classify", params={"depth": depth}, content=png,
                              headers={"content-type": "image/png"}, timeout=10)  # fmt: skip
        assert response.status_code == 200, response.text


def test_prometheus_scrapes_the_servers_request_count(srvit_server, prometheus):
    classify(srvit_server, "1", 5)
    classify(srvit_server, "2", 3)
    deadline, counts = time.monotonic() + 20, {}
    while counts != {"1": 5.0, "2": 3.0} and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = {r["metric"]["depth"]: float(r["value"][1]) for r in query(prometheus, "srvit_requests_total")}
    assert counts == {"1": 5.0, "2": 3.0}
    (up,) = query(prometheus, 'up{job="srvit"}')
    assert up["value"][1] == "1"


def as_grafana_sends(expr: str) -> str:
    return expr.replace("$model", ".*").replace("$__rate_interval", "1m")


def test_every_dashboard_query_runs_and_the_main_panels_have_data(srvit_server, prometheus):
    """Bad PromQL or a wrong series name shows up in Grafana only as an empty or red panel."""
    classify(srvit_server, "1", 3)
    panels = dashboard_queries()
    for exprs in panels.values():
        for expr in exprs:
            query(prometheus, as_grafana_sends(expr))
    for title in ("Requests by status", "Latency p50 / p99 by depth", "Mean batch size by depth"):
        for expr in panels[title]:
            assert eventually(prometheus, as_grafana_sends(expr)), f"{title}: no data for {expr}"


def test_prometheus_loads_the_alert_rules_and_a_ready_server_raises_none(prometheus):
    """The compose Prometheus evaluates docker/prometheus/alerts.yml against a real, ready, idle server."""
    eventually(prometheus, "srvit_ready == 1")
    body = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()
    rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert {r["name"] for r in rules} == {"SrvitLatencyAboveTarget", "SrvitRejectingRequests", "SrvitNotReady",
                                          "SrvitAutoDepthHeldBelowMax"}  # fmt: skip
    assert all(r["health"] == "ok" and r["state"] == "inactive" for r in rules), rules
