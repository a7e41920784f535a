"""`srvit serve` as a real process over a socket: start-up, HTTP limits uvicorn sees, SIGTERM draining, bad repos."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sample_images import jpeg, png
from server_process import SRVIT, ServerProcess, clean_env

LIMIT = 100_000


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    proc = ServerProcess(tiny_repo, tmp_path_factory.mktemp("log") / "serve.log", "--max-body-bytes", str(LIMIT),
                         "--body-timeout-s", "1")  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def classify(url: str, data: bytes, kind: str, **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", content=data, headers={"Content-Type": kind}, params=params, timeout=30)


def test_starts_ready_and_lists_its_model(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "live"}
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert [(m["name"], [d["depth"] for d in m["depths"]]) for m in models] == [("tiny", [1, 2, 3])]


@pytest.mark.parametrize("data, kind", [(png(24, 1), "image/png"), (jpeg(24, 2), "image/jpeg")])
def test_real_png_and_jpeg_are_classified(server, data, kind):
    r = classify(server.url, data, kind, top_k=3)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert sorted(p["label"] for p in predictions) == ["alpha", "beta", "gamma"]
    assert all(0 <= p["score"] <= 1 for p in predictions) and sum(p["score"] for p in predictions) <= 1 + 1e-6


def test_declared_body_over_the_limit_is_413_and_the_server_goes_on(server):
    r = classify(server.url, bytes(LIMIT + 1), "image/png")
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large")
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_streamed_body_without_length_is_cut_off_at_the_limit(server):
    def chunks():
        for _ in range(10):
            yield bytes(LIMIT // 4)  # 2.5x the limit, chunked: no Content-Length to trust

    r = httpx.post(f"{server.url}/classify", content=chunks(), headers={"Content-Type": "image/png"}, timeout=30)
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large")
    assert classify(server.url, png(), "image/png").status_code == 200


def test_slow_body_is_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # no answer in 10 s fails too
        head = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
        s.sendall(head.encode() + png()[:10])  # then stall
        answer = _read_response(s)
    status_line, _, body = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer
    error = json.loads(body.split(b"\r\n\r\n", 1)[1])
    assert error["code"] == "request_timeout" and "within 1 s" in error["error"]  # --body-timeout-s cut it off


def test_body_that_pauses_well_within_the_timeout_is_served(server):
    """The 408 is for stalled uploads: a client that pauses for a tenth of --body-timeout-s is answered."""
    data = png()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
        s.sendall(head.encode() + data[:10])
        time.sleep(0.1)
        s.sendall(data[10:])
        answer = _read_response(s)
    assert answer.startswith(b"HTTP/1.1 200"), answer


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _first_unready(url: str, timeout_s: float = 10) -> httpx.Response:
    """/readyz polled until it stops answering 200 (the signal is handled asynchronously), or its last answer."""
    deadline = time.monotonic() + timeout_s
    while (ready := httpx.get(f"{url}/readyz", timeout=5)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    return ready


@pytest.mark.parametrize("cut_short", [False, True], ids=["delay-runs-out", "second-signal"])
def test_sigterm_turns_unready_first_and_serves_new_requests_through_the_shutdown_delay(tiny_repo, tmp_path,
                                                                                        cut_short):  # fmt: skip
    """Behind a load balancer, requests routed here in the moments before it notices /readyz are served, not
    refused; the delay then ends by itself, or at once on a second signal (a 60 s delay would outlast the wait)."""
    delay = "60" if cut_short else "2"
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--shutdown-delay-s", delay).wait_ready()
    try:
        proc.terminate()
        ready = _first_unready(proc.url)
        served = classify(proc.url, png(), "image/png")
        if cut_short:
            proc.terminate()
        code = proc.proc.wait(timeout=30)
    finally:
        proc.stop()
    assert (ready.status_code, ready.json()["code"]) == (503, "not_ready")
    assert served.status_code == 200, served.text
    assert code == 0, proc.output()


def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0(tiny_repo, tmp_path):
    # A 4 s batch window keeps the requests queued while SIGTERM arrives and the server drains.
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--max-queue-delay-ms", "4000").wait_ready()
    try:
        with ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(classify, proc.url, png(seed=i), "image/png", depth=1) for i in range(3)]
            _until_queued(proc.url, 3)
            proc.terminate()
            ready = _first_unready(proc.url)
            refused = classify(proc.url, png(), "image/png")
            answers = [f.result(timeout=30) for f in in_flight]
        code = proc.proc.wait(timeout=30)
    finally:
        proc.stop()
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert (ready.status_code, ready.json()["code"]) == (503, "not_ready")
    assert (refused.status_code, refused.json()["code"]) == (503, "not_ready")
    assert code == 0, proc.output()


def _until_queued(url: str, images: int, timeout_s: float = 20) -> None:
    """Until the server's own queue gauge shows the images: they are in flight, not still on the way."""
    line = f'srvit_queue_images{{depth="1",model="tiny"}} {float(images)}'
    deadline = time.monotonic() + timeout_s
    while line not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.05)


def test_corrupt_repository_exits_nonzero_with_a_clear_message(repo_copy):
    with open(repo_copy / "tiny_d2" / "1" / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")  # same size, different bytes
    done = subprocess.run([str(SRVIT), "serve", "--repo", str(repo_copy), "--port", "0"], capture_output=True,
                          text=True, timeout=120, env=clean_env())  # fmt: skip
    assert done.returncode != 0
    assert "cannot start" in done.stderr and "tiny_d2/1/model.onnx: checksum mismatch" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_python_m_service_takes_the_same_flags(tmp_path):
    done = subprocess.run([SRVIT.with_name("python"), "-m", "service", "--repo", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, env=clean_env())  # fmt: skip
    assert done.returncode == 2 and "does not exist" in done.stderr
