"""The servers the benchmark starts: `python -m service` subprocesses, pinned, ready, stopped, their CPU time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_S = 300.0  # start-up times every depth at several batch sizes: slow on two busy cores


def served_model(url: str, model: str | None) -> dict:
    """The model's entry in GET /v1/models (None: the first served); LookupError naming what is served."""
    listed = httpx.get(f"{url}/v1/models", timeout=10).raise_for_status().json()["models"]
    entry = next((m for m in listed if model in (None, m["name"])), None)
    if entry is None:
        raise LookupError(f"model {model!r} is not served at {url}; it serves {[m['name'] for m in listed]}")
    return entry


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path
    grpc_port: int = 0  # 0: gRPC off

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).raise_for_status().text

    def runtimes(self, model: str) -> dict[str, str]:
        """{depth: the execution provider or engine serving it}, as GET /v1/models reports it."""
        try:
            entry = served_model(self.url, model)
        except LookupError as e:
            raise RuntimeError(str(e)) from None
        return {str(depth["depth"]): depth["runtime"] for depth in entry["depths"]}

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(repo: Path, port: int, grpc_port: int = 0) -> list[str]:
    """`python -m service` through this interpreter, so it runs the same installation as the benchmark, and
    without the umbrella `srvit` CLI: the benchmark needs only the server package installed beside it."""
    return [sys.executable, "-m", "service", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(grpc_port)]  # fmt: skip


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process, and whatever it starts meanwhile, on `cpus` only; the previous mask afterwards."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def served(repo: Path, env: dict[str, str], cpus: set[int] | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
           grpc: bool = False) -> Iterator[Server]:  # fmt: skip
    """A server subprocess with exactly these SRVIT_* settings (the caller's own are dropped), ready; with
    `grpc`, its gRPC port too (`Server.grpc_port`)."""
    port, grpc_port = free_port(), free_port() if grpc else 0
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")}
    log = Path(tempfile.mkstemp(prefix="srvit-serve-", suffix=".log")[1])
    with pinned(cpus), log.open("wb") as out:  # the server and every thread it starts inherit the mask
        command = serve_command(repo, port, grpc_port)
        process = subprocess.Popen(command, env=clean | env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, env, log, grpc_port)
    try:
        wait_ready(server, ready_timeout_s)
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, timeout_s: float, path: str = "/readyz") -> None:
    """Until GET `path` answers 200; a process that exits or outstays `timeout_s` raises with its log's tail."""
    name = Path(str(server.process.args[0])).name
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.process.returncode}:\n{_tail(server.log)}")
        try:
            if httpx.get(f"{server.url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} was not ready after {timeout_s:.0f} s:\n{_tail(server.log)}")


def stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it outstays `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
