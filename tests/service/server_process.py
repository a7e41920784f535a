"""A real `srvit serve` process on a free port, for the tests that need uvicorn's own HTTP handling and signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRVIT = Path(sys.executable).with_name("srvit")
FAST = ["--warmup-batch-sizes", "1", "--warmup-runs", "1", "--intra-op-threads", "1", "--max-queue-delay-ms", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    """No SRVIT_* from the developer's shell: the flags in each test say everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")}


class ServerProcess:
    """`srvit serve` with its output in a file (a full pipe would block it), stopped by the test or at exit."""

    def __init__(self, repo: Path, log_path: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [str(SRVIT), "serve", "--repo", str(repo), "--port", str(self.port), *FAST, *flags]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=clean_env())

    def wait_ready(self, timeout_s: float = 90) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"srvit serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"srvit serve not ready after {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
