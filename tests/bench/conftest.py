"""A real `srvit serve` process on the session's tiny repository (tests/conftest.py), for the load generator."""

from __future__ import annotations

import pytest

from bench.servers import served

# Start-up times one batch size once per depth: the server is ready in seconds on two busy cores.
FAST_START = {"SRVIT_WARMUP_BATCH_SIZES": "1", "SRVIT_WARMUP_RUNS": "1", "SRVIT_PREPROCESS_THREADS": "1",
              "SRVIT_SHUTDOWN_DELAY_S": "0"}  # fmt: skip


@pytest.fixture(scope="session")
def server(tiny_repo):
    with served(tiny_repo, FAST_START, ready_timeout_s=120) as server:
        yield server
