"""Reading model_repo/: every manifest checked and every file verified, grouped by model name into depths."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from service.onnx_safety import UnsafeModelError, check_onnx_external_data

FORMAT = "srvit-manifest/1"
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # also a URL segment and a metric label
REQUIRED = ("name", "version", "depth", "max_depth", "platform", "model_file", "max_batch_size", "input", "output",
            "labels", "preprocessing", "files")  # fmt: skip
SHARED = ("version", "max_depth", "input", "output", "labels", "preprocessing")  # equal across a model's depths
HASH_CHUNK_BYTES = 1 << 20


class RepositoryError(Exception):
    """The repository cannot be served: start-up stops with this message, which says what to fix."""


@dataclass(frozen=True)
class Artifact:
    """One verified model folder: one depth of one model, as an ONNX graph or a TensorRT engine."""

    folder: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def depth(self) -> int:
        return self.manifest["depth"]

    @property
    def platform(self) -> str:
        return self.manifest["platform"]

    @property
    def path(self) -> Path:
        return self.folder / self.manifest["model_file"]

    @property
    def max_batch_size(self) -> int:
        return self.manifest["max_batch_size"]


@dataclass(frozen=True)
class Model:
    """A logical model: what its depths share, and each depth's folders (an ONNX one, maybe a TensorRT one)."""

    name: str
    artifacts: dict[int, tuple[Artifact, ...]]

    @property
    def manifest(self) -> dict:
        """The deepest depth's manifest; the SHARED keys are equal in all of them."""
        return self.artifacts[self.depths[-1]][0].manifest

    @property
    def depths(self) -> list[int]:
        return sorted(self.artifacts)

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def max_depth(self) -> int:
        return self.manifest["max_depth"]

    def accuracy(self, depth: int) -> dict | None:
        """The held-out top-1 of the depth's ONNX export (the reference), or None when none was measured."""
        by_platform = {a.platform: a for a in self.artifacts[depth]}
        artifact = by_platform.get("onnxruntime_onnx") or self.artifacts[depth][0]
        return artifact.manifest.get("accuracy")


def load_repository(repo: Path) -> dict[str, Model]:
    """All models in `repo`, or RepositoryError: serving part of a damaged repository would hide the damage."""
    artifacts = [read_artifact(path) for path in find_manifests(Path(repo))]
    return group(artifacts)


def find_manifests(repo: Path) -> list[Path]:
    """`<repo>/<folder>/manifest.json`, skipping dot-folders, where the exporter stages unfinished work."""
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist: export a model with `srvit export` or --repo")
    manifests = sorted(p for p in repo.glob("*/manifest.json") if not p.parent.name.startswith("."))
    if not manifests:
        raise RepositoryError(f"model repository {repo} holds no */manifest.json: export a model with `srvit export`")
    return manifests


def read_artifact(manifest_path: Path) -> Artifact:
    """A manifest checked against the contract, with every file it lists verified."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RepositoryError(f"{manifest_path}: unreadable manifest ({e}); re-export this model") from e
    check_manifest(manifest, manifest_path)
    artifact = Artifact(manifest_path.parent.resolve(), manifest)
    verify_files(artifact)
    return artifact


def check_manifest(manifest: dict, path: Path) -> None:
    """The keys the server relies on, with the types it relies on; anything else is the exporter's business."""
    problems = _manifest_problems(manifest)
    if problems:
        raise RepositoryError(f"{path}: {'; '.join(problems)}; re-export this model with `srvit export`")


def _manifest_problems(m: dict) -> list[str]:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return [f"not a {FORMAT} manifest (format {m.get('format') if isinstance(m, dict) else None!r})"]
    missing = [key for key in REQUIRED if key not in m]
    if missing:
        return [f"missing keys {missing}"]
    checks = [
        (isinstance(m["name"], str) and NAME_PATTERN.fullmatch(m["name"]), f"bad name {m['name']!r}"),
        (_positive_int(m["max_depth"]) and _positive_int(m["depth"]) and m["depth"] <= m["max_depth"],
         f"depth {m['depth']!r} is not within 1..max_depth {m['max_depth']!r}"),
        (m["platform"] in PLATFORMS, f"platform {m['platform']!r} is not one of {PLATFORMS}"),
        (_positive_int(m["max_batch_size"]), f"max_batch_size {m['max_batch_size']!r} is not a positive integer"),
        (_signature_ok(m), "input/output must be FP32 [-1, C, H, W] / [-1, len(labels)]"),
        (isinstance(m["files"], dict) and m["model_file"] in m["files"],
         f"model_file {m['model_file']!r} has no checksum in 'files'"),
    ]  # fmt: skip
    return [message for ok, message in checks if not ok]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _signature_ok(m: dict) -> bool:
    try:
        inp, out = m["input"], m["output"]
        ok_in = inp["datatype"] == "FP32" and len(inp["shape"]) == 4 and inp["shape"][0] == -1
        ok_out = out["datatype"] == "FP32" and list(out["shape"]) == [-1, len(m["labels"])]
        return ok_in and ok_out and isinstance(inp["name"], str) and isinstance(out["name"], str)
    except (KeyError, TypeError):
        return False


def verify_files(artifact: Artifact) -> None:
    """Sizes and sha256 of every listed file, and an ONNX graph's external data kept inside its folder."""
    for rel, entry in artifact.manifest["files"].items():
        verify_file(artifact.folder, rel, entry)
    if artifact.platform == "onnxruntime_onnx":
        check_external_data(artifact)


def verify_file(folder: Path, rel: str, entry: dict) -> None:
    path = (folder / rel).resolve()
    where = f"{folder}/{rel}"
    if not path.is_relative_to(folder):
        raise RepositoryError(f"{where}: the manifest lists a file outside its model folder; re-export this model")
    if not path.is_file():
        raise RepositoryError(f"{where}: listed in manifest.json but missing; re-export this model")
    if not isinstance(entry, dict):
        raise RepositoryError(f"{where}: its manifest entry must be {{'size_bytes', 'sha256'}}; re-export this model")
    try:
        size, digest = path.stat().st_size, sha256_file(path)
    except OSError as e:
        raise RepositoryError(f"{where}: cannot be read ({e.strerror}); check the file's permissions") from e
    if size != entry.get("size_bytes") or digest != entry.get("sha256"):
        raise RepositoryError(
            f"{where}: checksum mismatch (size {size}, sha256 {digest[:12]}…; the manifest says size "
            f"{entry.get('size_bytes')}, sha256 {str(entry.get('sha256'))[:12]}…): the file changed after export "
            "or was damaged in transit; re-export or re-copy this model folder"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_external_data(artifact: Artifact) -> None:
    """ONNX Runtime would open these paths itself, so they must stay inside the folder and be checksummed."""
    try:
        external = check_onnx_external_data(artifact.path)
    except UnsafeModelError as e:
        raise RepositoryError(f"refusing to load: {e}") from e
    listed = {(artifact.folder / rel).resolve() for rel in artifact.manifest["files"]}
    unlisted = [str(p.relative_to(artifact.folder)) for p in external if p not in listed]
    if unlisted:
        raise RepositoryError(
            f"{artifact.path}: external data {unlisted} has no checksum in manifest.json; re-export this model"
        )


def group(artifacts: list[Artifact]) -> dict[str, Model]:
    """Artifacts -> models; the depths of one model must agree on everything a request sees."""
    by_name: dict[str, dict[int, list[Artifact]]] = defaultdict(lambda: defaultdict(list))
    for artifact in artifacts:
        by_name[artifact.name][artifact.depth].append(artifact)
    models = {}
    for name, depths in sorted(by_name.items()):
        check_consistent(name, [a for folders in depths.values() for a in folders])
        models[name] = Model(name, {d: _platforms(folders) for d, folders in sorted(depths.items())})
    return models


def check_consistent(name: str, artifacts: list[Artifact]) -> None:
    """Folders left from an earlier export would serve another checkpoint's weights at some depths."""
    first = shared_values(artifacts[0].manifest)
    for other in artifacts[1:]:
        values = shared_values(other.manifest)
        differing = [key for key in first if values[key] != first[key]]
        if differing:
            raise RepositoryError(
                f"model {name!r}: folders {artifacts[0].folder.name} and {other.folder.name} differ in {differing}; "
                "they come from different exports: re-export all depths from one checkpoint with `srvit export` "
                "(it removes folders it did not produce)"
            )


def shared_values(manifest: dict) -> dict:
    """The SHARED keys plus the checkpoint, compared by its sha256 (the file may have been renamed)."""
    checkpoint = manifest.get("checkpoint")
    sha256 = checkpoint.get("sha256") if isinstance(checkpoint, dict) else None
    return {**{key: manifest[key] for key in SHARED}, "checkpoint": sha256}


def _platforms(folders: list[Artifact]) -> tuple[Artifact, ...]:
    """At most one folder per platform for a depth; ONNX first, as the reference."""
    platforms = [a.platform for a in folders]
    if len(set(platforms)) != len(platforms):
        names = ", ".join(a.folder.name for a in folders)
        raise RepositoryError(f"{names}: two folders serve the same model, depth and platform; remove one")
    return tuple(sorted(folders, key=lambda a: PLATFORMS.index(a.platform)))
