"""Liveness, readiness and whether the models can be described: one answer per question for every surface.

`/healthz` and `/v2/health/live` ask `check_live`, `/readyz`, `/v2/health/ready` and V2 model readiness ask
`check_ready`; `/v1/models` and V2 model metadata ask `check_described`. After SIGTERM a server first *leaves*:
unready, while it still serves new requests for `shutdown_delay_s`, so load balancers notice before anything is
refused; then it drains: admitted work finishes, new requests get 503. Leaving or draining, it is live and still
describes its models (they stay loaded until the drain ends), so a client finishing its work can still read
metadata while balancers send new traffic elsewhere.
"""

from __future__ import annotations

from typing import Protocol

from service.errors import InferenceFailed, NotReady

STARTING, READY, LEAVING, DRAINING, STOPPED = "starting", "ready", "leaving", "draining", "stopped"
SERVING = (READY, LEAVING)  # new requests are admitted; LEAVING is unready, for balancers to stop routing here
EXECUTOR_STOPPED = "the batch executor stopped; restart the server"


class State(Protocol):
    state: str  # STARTING, READY, DRAINING or STOPPED

    @property
    def executor_running(self) -> bool: ...


def crashed(s: State) -> bool:
    """Ready in name, but its batch executor is gone: every request would fail with 500."""
    return s.state == READY and not s.executor_running


def is_ready(s: State) -> bool:
    return s.state == READY and s.executor_running


def check_live(s: State) -> None:
    """Live while the process answers and, once ready, its device loop runs: a restart is the only cure."""
    if crashed(s):
        raise InferenceFailed(EXECUTOR_STOPPED)


def check_ready(s: State) -> None:
    if crashed(s):
        raise NotReady(EXECUTOR_STOPPED)
    if s.state != READY:
        raise NotReady(f"the server is {s.state}")


def check_described(s: State) -> None:
    """Models are described while serving or draining: starting, they are not loaded yet; stopped, gone."""
    if not (is_ready(s) or s.state in (LEAVING, DRAINING)):
        raise NotReady(f"the server is {s.state}: retry shortly")


def refusal(s: State) -> str | None:
    """Why a new request is refused now (503 not_ready, before its body is read), or None while it is admitted."""
    if crashed(s):
        return EXECUTOR_STOPPED
    return None if s.state in SERVING else f"the server is {s.state}: retry shortly or on another instance"
