"""Parquet shard IO for stage outputs: atomic shard writes and a manifest of verified shards.

A stage directory holds `part-XXXXX.parquet` shards and `manifest.json`. A shard is written to a
temporary name and renamed, then recorded in the manifest (also written atomically) with its
size and SHA-256, so a killed stage never leaves a half file that looks whole and a rerun can
skip the shards it finished.

Before a stage reuses shards they are checked against the manifest (`ShardedStage.verify`): a
shard that is missing, has another size or fails its checksum is dropped with a warning naming
the file, the stage becomes incomplete again and only that shard is recomputed. A manifest that
is not valid JSON is treated as absent (warning): the stage is recomputed. Temp files carry
their writer's host, pid namespace, pid and thread, so a cleanup removes only those of dead
writers and never a file another live worker is still writing.

Every manifest carries `"written_by": "vitlab"`: `vitlab cache rm` deletes only folders whose
manifest says so (or, written before the marker, matches the stage manifest schema), and in
them only the files a stage writes (`is_stage_file`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitlab.atomic import WRITER_HOST, atomic_write_bytes, atomic_write_text
from vitlab.cache import file_sha256

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
WRITTEN_BY = "vitlab"  # the manifest's `written_by`: what `vitlab cache rm` may delete
SHARD_NAME_RE = re.compile(r"^part-\d{5}\.parquet$")
# every file a stage writes in its folder: shards, their reports (Spark) and the manifest
_STAGE_FILE_RE = re.compile(
    r"^(manifest\.json|part-\d{5}\.parquet|\.part-\d{5}\.parquet\.report\.json)$"
)
# A temp file whose writer cannot be checked (another host or pid namespace, or a name without
# a writer) is removed only once it is this old: no shard or manifest write takes hours, and a
# leftover temp only costs disk until then.
STALE_TEMP_AGE_S = 6 * 3600
# the names `vitlab.atomic.temp_path` gives (the writer's host token is `WRITER_HOST`)
_TEMP_RE = re.compile(r"^\.(?P<target>.+?)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<thread>\d+)$")


class CorruptShardError(RuntimeError):
    """A shard a stage needs failed verification and the stage cannot recompute it here."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """True for a temp file whose writer is gone: this host's writer pid is dead, or (another
    host, or a name without a writer) the file is older than `STALE_TEMP_AGE_S`."""
    match = _TEMP_RE.match(path.name)
    if match and match["host"] == WRITER_HOST:
        return not _pid_alive(int(match["pid"]))
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_TEMP_AGE_S


def is_stage_file(name: str) -> bool:
    """True for the name of a file a stage writes in its folder, or of its temp file: what
    `vitlab cache rm` deletes (anything else in an entry folder is not vitlab's)."""
    match = _TEMP_RE.match(name)
    return bool(_STAGE_FILE_RE.match(match["target"] if match else name))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_report_path(directory: Path, index: int) -> Path:
    """Where an engine that writes shards out of process (Spark) leaves a shard's report."""
    return Path(directory) / f".{shard_name(index)}.report.json"


@dataclass(frozen=True)
class ShardFile:
    path: Path
    bytes: int
    sha256: str


def encode_shard(table: pa.Table) -> pa.Buffer:
    """The Parquet bytes of a shard (in memory, so they are hashed as written)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_shard_bytes(directory: Path, index: int, data: pa.Buffer | bytes) -> ShardFile:
    """Write encoded shard bytes atomically (temp name in the same folder, then rename)."""
    final = Path(directory) / shard_name(index)
    view = memoryview(data)
    digest = hashlib.sha256(view).hexdigest()
    atomic_write_bytes(final, view)
    return ShardFile(final, view.nbytes, digest)


def write_shard_file(directory: Path, index: int, table: pa.Table) -> ShardFile:
    """Write a shard atomically; its size and SHA-256 go into the manifest."""
    return write_shard_bytes(directory, index, encode_shard(table))


def check_shard(path: Path, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """What is wrong with a recorded shard file, or None. Without `checksum` only its presence
    and size are checked. An entry without a checksum (written by an older vitlab) is checked
    by its Parquet footer and row count."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if "sha256" not in entry:
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as err:
            return f"is not a readable Parquet file ({err})"
        if rows != entry.get("rows"):
            return f"has {rows} rows, the manifest recorded {entry.get('rows')}"
        return None
    if size != entry.get("bytes"):
        return f"has {size} bytes, the manifest recorded {entry.get('bytes')} (truncated?)"
    if checksum and file_sha256(path) != entry["sha256"]:
        return "does not match its SHA-256 checksum (corrupt)"
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """A stage manifest; ValueError when the file is not a well-formed one."""
    try:
        manifest = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: {err}") from err
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("rows"), int) for s in shards.values()
    ):
        raise ValueError("no valid 'shards' mapping")
    return manifest


class ShardedStage:
    """Output folder of one stage run, identified by its content key.

    `rebuild`, set by the function that computes the stage, recomputes the shards missing from
    the manifest and finishes the stage; a consumer that finds a bad input shard calls it
    through `require`.
    """

    def __init__(self, directory: str | Path, key: str, params: dict[str, Any]):
        self.directory = Path(directory)
        self.key = key
        self.params = params
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = self._load_manifest()
        self.rebuild: Callable[[], None] | None = None
        self._hashed: set[str] = set()  # shards whose bytes were hashed in this process

    def _load_manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        if path.is_file():
            try:
                manifest = read_manifest(path)
            except ValueError as err:
                log.warning("stage manifest %s is corrupt (%s); the stage is recomputed", path, err)
            else:
                if manifest.get("key") == self.key:
                    manifest.setdefault("written_by", WRITTEN_BY)  # adopt an older manifest
                    return manifest
        return {
            "written_by": WRITTEN_BY,
            "key": self.key,
            "params": self.params,
            "shards": {},
            "complete": False,
        }

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def has_shard(self, index: int) -> bool:
        name = shard_name(index)
        return name in self.manifest["shards"] and (self.directory / name).is_file()

    def write_shard(
        self, index: int, table: pa.Table, report: dict[str, Any] | None = None
    ) -> Path:
        written = write_shard_file(self.directory, index, table)
        self.record_shard(index, table.num_rows, report, written)
        return written.path

    def record_shard(
        self,
        index: int,
        rows: int,
        report: dict[str, Any] | None = None,
        written: ShardFile | None = None,
    ) -> None:
        """Mark a shard file (already renamed into place) as complete in the manifest, with
        the size and checksum of the bytes its writer wrote (`written`, or the report's
        `bytes` / `sha256` keys)."""
        entry: dict[str, Any] = {"rows": rows, **(report or {})}
        if written is not None:
            entry.update(bytes=written.bytes, sha256=written.sha256)
            self._hashed.add(shard_name(index))
        self.manifest["shards"][shard_name(index)] = entry
        self._save()

    def verify(self, indices: Iterable[int] | None = None, checksum: bool = True) -> list[str]:
        """Check recorded shards (all, or `indices`) against the manifest and drop the bad
        ones, warning with each file's path: the stage becomes incomplete and a rerun of its
        computation writes just those shards again. Returns the dropped shard names.

        `checksum=False` checks presence and size only (a stat per shard). Shards recorded
        without a checksum by an older vitlab are checked by footer and row count, then
        hashed once and the checksum recorded.
        """
        shards = self.manifest["shards"]
        names = (
            sorted(shards)
            if indices is None
            else [n for n in map(shard_name, indices) if n in shards]
        )
        dropped, adopted = [], 0
        for name in names:
            if checksum and name in self._hashed:
                continue
            entry, path = shards[name], self.directory / name
            problem = check_shard(path, entry, checksum)
            if problem is not None:
                log.warning(
                    "%s: shard %s %s; it is dropped from the cache and recomputed",
                    self.directory.parent.name,
                    path,
                    problem,
                )
                self._drop(name)
                dropped.append(name)
            elif "sha256" not in entry:
                entry.update(bytes=path.stat().st_size, sha256=file_sha256(path))
                self._hashed.add(name)
                adopted += 1
            elif checksum:
                self._hashed.add(name)
        if adopted:
            log.info(
                "%s: recorded checksums of %d shard(s) written by an older vitlab in %s",
                self.directory.parent.name,
                adopted,
                self.directory,
            )
        if dropped or adopted:
            if dropped:
                self.manifest["complete"] = False
            self._save()
        return dropped

    def require(self, indices: Iterable[int]) -> None:
        """Verify the shards a consumer is about to read (checksums) and recompute bad ones
        with `rebuild`; raises CorruptShardError when that is not possible."""
        indices = list(indices)
        if not self.verify(indices, checksum=True):
            return
        if self.rebuild is None:
            raise CorruptShardError(
                f"stage {self.directory} had corrupt shards (see the warnings above); they were"
                " dropped from its manifest: rerun to recompute them"
            )
        self.rebuild()
        missing = [i for i in indices if not self.has_shard(i)]
        if missing:
            raise CorruptShardError(f"stage {self.directory}: shards {missing} were not rebuilt")

    def _drop(self, name: str) -> None:
        del self.manifest["shards"][name]
        self._hashed.discard(name)
        (self.directory / name).unlink(missing_ok=True)
        shard_report_path(self.directory, int(name[5:10])).unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> int:
        """Delete temp files of writers that are gone (see `is_stale_temporary`); a live
        writer's temp stays, and complete shards are never temp files."""
        removed = 0
        now = time.time()
        for path in self.directory.glob(".*.tmp-*"):
            if is_stale_temporary(path, now):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

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
