"""The autoscaler's signal, end to end: a real Prometheus scrapes a real `srvit serve` (labelled as the
kubernetes-pods job labels a pod), and prometheus-adapter's own query from deploy/kubernetes/prometheus-adapter/
reads 0 while the server is idle and, under overload, the share of depth=auto requests the server served
shallower for load or refused, as its counters and the clients saw it."""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import httpx
import pytest
import yaml
from containerfiles import FAST_START, prometheus, serve
from manifests import ADAPTER_CONFIG, ROOT

from bench import loadgen, servers
from bench.images import load_pngs
from modelrepo.idx import FASHION_MNIST_DIR

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
POD = {"namespace": "srvit", "pod": "srvit-7d9f-abcde"}
# A tight target, so that two cores shared with the load generator overload at a modest concurrency; idle, a
# single image still gets the deepest depth well within it.
TARGET_MS = "25"


def rule() -> dict:
    (found,) = yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]
    return found


def adapter_query(group_by: str, label_matchers: str) -> str:
    """The rule's metricsQuery as prometheus-adapter fills its template for one pod's metric."""
    query = rule()["metricsQuery"].replace("<<.GroupBy>>", group_by).replace("<<.LabelMatchers>>", label_matchers)
    assert "<<" not in query, query
    return query


@pytest.fixture
def scraped(tmp_path):
    """srvit_fashion from model_repo/ behind a Prometheus that scrapes it every second with the pod's labels."""
    port = servers.free_port()
    argv = ["srvit", "serve", "--repo", str(ROOT / "model_repo"), "--host", "127.0.0.1", "--port", str(port)]
    variables = FAST_START | {"SRVIT_LATENCY_TARGET_MS": TARGET_MS, "SRVIT_MAX_QUEUE_DELAY_MS": "0"}
    server = serve(argv, variables, tmp_path / "serve.log", port)
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "kubernetes-pods",
                                  "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": POD}]}]}  # fmt: skip
    try:
        with prometheus(config, tmp_path) as prom:
            yield server, f"{prom.url}/api/v1"
    finally:
        servers.stop(server.process)


def query(api: str, promql: str) -> list[dict]:
    body = httpx.get(f"{api}/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def pod_ratio(api: str) -> float | None:
    matchers = f'namespace="{POD["namespace"]}",pod=~"{POD["pod"]}"'
    result = query(api, adapter_query("pod", matchers))
    assert len(result) <= 1 and all(r["metric"] == {"pod": POD["pod"]} for r in result), result
    return float(result[0]["value"][1]) if result else None


def outcomes(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    pattern = r'^srvit_auto_depth_requests_total\{model="srvit_fashion",outcome="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def until_scraped(api: str, expected_total: float, timeout_s: float = 15) -> None:
    """Until Prometheus holds the counters' latest values (a scrape after the last request)."""
    promql = 'sum(srvit_auto_depth_requests_total{model="srvit_fashion"})'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(api, promql)
        if result and float(result[0]["value"][1]) == expected_total:
            return
        time.sleep(0.3)
    raise AssertionError(f"Prometheus never scraped {expected_total} auto requests")


def test_adapter_rule_reads_zero_idle_and_the_overloaded_share_under_load(scraped):
    server, api = scraped
    series = httpx.get(f"{api}/series", params={"match[]": rule()["seriesQuery"]}, timeout=5).json()["data"]
    deadline = time.monotonic() + 15
    while not series and time.monotonic() < deadline:  # the rule's seriesQuery finds the pod's series
        time.sleep(0.3)
        series = httpx.get(f"{api}/series", params={"match[]": rule()["seriesQuery"]}, timeout=5).json()["data"]
    assert {s["outcome"] for s in series} == {"latency_target", "overload", "refused"}
    assert {(s["namespace"], s["pod"]) for s in series} == {(POD["namespace"], POD["pod"])}
    time.sleep(2)
    assert pod_ratio(api) == 0.0  # before any request: 0, not NaN or no value (the HPA would stall on those)

    pngs, _ = load_pngs(FASHION_MNIST_DIR, 64)
    idle = asyncio.run(loadgen.closed_loop(loadgen.Target(server.url, "auto"), pngs, 1, 2.0))
    idle_depths = {r.depth_used for r in idle.results}
    assert {r.status for r in idle.results} == {200} and idle_depths == {4}, idle_depths
    until_scraped(api, sum(outcomes(server).values()))
    assert pod_ratio(api) == 0.0  # served as an idle server would: nothing for another replica to win back

    before = outcomes(server)
    loaded = asyncio.run(loadgen.closed_loop(loadgen.Target(server.url, "auto"), pngs, 12, 6.0))
    counts = outcomes(server)
    until_scraped(api, sum(counts.values()))
    ratio = pod_ratio(api)
    served_by_counters = (counts["overload"] + counts["refused"]) / sum(counts.values())
    during = {k: counts[k] - before[k] for k in counts}
    client_share = sum(r.status != 200 or r.depth_used < 4 for r in loaded.results) / len(loaded.results)
    print(f"adapter ratio {ratio:.4f}, server counters {served_by_counters:.4f} ({counts}); under load: server "
          f"{(during['overload'] + during['refused']) / sum(during.values()):.4f}, clients {client_share:.4f} "
          f"of {len(loaded.results)}")  # fmt: skip
    assert ratio == pytest.approx(served_by_counters, rel=1e-6)  # the adapter's query reads the counters exactly
    assert ratio > 0.2  # the load really overloaded it: the autoscaler (target 5%) would add replicas
    # The clients' own view of the loaded run: requests answered shallower than idle ones, or refused.
    assert client_share == pytest.approx((during["overload"] + during["refused"]) / sum(during.values()), abs=0.05)
    assert {r.status for r in loaded.results} <= {200, 503}
