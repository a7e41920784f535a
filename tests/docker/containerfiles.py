"""Reading the container files as Docker and compose would: instructions, exec-form commands, YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
GPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "srvit.json"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") and not pending:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
        pending = ""
    return logical


def final_stage(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def exec_form(arguments: str) -> list[str]:
    """CMD/ENTRYPOINT arguments: a JSON array (exec form), refused otherwise."""
    try:
        argv = json.loads(arguments)
    except json.JSONDecodeError as e:
        message = f"not exec form (JSON array): {arguments!r}; shell form would not forward SIGTERM"
        raise AssertionError(message) from e
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), arguments
    return argv


def dockerfile_cmd(path: Path = DOCKERFILE) -> list[str]:
    (cmd,) = [args for keyword, args in final_stage(path) if keyword == "CMD"]
    return exec_form(cmd)


def load_yaml(path: Path):
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose and Prometheus files")
    return yaml.safe_load(path.read_text())


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (the container listens on 0.0.0.0:8000, a test on loopback)."""
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def dashboard_queries() -> dict[str, list[str]]:
    """{panel title: its PromQL expressions}."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard["panels"]}
