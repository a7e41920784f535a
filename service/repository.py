"""Reading model_repo/: every manifest checked and every file verified, grouped by model name into depths."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from modelrepo.adaptive import AdaptivePolicy
from modelrepo.files import sha256_file
from modelrepo.manifest import (
    MANIFEST_FILE,
    ONNX,
    PLATFORMS,
    BadFileEntry,
    FileEntry,
    Manifest,
    ManifestError,
    manifest_paths,
)
from modelrepo.manifest import load as load_manifest
from service.onnx_safety import UnsafeModelError, check_onnx_external_data


class RepositoryError(Exception):
    """The repository cannot be served: start-up stops with this message, which says what to fix."""


@dataclass(frozen=True)
class Artifact:
    """One verified model folder: one depth of one model, as an ONNX graph or a TensorRT engine."""

    folder: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def depth(self) -> int:
        return self.manifest.depth

    @property
    def platform(self) -> str:
        return self.manifest.platform

    @property
    def path(self) -> Path:
        return self.folder / self.manifest.model_file

    @property
    def max_batch_size(self) -> int:
        return self.manifest.max_batch_size


@dataclass(frozen=True)
class Model:
    """A logical model: what its depths share, and each depth's folders (an ONNX one, maybe a TensorRT one)."""

    name: str
    artifacts: dict[int, tuple[Artifact, ...]]

    @property
    def manifest(self) -> Manifest:
        """The deepest depth's manifest; what `Manifest.shared` names is equal in all of them."""
        return self.artifacts[self.depths[-1]][0].manifest

    @property
    def depths(self) -> list[int]:
        return sorted(self.artifacts)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def max_depth(self) -> int:
        return self.manifest.max_depth

    def accuracy(self, depth: int) -> dict | None:
        """The held-out top-1 of the depth's ONNX export (the reference), or None when none was measured."""
        by_platform = {a.platform: a for a in self.artifacts[depth]}
        artifact = by_platform.get(ONNX) or self.artifacts[depth][0]
        return artifact.manifest.accuracy

    @property
    def adaptive(self) -> AdaptivePolicy | None:
        """The calibrated policy of depth=adaptive, when the export fitted one and every depth it runs is served."""
        policy = self.manifest.adaptive
        return policy if policy is not None and set(policy.depths) <= set(self.artifacts) else None

    def flops(self, depth: int) -> int | None:
        """FLOPs per image at `depth`, as the export counted them (None for a manifest before format /2)."""
        return self.artifacts[depth][0].manifest.flops

    def depth_named(self, triton_name: str) -> int | None:
        """The depth whose Triton folder is `triton_name` (`tiny_d2` is depth 2), or None."""
        for depth, artifacts in self.artifacts.items():
            if any(a.manifest.triton_name == triton_name for a in artifacts):
                return depth
        return None


def load_repository(repo: Path) -> dict[str, Model]:
    """All models in `repo`, or RepositoryError: serving part of a damaged repository would hide the damage."""
    artifacts = [read_artifact(path) for path in find_manifests(Path(repo))]
    return group(artifacts)


def find_manifests(repo: Path) -> list[Path]:
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist: export a model with `srvit export` or --repo")
    manifests = manifest_paths(repo)
    if not manifests:
        raise RepositoryError(f"model repository {repo} holds no */{MANIFEST_FILE}: export a model with `srvit export`")
    return manifests


def read_artifact(manifest_path: Path) -> Artifact:
    """A manifest checked against the contract, with every file it lists verified."""
    folder = manifest_path.parent.resolve()
    try:
        manifest = load_manifest(manifest_path)
    except BadFileEntry as e:
        raise RepositoryError(f"{manifest_path.parent}/{e}; re-export this model") from e
    except ManifestError as e:
        raise RepositoryError(f"{manifest_path}: {e}; re-export this model with `srvit export`") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RepositoryError(f"{manifest_path}: unreadable manifest ({e}); re-export this model") from e
    artifact = Artifact(folder, manifest)
    verify_files(artifact)
    return artifact


def verify_files(artifact: Artifact) -> None:
    """Sizes and sha256 of every listed file, and an ONNX graph's external data kept inside its folder."""
    for rel, entry in artifact.manifest.files.items():
        verify_file(artifact.folder, rel, entry)
    if artifact.platform == ONNX:
        check_external_data(artifact)


def verify_file(folder: Path, rel: str, entry: FileEntry) -> None:
    path = (folder / rel).resolve()
    where = f"{folder}/{rel}"
    if not path.is_relative_to(folder):
        raise RepositoryError(f"{where}: the manifest lists a file outside its model folder; re-export this model")
    if not path.is_file():
        raise RepositoryError(f"{where}: listed in manifest.json but missing; re-export this model")
    try:
        size, digest = path.stat().st_size, sha256_file(path)
    except OSError as e:
        raise RepositoryError(f"{where}: cannot be read ({e.strerror}); check the file's permissions") from e
    if size != entry.size_bytes or digest != entry.sha256:
        raise RepositoryError(
            f"{where}: checksum mismatch (size {size}, sha256 {digest[:12]}…; the manifest says size "
            f"{entry.size_bytes}, sha256 {entry.sha256[:12]}…): the file changed after export "
            "or was damaged in transit; re-export or re-copy this model folder"
        )


def check_external_data(artifact: Artifact) -> None:
    """ONNX Runtime would open these paths itself, so they must stay inside the folder and be checksummed."""
    try:
        external = check_onnx_external_data(artifact.path)
    except UnsafeModelError as e:
        raise RepositoryError(f"refusing to load: {e}") from e
    listed = {(artifact.folder / rel).resolve() for rel in artifact.manifest.files}
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
    first = artifacts[0].manifest.shared()
    for other in artifacts[1:]:
        values = other.manifest.shared()
        differing = [key for key in first if values[key] != first[key]]
        if differing:
            raise RepositoryError(
                f"model {name!r}: folders {artifacts[0].folder.name} and {other.folder.name} differ in {differing}; "
                "they come from different exports: re-export all depths from one checkpoint with `srvit export` "
                "(it removes folders it did not produce)"
            )


def _platforms(folders: list[Artifact]) -> tuple[Artifact, ...]:
    """At most one folder per platform for a depth; ONNX first, as the reference."""
    platforms = [a.platform for a in folders]
    if len(set(platforms)) != len(platforms):
        names = ", ".join(a.folder.name for a in folders)
        raise RepositoryError(f"{names}: two folders serve the same model, depth and platform; remove one")
    return tuple(sorted(folders, key=lambda a: PLATFORMS.index(a.platform)))
