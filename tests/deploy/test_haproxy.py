"""Several srvit replicas behind a real HAProxy (deploy/haproxy/haproxy.cfg) on loopback: a rolling restart under
steady load loses no request."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench import servers

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SRVIT = Path(sys.executable).with_name("srvit")
FLAGS = ["--warmup-batch-sizes", "1", "--warmup-runs", "1", "--intra-op-threads", "1", "--preprocess-threads", "1",
         "--shutdown-delay-s", "1", "--grpc-port", "0"]  # fmt: skip
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed (apt-get install haproxy)")


class Replica:
    """`srvit serve` on a fixed port, so a restarted replica comes back where the balancer expects it."""

    def __init__(self, repo: Path, port: int, log: Path):
        self.repo, self.port, self.log = repo, port, log
        self.process: subprocess.Popen | None = None

    def start(self) -> Replica:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")}
        argv = [str(SRVIT), "serve", "--repo", str(self.repo), "--port", str(self.port), *FLAGS]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        servers.wait_ready(servers.Server(f"http://127.0.0.1:{self.port}", self.process, env, self.log), 90)
        return self

    def restart(self) -> None:
        """SIGTERM, wait for the drained exit (0), start anew on the same port."""
        self.process.terminate()
        assert self.process.wait(timeout=60) == 0, self.log.read_text()[-2000:]
        self.start()


def balancer_up(stats_url: str) -> set[str]:
    """Names of the backend servers HAProxy currently sends traffic to (its CSV stats)."""
    rows = [line.split(",") for line in httpx.get(f"{stats_url};csv", timeout=5).text.splitlines()]
    return {r[1] for r in rows if len(r) > 17 and r[0] == "srvit" and r[1].startswith("replica") and r[17] == "UP"}


def until(condition, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def fleet(tiny_repo, tmp_path):
    ports = [servers.free_port() for _ in range(4)]
    replicas = [Replica(tiny_repo, port, tmp_path / f"replica{i + 1}.log").start() for i, port in enumerate(ports[:2])]
    env = dict(os.environ, SRVIT_LB_BIND=f"127.0.0.1:{ports[2]}", SRVIT_LB_STATS=f"127.0.0.1:{ports[3]}",
               SRVIT_REPLICA_1=f"127.0.0.1:{ports[0]}", SRVIT_REPLICA_2=f"127.0.0.1:{ports[1]}")  # fmt: skip
    with (tmp_path / "haproxy.log").open("wb") as out:
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], stdout=out, stderr=subprocess.STDOUT, env=env)
    stats = f"http://127.0.0.1:{ports[3]}/stats"
    try:
        until(lambda: _quietly(balancer_up, stats) == {"replica1", "replica2"})
        yield f"http://127.0.0.1:{ports[2]}", stats, replicas
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
        for replica in replicas:
            servers.stop(replica.process, timeout_s=30)


def _quietly(fn, *args):
    try:
        return fn(*args)
    except httpx.HTTPError:
        return None


def png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8), 200).save(out, format="PNG")
    return out.getvalue()


def test_rolling_restart_under_steady_load_fails_no_request(fleet):
    url, stats, replicas = fleet
    image, answers, stop = png(), [], threading.Event()

    def load() -> None:  # one request after another, as a client keeping a replica busy would
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = client.post(f"{url}/classify", content=image, headers={"Content-Type": "image/png"})
                label = r.json().get("predictions", [{}])[0].get("label")
                answers.append((r.status_code, label, time.perf_counter() - t0))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        until(lambda: len(answers) >= 20)
        for replica in replicas:
            replica.restart()
            until(lambda: _quietly(balancer_up, stats) == {"replica1", "replica2"})  # back in rotation first
            served_before = len(answers)
            until(lambda n=served_before: len(answers) >= n + 20)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    statuses = {status for status, _, _ in answers}
    labels = {label for _, label, _ in answers}
    latencies = sorted(seconds for _, _, seconds in answers)
    print(f"rolling restart: {len(answers)} requests sent, {sum(s != 200 for s, _, _ in answers)} failed, "
          f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.1f} ms")  # fmt: skip
    assert statuses == {200}, f"{sum(s != 200 for s, _, _ in answers)} of {len(answers)} failed: {statuses}"
    assert len(labels) == 1 and len(answers) > 60  # the same image, the same answer, from every replica


def retried(haproxy_log: Path) -> int:
    """Requests HAProxy sent again (httplog's retries field, `+N` once redispatched to another server)."""
    count = 0
    for line in haproxy_log.read_text(errors="replace").splitlines():
        # Two fields of five numbers: the timers Tq/Tw/Tc/Tr/Tt, then the connections act/fe/be/srv/retries.
        fives = [f for f in line.split() if f.count("/") == 4 and all(n.lstrip("+-").isdigit() for n in f.split("/"))]
        if len(fives) >= 2 and fives[1].split("/")[-1].lstrip("+") != "0":
            count += 1
    return count


def test_kill_9_of_a_replica_under_load_reaches_no_client(fleet, tmp_path):
    url, stats, replicas = fleet
    image, answers, stop = png(), [], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(f"{url}/classify", content=image, headers={"Content-Type": "image/png"})
                answers.append(r.status_code)

    workers = [threading.Thread(target=load) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        until(lambda: len(answers) >= 50)
        replicas[0].process.kill()  # SIGKILL: no drain, whatever it held is cut off
        replicas[0].process.wait(timeout=10)
        until(lambda: _quietly(balancer_up, stats) == {"replica2"})
        served_after = len(answers)
        until(lambda: len(answers) >= served_after + 100)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    print(f"kill -9: {len(answers)} requests sent, {sum(s != 200 for s in answers)} failed at the client, "
          f"{retried(tmp_path / 'haproxy.log')} retried by HAProxy")  # fmt: skip
    assert set(answers) == {200}, f"{sum(s != 200 for s in answers)} of {len(answers)} failed"
    assert retried(tmp_path / "haproxy.log") >= 1  # the requests on the killed replica: retried, not lost


def test_haproxy_accepts_the_config():
    env = dict(os.environ, SRVIT_LB_BIND="127.0.0.1:1", SRVIT_LB_STATS="127.0.0.1:2", SRVIT_REPLICA_1="127.0.0.1:3",
               SRVIT_REPLICA_2="127.0.0.1:4")  # fmt: skip
    check = subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], capture_output=True, text=True, env=env)
    assert check.returncode == 0 and "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
