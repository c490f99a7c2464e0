"""PlantCLEF 2024 official formats: training metadata CSV, image folders, submission CSV."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

METADATA_COLUMNS: tuple[str, ...] = (
    "image_name",
    "organ",
    "species_id",
    "obs_id",
    "license",
    "partner",
    "author",
    "altitude",
    "latitude",
    "longitude",
    "gbif_species_id",
    "species",
    "genus",
    "family",
    "dataset",
    "publisher",
    "references",
    "url",
    "learn_tag",
    "image_backup_url",
)
REQUIRED_METADATA_COLUMNS: tuple[str, ...] = ("image_name", "species_id", "learn_tag")
LEARN_TAGS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SUBMISSION_HEADER = ("plot_id", "species_ids")


class DatasetFormatError(ValueError):
    """The data on disk does not follow the official layout; the message names the culprit."""


def read_training_metadata(path: str | Path) -> pd.DataFrame:
    """Read the `;`-separated training metadata CSV; fail naming any missing required column."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"training metadata CSV not found: {path}")
    frame = pd.read_csv(
        path, sep=";", dtype={"image_name": str, "learn_tag": str}, low_memory=False
    )
    missing = [c for c in REQUIRED_METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetFormatError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)}"
        )
    bad_ids = pd.to_numeric(frame["species_id"], errors="coerce").isna()
    if bad_ids.any():
        first = frame.loc[bad_ids, "image_name"].iloc[0]
        raise DatasetFormatError(
            f"{path}: {int(bad_ids.sum())} row(s) with a non-integer species_id (first: {first})"
        )
    frame["species_id"] = frame["species_id"].astype("int64")
    unknown_tags = sorted(set(frame["learn_tag"].dropna()) - set(LEARN_TAGS))
    if unknown_tags or frame["learn_tag"].isna().any():
        raise DatasetFormatError(
            f"{path}: learn_tag must be one of {list(LEARN_TAGS)}, found {unknown_tags or 'empty'}"
        )
    return frame


def index_images(root: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Map image file name -> path for every image below root (recursively), as peers join on
    `image_name`. A name found twice is an error: the join would be ambiguous."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"image folder not found: {root}")
    found: dict[str, Path] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(tuple(suffixes)):
                if name in found:
                    raise DatasetFormatError(
                        f"image name {name} appears twice: {found[name]} and {dirpath}/{name}"
                    )
                found[name] = Path(dirpath) / name
    return found


def list_test_images(folder: str | Path) -> list[Path]:
    """The quadrat images of a test folder, sorted by plot id; an empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"test image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetFormatError(f"test image folder {folder} contains no images")
    return images


def plot_id_of(path: str | Path) -> str:
    """`plot_id` is the quadrat's file name without extension."""
    return Path(path).stem


def format_species_ids(species_ids: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in species_ids) + "]"


_IDS_RE = re.compile(r"^\s*\[\s*(.*?)\s*\]\s*$")


def parse_species_ids(text: str) -> list[int]:
    """Parse `[1395807, 1351484]` (also `[]`); raise ValueError on anything else."""
    match = _IDS_RE.match(text)
    if not match:
        raise ValueError(f"species_ids must look like [id, id], got {text!r}")
    body = match.group(1)
    if not body:
        return []
    return [int(part) for part in body.split(",")]


def write_submission(predictions: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """Write `plot_id;species_ids` rows, sorted by plot id, atomically (temp file + rename)."""
    from vitlab.data.shards import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [";".join(SUBMISSION_HEADER)]
    lines += [f"{p};{format_species_ids(predictions[p])}" for p in sorted(predictions)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_submission(path: str | Path) -> dict[str, list[int]]:
    """Read a submission (or ground-truth) CSV into plot_id -> species ids.

    Malformed files fail with the file and line: wrong header, wrong field count, unparsable
    ids, or a plot listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"submission file not found: {path}")
    rows: dict[str, list[int]] = {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle, delimiter=";")
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != SUBMISSION_HEADER:
            raise DatasetFormatError(
                f"{path}: header must be {';'.join(SUBMISSION_HEADER)!r}, got {header}"
            )
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DatasetFormatError(f"{path}:{line_no}: expected 2 fields, got {row}")
            plot_id = row[0].strip()
            try:
                ids = parse_species_ids(row[1])
            except ValueError as err:
                raise DatasetFormatError(f"{path}:{line_no}: {err}") from err
            if plot_id in rows:
                raise DatasetFormatError(f"{path}:{line_no}: plot {plot_id} listed twice")
            rows[plot_id] = ids
    return rows
