"""Prepare PlantCLEF's training images: the official metadata CSV and image folder -> the
generic prepare stage (`vitlab.stages.prepare.prepare_images`), with the missing-image checks per
`learn_tag` split and a fixed shard order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitlab.cache import file_sha256, files_fingerprint
from vitlab.data.missing_images import (
    DEFAULT_MAX_MISSING_FRACTION,
    check_missing_images,
    require_image_folder,
)
from vitlab.data.plantclef import index_images, read_training_metadata
from vitlab.data.shards import ShardedStage
from vitlab.errors import DatasetFormatError
from vitlab.stages.prepare import REPORT_LIST_LIMIT, PrepareParams, prepare_images

SHARD_ORDER_SEED = 0


def prepare_training_images(
    metadata_csv: str | Path,
    images_dir: str | Path,
    cache_dir: str | Path,
    params: PrepareParams,
    engine: Any = None,
    max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
    images_key: str = "dataset.train_images_dir",
) -> ShardedStage:
    """PlantCLEF: prepared shards of the training metadata's images (cached).

    Before any work: the image folder must exist (error naming `images_key`), and each
    `learn_tag` split may miss at most `max_missing_fraction` of its images on disk (a split
    with none there, or more missing, is an error); the missing ones are counted per split in
    the stage report."""
    # image_name, species_id and learn_tag only: the 17 other columns of the official CSV (URLs,
    # authors, ...) would hold ~0.8 KiB per row in memory, ~1 GiB at its 1.4 M rows
    metadata = read_training_metadata(metadata_csv, required_only=True)
    require_image_folder(images_dir, images_key)
    index = index_images(images_dir)
    in_folder = metadata["image_name"].isin(index.keys())
    missing = metadata.loc[~in_folder, "image_name"].tolist()
    by_split = {}
    for tag, rows in metadata.groupby("learn_tag", sort=True):
        split_missing = rows.loc[~in_folder[rows.index], "image_name"].tolist()
        by_split[str(tag)] = check_missing_images(
            f"learn_tag={tag}",
            len(rows),
            split_missing,
            images_dir,
            images_key,
            max_missing_fraction,
            source=metadata_csv,
        ).report()
    work = metadata.loc[in_folder, ["image_name", "species_id", "learn_tag"]].reset_index(drop=True)
    if work.empty:
        raise DatasetFormatError(f"no image of {metadata_csv} was found below {images_dir}")
    work["path"] = [str(index[name]) for name in work["image_name"]]
    # Rows go to shards in a fixed random order, not the CSV's (often species by species), so
    # every shard, and every row group the streaming loader permutes, is a random sample.
    work = work.sample(frac=1.0, random_state=SHARD_ORDER_SEED).reset_index(drop=True)
    key_parts = [
        file_sha256(metadata_csv),
        files_fingerprint(index.values(), Path(images_dir)),
        f"shard-order-{SHARD_ORDER_SEED}",
    ]
    report = {
        "metadata_rows": len(metadata),
        "missing_images": len(missing),
        "missing_examples": missing[:REPORT_LIST_LIMIT],
        "missing_by_split": by_split,
    }
    return prepare_images(work, key_parts, cache_dir, params, engine, report)
