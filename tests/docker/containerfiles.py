"""Reading the container files as Docker and compose would (instructions, exec-form commands, YAML), and running
what they run: the image's command as a real server, a real Prometheus. tests/deploy uses these too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import servers
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
GPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "srvit.json"
# A test server's start-up in a second, and its stop without the shutdown delay.
# Tests run several servers at once: none binds gRPC's fixed port unless the test gives it one.
FAST_START = {"SRVIT_WARMUP_BATCH_SIZES": "1", "SRVIT_WARMUP_RUNS": "1", "SRVIT_PREPROCESS_THREADS": "1",
              "SRVIT_SHUTDOWN_DELAY_S": "0", "SRVIT_GRPC_PORT": "0"}  # fmt: skip


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


def image_user(path: Path = DOCKERFILE) -> int:
    """The numeric user the final stage runs as."""
    users = [args for keyword, args in final_stage(path) if keyword == "USER"]
    return int(users[-1].split(":")[0])


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


def tool(name: str, install: str) -> str:
    """A command from beside this interpreter (the venv's bin/), the checkov venv, or PATH; else skip saying how."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv-checkov" / "bin"):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({install})")
    return found


def check_settings(variables: dict[str, str]) -> Settings:
    """Every SRVIT_ variable names a setting and its value validates: a misspelt one would be ignored silently."""
    names = {f"SRVIT_{field.upper()}" for field in Settings.model_fields}
    srvit = {k: v for k, v in variables.items() if k.startswith("SRVIT_")}
    assert set(srvit) <= names, f"unknown settings: {set(srvit) - names}"
    return Settings(**{k.removeprefix("SRVIT_").lower(): v for k, v in srvit.items()})


def started(argv: list[str], env: dict[str, str], log: Path, url: str, ready_path: str) -> servers.Server:
    """A process started with its output in `log`, once `ready_path` answers 200; stopped if it never does."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = servers.Server(url, process, env, log)
    try:
        servers.wait_ready(server, 120, ready_path)
    except BaseException:
        servers.stop(process)
        raise
    return server


def serve(argv: list[str], variables: dict[str, str], log: Path, port: int) -> servers.Server:
    """A container's `srvit serve` command line, moved to loopback by the caller, with the container's SRVIT_*
    settings and none of this process's; the console script is the venv's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")} | variables
    argv = [shutil.which(argv[0]) or str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    return started(argv, env, log, f"http://127.0.0.1:{port}", "/readyz")


@contextlib.contextmanager
def prometheus(config: dict, folder: Path) -> Iterator[servers.Server]:
    """A real Prometheus with this config (written to `folder`, beside any rule files put there), on loopback."""
    binary = shutil.which("prometheus")
    assert binary is not None, "no prometheus binary (apt-get install prometheus)"
    (folder / "prometheus.yml").write_text(yaml_dump(config))
    port = servers.free_port()
    argv = [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip
    server = started(argv, dict(os.environ), folder / "prometheus.log", f"http://127.0.0.1:{port}", "/-/ready")
    try:
        yield server
    finally:
        servers.stop(server.process, timeout_s=10)


def yaml_dump(data) -> str:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to write Prometheus files")
    return yaml.safe_dump(data)
