"""Prepare: training images (official layout) -> Parquet shards of centre-cropped, resized JPEGs.

Output columns: image_name, species_id, learn_tag, image (JPEG bytes). Cached by a content key
of the metadata CSV, the image files (path, size, mtime) and the parameters that change the
output (not `workers`, a thread count). Corrupt images are skipped, counted and listed in the
stage report; images missing on disk follow `vitlab.data.missing_images` (a few are skipped and
counted, a missing folder, a missing split or more than `dataset.max_missing_fraction` fail
before any work), checked by each pipeline before it calls `prepare_images` (PlantCLEF's:
`vitlab.pipelines.plantclef.prepare.prepare_training_images`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from vitlab.cache import content_key
from vitlab.config import to_container
from vitlab.data.images import (
    CorruptImageError,
    center_crop_resize,
    decode_image,
    encode_jpeg,
    encode_raw,
)
from vitlab.data.loading import map_threads
from vitlab.data.shards import ShardedStage
from vitlab.engines.local import LocalEngine
from vitlab.errors import ConfigError
from vitlab.runtime import decode_pool_size

log = logging.getLogger(__name__)
PREPARED_SCHEMA = pa.schema(
    [
        ("image_name", pa.string()),
        ("species_id", pa.int64()),
        ("learn_tag", pa.string()),
        ("image", pa.binary()),
    ]
)
REPORT_LIST_LIMIT = 100  # names listed in reports; counts are always complete
# PrepareParams fields that do not change the prepared shards, so stay out of the cache key
NOT_IN_KEY = ("workers",)
ENCODINGS = ("jpeg", "raw")


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = 128
    center_crop: bool = True
    jpeg_quality: int = 95
    shard_size: int = 2048
    workers: int = 2  # decode threads: speed only, not in the cache key
    encoding: str = "jpeg"  # jpeg | raw (tagged uint8 pixels: no decode when embedding)

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"prepare.encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.image_size < 8:
            raise ValueError(f"prepare.image_size must be >= 8, got {self.image_size}")
        if self.shard_size < 1:
            raise ValueError(f"prepare.shard_size must be >= 1, got {self.shard_size}")

    @classmethod
    def from_config(cls, node: Any) -> PrepareParams:
        """From the `prepare` config node; ConfigError naming the key on a bad value."""
        try:
            return cls(**to_container(node))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"prepare: {err}") from err

    def key_params(self) -> dict[str, Any]:
        """What changes the prepared shards: every field but the thread count. `shard_size`
        stays: it decides which rows each shard holds, and a resumed stage must keep it."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_KEY}


def _prepare_one(path: Path, params: PrepareParams) -> bytes | str:
    """The prepared image's bytes (`params.encoding`), or the error message for a corrupt
    file."""
    try:
        img = decode_image(path)
    except CorruptImageError as err:
        return str(err)
    img = center_crop_resize(img, params.image_size, crop=params.center_crop)
    if params.encoding == "raw":
        return encode_raw(img)
    return encode_jpeg(img, params.jpeg_quality)


@dataclass(frozen=True)
class PrepareShardTask:
    """Prepare one shard's images (picklable: runs in-process or on a Spark executor)."""

    params: PrepareParams

    def __call__(
        self, shard_no: int, rows: pd.DataFrame, progress: Callable[[int], Any] | None
    ) -> tuple[pa.Table, dict[str, Any]]:
        records = list(rows.itertuples(index=False))
        workers = decode_pool_size(self.params.workers)  # runtime.threads caps it
        results = map_threads(lambda r: _prepare_one(Path(r.path), self.params), records, workers)
        kept = [(r, b) for r, b in zip(records, results) if isinstance(b, bytes)]
        corrupt = [r.image_name for r, b in zip(records, results) if isinstance(b, str)]
        for message in (b for b in results if isinstance(b, str)):
            log.warning("prepare: skipped %s", message)
        if progress:
            progress(len(records))
        # image_name + the caller's label columns pass through; path and shard do not
        passthrough = [c for c in rows.columns if c not in ("path", "shard")]
        columns = {c: [getattr(r, c) for r, _ in kept] for c in passthrough}
        columns["image"] = [b for _, b in kept]
        schema = PREPARED_SCHEMA if set(passthrough) == set(PREPARED_SCHEMA.names[:-1]) else None
        table = pa.table(columns, schema=schema) if kept else _empty_table(rows, schema)
        return table, {"corrupt": corrupt}


def _empty_table(rows: pd.DataFrame, schema: pa.Schema | None) -> pa.Table:
    if schema is not None:
        return schema.empty_table()
    fields = [
        (c, pa.from_numpy_dtype(rows[c].dtype) if rows[c].dtype != object else pa.string())
        for c in rows.columns
        if c not in ("path", "shard")
    ]
    return pa.schema([*fields, ("image", pa.binary())]).empty_table()


def prepare_images(
    work: pd.DataFrame,
    key_parts: list[Any],
    cache_dir: str | Path,
    params: PrepareParams,
    engine: Any = None,
    report: dict[str, Any] | None = None,
) -> ShardedStage:
    """Prepared shards of the images in `work` (columns image_name, path, + label columns that
    are kept), cached under a key of `key_parts` and the parameters.

    A cache hit checks that every shard is there with its recorded size; checksums are verified
    when shards are reused by a resume here, and by `embed_prepared` before it reads them (the
    full prepared images are large and not read at all when the embeddings are cached). A bad
    shard is recomputed from its rows."""
    engine = engine or LocalEngine()
    key = prepare_key(key_parts, params)
    stage = ShardedStage(Path(cache_dir) / "prepare" / key, key, params.key_params())
    stage.rebuild = lambda: _compute_missing_shards(stage, work, params, engine, report)
    # a hit: sizes only (a stat per shard); a resume: checksums of the shards it keeps
    stage.verify(checksum=not stage.complete)
    if stage.complete:
        log.info(
            "prepare: cache hit (key %s, %s)%s",
            key,
            stage.directory,
            "" if engine.name == "local" else f", engine={engine.name} not started",
        )
        return stage
    stage.rebuild()
    return stage


def prepare_key(key_parts: list[Any], params: PrepareParams) -> str:
    """The cache key: the inputs' fingerprints and the parameters that change the output."""
    return content_key("prepare-v1", *key_parts, params.key_params())


def _compute_missing_shards(
    stage: ShardedStage,
    work: pd.DataFrame,
    params: PrepareParams,
    engine: Any,
    report: dict[str, Any] | None,
) -> None:
    stage.remove_stale_temporaries()
    if work.empty:
        raise ValueError("prepare: no image to prepare")
    work = work.reset_index(drop=True)
    work.insert(0, "shard", work.index // params.shard_size)
    todo = work[~work["shard"].map(stage.has_shard)]
    if not todo.empty:
        engine.map_shards(stage, todo, PrepareShardTask(params), "prepare", len(todo))
    corrupt_all = [n for s in stage.manifest["shards"].values() for n in s.get("corrupt", [])]
    full_report: dict[str, Any] = {
        **(report or {}),
        "images_written": sum(s["rows"] for s in stage.manifest["shards"].values()),
        "corrupt_images": len(corrupt_all),
        "corrupt_examples": corrupt_all[:REPORT_LIST_LIMIT],
        "engine": getattr(engine, "name", "local"),
    }
    stage.finish(full_report)
    log.info("prepare: %s", _without_examples(full_report))


def _without_examples(report: Any) -> Any:
    """The report for a log line: counts, no name lists (a split's missing_examples hold up
    to REPORT_LIST_LIMIT names; summary.json keeps them)."""
    if not isinstance(report, dict):
        return report
    return {k: _without_examples(v) for k, v in report.items() if not k.endswith("examples")}
