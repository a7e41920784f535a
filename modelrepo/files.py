"""Checksums of the files a model folder holds: the manifest lists them, the server verifies them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from modelrepo.manifest import FileEntry

HASH_CHUNK_BYTES = 1 << 20  # graphs run to hundreds of MiB: hash in chunks, never read a file whole


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path, relative_paths: list[str]) -> dict[str, FileEntry]:
    """Checksums of the files the server loads, so it can refuse a folder that changed after export."""
    entries = {}
    for rel in sorted(relative_paths):
        path = Path(folder) / rel
        entries[rel] = FileEntry(sha256_file(path), path.stat().st_size)
    return entries
