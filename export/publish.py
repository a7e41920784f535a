"""Atomic publish: every model folder is built in a hidden staging folder inside the repo, then renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from modelrepo.manifest import MANIFEST_FILE, folder_pattern


@contextlib.contextmanager
def staging(repo: Path, name: str) -> Iterator[Path]:
    """A scratch folder on the repo's own filesystem, so publishing is a rename; gone afterwards whatever happens.

    Its name starts with a dot: the server skips hidden folders, so a half-built model is never loaded.
    """
    created = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=repo))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only removed if nothing was published into it
                repo.rmdir()


def publish(stage: Path, repo: Path) -> list[Path]:
    """Move each finished model folder into the repo; call only once every check has passed."""
    folders = sorted(p for p in stage.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [replace_folder(folder, repo / folder.name) for folder in folders]


def remove_stale(repo: Path, name: str, keep: set[str], checkpoint_sha256: str) -> list[Path]:
    """Delete `{name}_d<depth>` and `{name}_d<depth>_trt` folders this export did not produce and that hold
    another checkpoint (or no readable manifest): left in place, they would serve other weights at some depths.
    Folders of the same checkpoint stay, so `--depths 2` re-exports one depth without losing the others.
    Call only after `publish`."""
    ours = folder_pattern(name)
    stale = sorted(
        p
        for p in repo.iterdir()
        if p.is_dir() and ours.fullmatch(p.name) and p.name not in keep and _checkpoint_of(p) != checkpoint_sha256
    )
    for folder in stale:
        remove_folder(folder)
    return stale


def _checkpoint_of(folder: Path) -> str | None:
    """Read leniently, not through `modelrepo.manifest.load` (which refuses a damaged folder): only the checkpoint
    decides whether a folder is stale."""
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())["checkpoint"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_folder(folder: Path) -> None:
    """Renamed to a hidden name first, so a reader never sees a half-deleted folder."""
    aside = folder.with_name(f".old-{folder.name}-{secrets.token_hex(4)}")
    os.rename(folder, aside)
    shutil.rmtree(aside)


def replace_folder(new: Path, target: Path) -> Path:
    """Old folder aside, new one in, old one deleted: a reader never sees a half-written folder,
    only (for an instant) none, and a failed rename puts the old one back."""
    if not target.exists():
        os.rename(new, target)
        return target
    aside = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside)
    return target
