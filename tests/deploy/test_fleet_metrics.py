"""A real Prometheus scraping every replica behind the balancer: the fleet-wide p99 it computes from the summed
histogram buckets agrees with the p99 the clients measured, to within one bucket."""

from __future__ import annotations

import bisect
import shutil
import threading
import time

import httpx
import pytest
import yaml
from containerfiles import prometheus as prometheus_server
from test_haproxy import ROOT, _quietly, fleet, png, until  # noqa: F401  (fleet is a fixture)

from service.metrics import SECONDS_BUCKETS

PROMETHEUS = shutil.which("prometheus")
FLEET_P99 = "histogram_quantile(0.99, sum by (le) (increase(srvit_request_duration_seconds_bucket[{window}s])))"

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")


def bucket(seconds: float) -> int:
    """Index of the histogram bucket a latency falls in (its upper bound is SECONDS_BUCKETS[index])."""
    return bisect.bisect_left(SECONDS_BUCKETS, seconds)


@pytest.fixture
def prometheus(fleet, tmp_path):  # noqa: F811
    """docker/prometheus/prometheus.yml's srvit job, pointed at both replicas, scraping every second."""
    url, stats, replicas = fleet
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "srvit"]
    config["scrape_configs"] = [job]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{r.port}" for r in replicas]}]
    with prometheus_server(config, tmp_path) as prom:
        api = f"{prom.url}/api/v1"
        until(lambda: _quietly(query, api, "sum(up)") == 2.0, 30)  # both replicas scraped
        yield url, api


def query(api: str, promql: str, at: float | None = None) -> float | None:
    params = {"query": promql} | ({"time": at} if at is not None else {})
    result = httpx.get(f"{api}/query", params=params, timeout=5).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_fleet_p99_from_prometheus_matches_the_clients_within_one_bucket(prometheus):
    url, api = prometheus
    image, latencies, statuses, stop = png(), [], [], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = client.post(f"{url}/classify", content=image, headers={"Content-Type": "image/png"})
                latencies.append(time.perf_counter() - t0)
                statuses.append(r.status_code)

    time.sleep(2)  # a scrape before the load, so increase() sees the counters start
    started = time.time()
    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(8)
    stop.set()
    for w in workers:
        w.join(timeout=30)
    ended = time.time()
    time.sleep(2.5)  # the scrape after the last answer
    window = int(ended - started) + 4
    fleet_p99 = query(api, FLEET_P99.format(window=window), at=ended + 2)
    client_p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))]
    print(f"fleet p99 {fleet_p99 * 1000:.2f} ms (Prometheus), client p99 {client_p99 * 1000:.2f} ms, "
          f"{len(latencies)} requests")  # fmt: skip
    assert set(statuses) == {200} and len(latencies) > 200 and fleet_p99 is not None
    assert abs(bucket(fleet_p99) - bucket(client_p99)) <= 1, (fleet_p99, client_p99)
