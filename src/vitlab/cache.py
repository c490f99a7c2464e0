"""Content keys for cached stage outputs.

A key is the SHA-256 of a canonical JSON of everything a stage's output depends on, so changing
any input or parameter yields a new key and unchanged inputs reuse the cached output.

Input files enter a key through a fingerprint. The mode is set once per run from the config key
`cache_fingerprint` (`set_fingerprint_mode`):
- `stat` (default): relative path, size, mtime and ctime of each file, a stat per file. The
  ctime cannot be set back by a user (unlike the mtime, `touch -d` / `os.utime`) and changes
  whenever a file is rewritten or replaced, so other bytes with the same size and mtime are a
  miss. A `touch`, a copy or a restore of the dataset is a miss too (recomputed, never stale).
- `content`: relative path and SHA-256 of each file: reads every byte once per key
  computation, and reuses the cache across touches and copies to another disk or node.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vitlab.errors import ConfigError

FINGERPRINT_MODES = ("stat", "content")
# threads hashing files in content mode: reads and hashlib release the GIL, and on a network
# file system the latency of many small files, not the CPU, sets the pace
HASH_THREADS = 8
_mode = "stat"


def set_fingerprint_mode(mode: str) -> None:
    """How input files are fingerprinted from now on in this process (`cache_fingerprint`)."""
    global _mode
    if mode not in FINGERPRINT_MODES:
        raise ConfigError(
            f"cache_fingerprint={mode!r}: must be one of {', '.join(FINGERPRINT_MODES)} "
            "(stat: path, size, mtime and ctime of each file; content: SHA-256 of each file)"
        )
    _mode = mode


def fingerprint_mode() -> str:
    return _mode


def content_key(*parts: Any, length: int = 16) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stat_line(path: Path) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def _content_hashes(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, hashed by a few threads; submitted a chunk at a time, as a pool's
    `map` makes every future up front (1.4 M of them for the PlantCLEF training images)."""
    chunk = 64 * HASH_THREADS
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return [
            h
            for i in range(0, len(paths), chunk)
            for h in pool.map(file_sha256, paths[i : i + chunk])
        ]


def files_fingerprint(paths: Iterable[Path], root: Path) -> str:
    """Hash of many files (relative to `root`) in the mode `set_fingerprint_mode` chose: it
    changes when a file is added, removed, renamed or gets other bytes (stat mode: also when
    it is touched or copied). The two modes never give the same hash."""
    paths = sorted(paths)
    if _mode == "content":
        states = _content_hashes(paths)
    else:
        states = [_stat_line(path) for path in paths]
    digest = hashlib.sha256(f"files-{_mode}-v2\n".encode())
    for path, state in zip(paths, states, strict=True):
        digest.update(f"{path.relative_to(root)}|{state}\n".encode())
    return digest.hexdigest()


def directory_fingerprint(root: str | Path) -> str:
    """`files_fingerprint` of every file below `root`."""
    root = Path(root)
    return files_fingerprint((p for p in root.rglob("*") if p.is_file()), root)
