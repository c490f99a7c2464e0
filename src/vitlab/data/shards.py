"""Parquet shard IO for stage outputs: atomic shard writes and a manifest of completed shards.

A stage directory holds `part-XXXXX.parquet` shards and `manifest.json`. A shard is written to a
temporary name and renamed, then recorded in the manifest (also written atomically), so a killed
stage never leaves a half file that looks whole and a rerun can skip the shards it finished.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardedStage:
    """Output folder of one stage run, identified by its content key."""

    def __init__(self, directory: str | Path, key: str, params: dict[str, Any]):
        self.directory = Path(directory)
        self.key = key
        self.params = params
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("key") == self.key:
                return manifest
        return {"key": self.key, "params": self.params, "shards": {}, "complete": False}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def has_shard(self, index: int) -> bool:
        name = shard_name(index)
        return name in self.manifest["shards"] and (self.directory / name).is_file()

    def write_shard(
        self, index: int, table: pa.Table, report: dict[str, Any] | None = None
    ) -> Path:
        path = write_shard_file(self.directory, index, table)
        self.record_shard(index, table.num_rows, report)
        return path

    def record_shard(self, index: int, rows: int, report: dict[str, Any] | None = None) -> None:
        """Mark a shard file (already renamed into place) as complete in the manifest."""
        self.manifest["shards"][shard_name(index)] = {"rows": rows, **(report or {})}
        self._save()

    def remove_stale_temporaries(self) -> int:
        """Delete temp files left by a killed writer; complete shards are never temp files."""
        stale = list(self.directory.glob(".part-*.tmp-*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def finish(self, report: dict[str, Any]) -> None:
        self.manifest["report"] = report
        self.manifest["complete"] = True
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.directory / MANIFEST, json.dumps(self.manifest, indent=1))

    def shard_indices(self) -> list[int]:
        return sorted(int(name[5:10]) for name in self.manifest["shards"])

    def path_of(self, index: int) -> Path:
        return self.directory / shard_name(index)

    def shard_paths(self) -> list[Path]:
        return [self.directory / name for name in sorted(self.manifest["shards"])]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        paths = self.shard_paths()
        if not paths:
            raise FileNotFoundError(f"stage {self.directory} has no shards")
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for path in self.shard_paths():
            yield pq.read_table(path, columns=columns)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard_file(directory: Path, index: int, table: pa.Table) -> Path:
    """Write a shard atomically: a temp name in the same folder, then rename."""
    final = Path(directory) / shard_name(index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def embeddings_to_arrow(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float array -> Arrow fixed-size-list column (zero-copy on the values)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    values = pa.array(embeddings.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1])


def arrow_to_embeddings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed-size-list column -> (N, D) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return values.astype(np.float32, copy=False)
