"""A real `srvit serve` process on a free port, for the tests that need uvicorn's own HTTP handling and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bench import servers as bench

SRVIT = Path(sys.executable).with_name("srvit")
FAST = ["--warmup-batch-sizes", "1", "--warmup-runs", "1", "--intra-op-threads", "1", "--max-queue-delay-ms", "1",
        "--shutdown-delay-s", "0"]  # fmt: skip


def clean_env() -> dict:
    """No SRVIT_* from the developer's shell: the flags in each test say everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")}


class ServerProcess:
    """`srvit serve` with its command-line flags and its output in a file (a full pipe would block it);
    started, waited for and stopped with the benchmark's own helpers."""

    def __init__(self, repo: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None):
        self.port, self.grpc_port = bench.free_port(), bench.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        args = [str(SRVIT), "serve", "--repo", str(repo), "--port", str(self.port), "--grpc-port",
                str(self.grpc_port), *FAST, *flags]  # fmt: skip
        env = clean_env() | (env or {})
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.server = bench.Server(self.url, self.proc, env, log_path)

    def wait_ready(self, timeout_s: float = 90) -> ServerProcess:
        bench.wait_ready(self.server, timeout_s)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        bench.stop(self.proc, timeout_s=10)
