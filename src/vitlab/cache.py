"""Content keys for cached stage outputs.

A key is the SHA-256 of a canonical JSON of everything a stage's output depends on, so changing
any input or parameter yields a new key and unchanged inputs reuse the cached output.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def content_key(*parts: Any, length: int = 16) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(paths: Iterable[Path], root: Path) -> str:
    """Hash of (relative path, size, mtime) of many files: cheap for a million images, and
    changes when any file is added, removed, replaced or touched."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = os.stat(path)
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def directory_fingerprint(root: str | Path) -> str:
    root = Path(root)
    return files_fingerprint((p for p in root.rglob("*") if p.is_file()), root)
