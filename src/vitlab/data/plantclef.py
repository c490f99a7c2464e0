"""PlantCLEF 2024 official formats: training metadata CSV, image folders, submission CSV."""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vitlab.data.text_files import not_utf8_error as _not_utf8_error
from vitlab.data.text_files import require_utf8
from vitlab.errors import ConfigError, DatasetFormatError

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
EXAMPLES = 3  # examples named in an error message

log = logging.getLogger(__name__)


def read_training_metadata(path: str | Path, required_only: bool = False) -> pd.DataFrame:
    """Read the `;`-separated training metadata CSV (UTF-8), checked: the required columns
    are there, species ids are integers, learn tags are known, and every image is listed once.

    An image listed twice with another `learn_tag` (it would be trained on and tested on) or
    another `species_id` (conflicting labels) is an error naming the lines; an exact duplicate
    (same image_name, species_id and learn_tag) is dropped with a counted warning
    (`frame.attrs["duplicate_rows"]`). Line numbers assume one line per row.
    `required_only`: read only image_name, species_id and learn_tag (the whole file is still
    checked to be UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"training metadata CSV not found: {path}")
    if required_only:  # pandas decodes only the columns it keeps: check the others too
        require_utf8(path)
    try:
        with warnings.catch_warnings():
            # chunked parsing (low_memory) of 3 columns: a bad species_id makes its chunk's
            # column mixed (DtypeWarning); the check below names it
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            frame = pd.read_csv(
                path,
                sep=";",
                dtype={"image_name": str, "learn_tag": str},
                # tokenising the whole file at once (low_memory=False) peaks at ~3x the file's
                # size: 0.9 GiB for the official 1.4 M rows; in chunks, with 3 columns, 0.3 GiB
                low_memory=required_only,
                encoding="utf-8",
                usecols=(lambda c: c in REQUIRED_METADATA_COLUMNS) if required_only else None,
            )
    except UnicodeDecodeError as err:
        raise _not_utf8_error(path) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DatasetFormatError(f"{path}: not a ';'-separated CSV: {err}") from err
    missing = [c for c in REQUIRED_METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetFormatError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)}"
        )
    frame.index = frame.index + 2  # the line of each row (line 1 is the header)
    no_name = frame["image_name"].isna()  # an empty field reads as NaN
    if no_name.any():
        raise DatasetFormatError(
            f"{path}: {int(no_name.sum())} row(s) without an image_name, e.g. line(s) "
            f"{list(frame.index[no_name][:EXAMPLES])}"
        )
    bad_ids = pd.to_numeric(frame["species_id"], errors="coerce").isna()
    if bad_ids.any():
        first = frame.loc[bad_ids, "image_name"].iloc[0]
        raise DatasetFormatError(
            f"{path}:{frame.index[bad_ids][0]}: {int(bad_ids.sum())} row(s) with a non-integer "
            f"species_id (first: {first})"
        )
    frame["species_id"] = frame["species_id"].astype("int64")
    unknown_tags = sorted(set(frame["learn_tag"].dropna()) - set(LEARN_TAGS))
    if unknown_tags or frame["learn_tag"].isna().any():
        raise DatasetFormatError(
            f"{path}: learn_tag must be one of {list(LEARN_TAGS)}, found {unknown_tags or 'empty'}"
        )
    frame = _drop_duplicate_rows(frame, path)
    return frame.reset_index(drop=True)


def read_species_names(path: str | Path | None) -> dict[int, str]:
    """species_id -> species (scientific name) from the training metadata CSV, for labelling
    charts. Names are cosmetic: a missing file, column or unreadable CSV gives {} (logged), never
    an error."""
    if not path or not Path(path).is_file():
        return {}
    try:
        with warnings.catch_warnings():  # a mixed species_id chunk: coerced below
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            frame = pd.read_csv(
                path,
                sep=";",
                usecols=lambda c: c in ("species_id", "species"),
                dtype={"species": str},
                encoding="utf-8",
                low_memory=True,  # in chunks: 2 of the official CSV's 20 columns
            )
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        log.info("no species names from %s: %s", path, err)
        return {}
    if not {"species_id", "species"} <= set(frame.columns):
        log.info("no species names: %s has no species_id/species columns", path)
        return {}
    frame = frame.dropna().drop_duplicates("species_id")
    ids = pd.to_numeric(frame["species_id"], errors="coerce")
    keep = ids.notna()
    return dict(zip(ids[keep].astype("int64").tolist(), frame["species"][keep], strict=True))


def _drop_duplicate_rows(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Drop exact duplicates (warned, counted); fail on an image listed with two labels/tags."""
    frame.attrs["duplicate_rows"] = 0
    if not frame["image_name"].duplicated().any():  # the common case: one hash of one column
        return frame
    exact = frame.duplicated(subset=list(REQUIRED_METADATA_COLUMNS))
    if exact.any():
        log.warning(
            "%s: %d duplicate row(s) (same image_name, species_id and learn_tag as an earlier "
            "row) ignored, e.g. line(s) %s",
            path,
            int(exact.sum()),
            list(frame.index[exact][:EXAMPLES]),
        )
        frame = frame[~exact]
    repeated = frame[frame["image_name"].duplicated(keep=False)]
    if not repeated.empty:
        problems = []
        for column, why in (
            ("learn_tag", "would be both trained on and evaluated on"),
            ("species_id", "would train on conflicting labels"),
        ):
            conflicts = repeated.groupby("image_name", sort=False)[column].nunique()
            names = list(conflicts.index[conflicts > 1])
            if names:
                rows = repeated[repeated["image_name"] == names[0]]
                listed = ", ".join(f"{v} on line {i}" for i, v in rows[column].items())
                problems.append(
                    f"{len(names)} image_name(s) listed with different {column}s ({why}), "
                    f"e.g. {names[0]}: {listed}"
                )
        raise DatasetFormatError(
            f"{path}: " + "; ".join(problems) + ". Each image must be listed once: fix or "
            "remove the extra rows"
        )
    frame.attrs["duplicate_rows"] = int(exact.sum())
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
    """The quadrat images of a test folder, sorted by plot id; an empty folder is an error, and
    so are two images of one plot (`X.jpg` and `X.png`: plot_id is the name without extension,
    so one prediction would overwrite the other)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"test image folder not found: {folder}")
    images = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not images:
        raise DatasetFormatError(f"test image folder {folder} contains no images")
    by_plot: dict[str, list[str]] = {}
    for image in images:
        by_plot.setdefault(plot_id_of(image), []).append(image.name)
    clashes = {plot: names for plot, names in by_plot.items() if len(names) > 1}
    if clashes:
        examples = "; ".join(
            f"{plot}: {', '.join(names)}" for plot, names in list(clashes.items())[:EXAMPLES]
        )
        raise DatasetFormatError(
            f"test image folder {folder}: {len(clashes)} plot(s) have more than one image "
            f"(plot_id is the file name without extension), e.g. {examples}; keep one image "
            "per plot"
        )
    return images


@dataclass
class DatasetCheck:
    """What `check_plantclef_dataset` read: the test quadrats, the ground truth (None when the
    dataset has none) and counts for the run's report."""

    test_images: list[Path]
    truth: dict[str, list[int]] | None = None
    report: dict[str, Any] = field(default_factory=dict)


def check_plantclef_dataset(dataset: Mapping[str, Any], training: bool = True) -> DatasetCheck:
    """Check a PlantCLEF dataset (the `dataset` config node) before any work: the test folder
    (images, one per plot), and when `training` the metadata CSV (see `read_training_metadata`),
    the training image folder (holds images the metadata names) and the species filter
    (`min_images_per_species`, counted on the metadata's train rows: how many species pass,
    the largest count); the ground truth when the file exists (well formed, not empty, covers
    every test plot). Every problem found is reported at once, each naming its config key."""

    problems: list[ValueError] = []

    def attempt(key: str | None, check, *args):
        try:
            return check(*args)
        except (DatasetFormatError, ConfigError) as err:
            problems.append(type(err)(f"{key}: {err}") if key else err)
            return None

    report: dict[str, Any] = {}
    test_images = attempt("dataset.test_images_dir", list_test_images, dataset["test_images_dir"])
    if test_images is not None:
        report["test_images"] = len(test_images)
    passing: set[int] | None = None
    if training:
        frame = attempt(
            "dataset.metadata_csv", read_training_metadata, dataset["metadata_csv"], True
        )
        names = set(frame["image_name"]) if frame is not None else None
        train_dir = dataset["train_images_dir"]
        attempt("dataset.train_images_dir", _check_training_images_dir, train_dir, names)
        if frame is not None:
            report["metadata_rows"] = len(frame)
            report["metadata_duplicate_rows"] = frame.attrs.get("duplicate_rows", 0)
            passing = attempt(
                None,
                _species_passing,
                frame,
                dataset["min_images_per_species"],
                dataset["metadata_csv"],
                report,
            )
    truth = None
    truth_path = dataset.get("test_ground_truth")
    if truth_path and Path(truth_path).is_file():
        truth = attempt("dataset.test_ground_truth", read_ground_truth, truth_path)
    if truth is not None and test_images is not None:
        attempt("dataset.test_ground_truth", _check_truth_covers, truth, test_images, truth_path)
        report["truth_plots"] = len(truth)
    if truth is not None and passing:
        truth_species = {s for ids in truth.values() for s in ids}
        if not truth_species & passing:
            problems.append(
                ConfigError(
                    f"dataset.test_ground_truth: none of its {len(truth_species)} species is "
                    f"among the {len(passing)} species the head would learn from "
                    f"{dataset['metadata_csv']}: the ground truth belongs to another dataset"
                )
            )
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = "\n  - ".join(str(p) for p in problems)
        raise DatasetFormatError(f"{len(problems)} problems with the dataset:\n  - {listed}")
    return DatasetCheck(test_images or [], truth, report)


def _check_training_images_dir(folder: str | Path, names: set[str] | None) -> None:
    """The folder holds at least one image the metadata names (stops at the first one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"training image folder not found: {folder}")
    seen = 0
    for _, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                seen += 1
                if names is None or name in names:
                    return
    if not seen:
        raise DatasetFormatError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    raise DatasetFormatError(
        f"none of the {seen} images below {folder} is named in the metadata CSV's image_name "
        "column: is it the training image folder?"
    )


def _species_passing(
    frame: pd.DataFrame, min_images: int, csv_path: Any, report: dict[str, Any]
) -> set[int]:
    """Species with >= min_images rows tagged train in the metadata (at least two are needed:
    a one-class head predicts the same species everywhere)."""
    from vitlab.errors import ConfigError

    counts = frame.loc[frame["learn_tag"] == "train", "species_id"].value_counts()
    passing = counts[counts >= min_images]
    largest = int(counts.max()) if len(counts) else 0
    report.update(
        species_in_metadata=int(frame["species_id"].nunique()),
        species_passing_filter=len(passing),
        largest_species_train_images=largest,
    )
    log.info(
        "species filter: %d of %d species have >= %s training images in %s (largest: %d)",
        len(passing),
        len(counts),
        min_images,
        csv_path,
        largest,
    )
    if len(passing) < 2:
        which = "no species" if passing.empty else "a single species"
        raise ConfigError(
            f"dataset.min_images_per_species={min_images} leaves {which} to train on: "
            f"{len(passing)} of {len(counts)} species have that many rows tagged train in "
            f"{csv_path}, the largest has {largest}; lower dataset.min_images_per_species"
        )
    return {int(s) for s in passing.index}


def _check_truth_covers(
    truth: Mapping[str, Sequence[int]], test_images: Sequence[Path], path: Any
) -> None:
    """Every test plot is in the ground truth (else scoring fails after all the work); truth
    plots without a quadrat score 0 and are only warned about."""
    plots = {plot_id_of(p) for p in test_images}
    unknown = sorted(plots - set(truth))
    if unknown:
        raise DatasetFormatError(
            f"{path} does not list {len(unknown)} of the {len(plots)} test plots, e.g. "
            f"{unknown[:EXAMPLES]}: is it the ground truth of this test folder?"
        )
    absent = sorted(set(truth) - plots)
    if absent:
        log.warning(
            "%d plot(s) of the ground truth %s have no quadrat in the test folder and will score "
            "0, e.g. %s",
            len(absent),
            path,
            absent[:EXAMPLES],
        )


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
    from vitlab.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [";".join(SUBMISSION_HEADER)]
    lines += [f"{p};{format_species_ids(predictions[p])}" for p in sorted(predictions)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_submission(path: str | Path) -> dict[str, list[int]]:
    """Read a submission (or ground-truth) CSV into plot_id -> species ids.

    Malformed files fail with the file and line: not UTF-8, empty, wrong header, wrong field
    count, unparsable ids, or a plot listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"submission file not found: {path}")
    try:
        return _read_submission_rows(path)
    except UnicodeDecodeError as err:
        raise _not_utf8_error(path) from err


def _read_submission_rows(path: Path) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=";")
        header = next(reader, None)
        if header is None:
            raise DatasetFormatError(
                f"{path} is empty: expected the header {';'.join(SUBMISSION_HEADER)!r} and one "
                "row per plot"
            )
        if tuple(h.strip() for h in header) != SUBMISSION_HEADER:
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


def read_ground_truth(path: str | Path) -> dict[str, list[int]]:
    """A ground-truth file: a submission-format CSV with at least one plot, each plot with at
    least one species (a file without plots would score every run 0)."""
    truth = read_submission(path)
    if not truth:
        raise DatasetFormatError(
            f"ground truth {path} lists no plot: expected one row per test plot after the header"
        )
    empty = [plot for plot, ids in truth.items() if not ids]
    if empty:
        raise DatasetFormatError(
            f"ground truth {path}: {len(empty)} plot(s) without any species, e.g. "
            f"{empty[:EXAMPLES]}; every plot of a ground truth has at least one"
        )
    return truth
