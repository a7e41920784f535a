"""The model repository as the matrix reads it: per model name, its depths and ONNX graphs, from the manifests."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from modelrepo import manifest
from modelrepo.manifest import ONNX, Manifest


@dataclass(frozen=True)
class Graph:
    """One depth's ONNX graph and the manifest beside it."""

    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class Model:
    """What the matrix asks of one model: its depths to load, its ONNX graphs to run raw, its checkpoint to record.

    Checking the repository (checksums, one export per model) is the server's job: it refuses to start otherwise.
    """

    name: str
    depths: list[int]  # every depth exported, on any platform
    max_depth: int
    graphs: dict[int, Graph]  # depth -> its ONNX graph; a TensorRT-only depth has none
    checkpoint: dict | None  # the deepest depth's record of the checkpoint it was exported from
    adaptive: bool = False  # whether the export fitted a depth=adaptive policy


def load_models(repo: Path) -> dict[str, Model]:
    """{name: Model} for every model folder in `repo`; SystemExit with the folder when a manifest is unreadable."""
    folders: dict[str, list[tuple[Path, Manifest]]] = defaultdict(list)
    for path in manifest.manifest_paths(repo):
        try:
            found = manifest.load(path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: {e}; re-export this model with `srvit export`") from e
        folders[found.name].append((path.parent, found))
    if not folders:
        raise SystemExit(f"{repo} holds no */{manifest.MANIFEST_FILE}: export a model with `srvit export` or --repo")
    return {name: _model(name, found) for name, found in sorted(folders.items())}


def _model(name: str, folders: list[tuple[Path, Manifest]]) -> Model:
    manifests = [m for _, m in folders]
    graphs = {m.depth: Graph(folder / m.model_file, m) for folder, m in folders if m.platform == ONNX}
    deepest = max(manifests, key=lambda m: (m.depth, m.platform == ONNX))
    return Model(name, sorted({m.depth for m in manifests}), deepest.max_depth, graphs, deepest.checkpoint,
                 deepest.adaptive is not None)  # fmt: skip
