"""Imports run downward only: cli -> bench / service / export -> srvit -> modelrepo (see HOUSE_STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"modelrepo", "srvit", "export", "service", "bench", "cli"}
# package -> the project packages (or single modules) it may import
ALLOWED = {
    "modelrepo": {"modelrepo"},
    "srvit": {"modelrepo", "srvit"},
    "export": {"modelrepo", "srvit", "export"},
    "service": {"modelrepo", "service"},
    # The raw baseline opens graphs as the server does; the peers decode with srvit's own preprocessing, so only the
    # serving framework differs; the model level runs the PyTorch model (srvit sits below bench) and the peer
    # benchmark exports its model-bound model at run time with the export pipeline itself.
    "bench": {
        "modelrepo",
        "bench",
        "srvit",
        "service.runtime",
        "service.preprocess",
        "service.errors",
        "export.pipeline",
    },  # fmt: skip
    "cli": PROJECT,
}
NEVER = {"service": {"torch", "onnxscript", "safetensors", "aiohttp", "rich"}, "modelrepo": {"torch", "onnx"}}


def imports(package: str) -> set[tuple[str, str]]:
    """(module file, imported module) for every import in the package, lazy ones inside functions included."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(path.name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add((path.name, node.module))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below(package):
    allowed = ALLOWED[package]
    wrong = sorted(
        f"{file}: {module}"
        for file, module in imports(package)
        if module.split(".")[0] in PROJECT
        and not any(module == a or module.startswith(a + ".") for a in allowed)
        and module.split(".")[0] not in allowed
    )
    assert wrong == []


@pytest.mark.parametrize("package", sorted(NEVER))
def test_serving_and_the_contract_never_import_training_or_benchmark_libraries(package):
    assert sorted(f"{f}: {m}" for f, m in imports(package) if m.split(".")[0] in NEVER[package]) == []
