"""FungiCLEF (Danish Fungi DF20/DF21, FungiCLEF 2023 "PRODUCTION" files) formats and splits.

Layout (file names are the dataset config's defaults):
    FungiCLEF2023_train_metadata_PRODUCTION.csv        DF20, one row per image
    FungiCLEF2023_val_metadata_PRODUCTION.csv          DF21, class_id -1 = unknown species
    FungiCLEF2023_public_test_metadata_PRODUCTION.csv  test images, no labels (optional)
    poison_status_list.csv                             class_id,poisonous
    DF20_300/<image_path>, DF21_300/<image_path>       images (300 px max side version)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vitlab.data.metadata import DATE_PERIODS, invalid_numbers
from vitlab.data.text_files import not_utf8_error
from vitlab.errors import DatasetFormatError

log = logging.getLogger(__name__)

UNKNOWN = -1
EXAMPLES = 3  # line numbers named in a warning
REQUIRED_COLUMNS = ("observationID", "image_path", "class_id")
METADATA_COLUMNS = (
    "month",
    "day",
    "Substrate",
    "Habitat",
    "MetaSubstrate",
    "Latitude",
    "Longitude",
)
TAXONOMY_COLUMNS = ("species", "genus", "family", "order", "class", "phylum", "kingdom")
CSV_COLUMNS = (
    "observationID",
    "month",
    "day",
    "countryCode",
    "locality",
    "level0Gid",
    "level0Name",
    "level1Gid",
    "level1Name",
    "level2Gid",
    "level2Name",
    "Substrate",
    "Habitat",
    "MetaSubstrate",
    "Latitude",
    "Longitude",
    "CoorUncert",
    "image_path",
    "class_id",
    "poisonous",
    *TAXONOMY_COLUMNS,
)


@dataclass(frozen=True)
class NumberRule:
    """What a numeric column accepts; `allowed` is what the error message says."""

    allowed: str
    integer: bool = False
    low: float = -math.inf
    high: float = math.inf
    required: bool = False  # an empty field is an error (otherwise: missing, encoded as unknown)


NUMBER_RULES: dict[str, NumberRule] = {
    "observationID": NumberRule("an integer", integer=True, required=True),
    "class_id": NumberRule("an integer (-1 = unknown species)", integer=True, required=True),
    **{
        name: NumberRule(f"an integer 1-{period} or empty", integer=True, low=1, high=period)
        for name, period in DATE_PERIODS.items()
    },
    "Latitude": NumberRule("a number from -90 to 90 or empty", low=-90, high=90),
    "Longitude": NumberRule("a number from -180 to 180 or empty", low=-180, high=180),
}
# which difference an error names first when one image is listed twice, and why it matters
CONFLICTS = {
    "class_id": "it would train on conflicting labels",
    "observationID": "it would count in two observations",
}


def read_metadata(path: str | Path, labelled: bool = True) -> pd.DataFrame:
    """One row per image, checked before any image is read: the required columns are there,
    ids are integers, month/day/coordinates are in range or empty, every row names its image.

    Bad values fail naming file, line (header = line 1; one line per row is assumed) and
    column. An image listed twice with any difference (another class_id, observationID or
    metadata) is an error naming both lines; an exact duplicate row is dropped with a counted
    warning (`frame.attrs["duplicate_rows"]`). Several images sharing an observationID is the
    official layout, not a duplicate."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"FungiCLEF metadata CSV not found: {path}")
    checked = [c for c in NUMBER_RULES if labelled or c != "class_id"]
    try:
        # checked columns as text, so an error quotes what the file says ("13", not 13.0)
        text = dict.fromkeys(["image_path", *checked], str)
        frame = pd.read_csv(path, low_memory=False, encoding="utf-8", dtype=text)
    except UnicodeDecodeError as err:
        raise not_utf8_error(path) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DatasetFormatError(f"{path}: not a comma-separated CSV: {err}") from err
    required = REQUIRED_COLUMNS if labelled else REQUIRED_COLUMNS[:2]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetFormatError(f"{path}: missing required column(s) {missing}")
    frame.index = frame.index + 2  # the line of each row (line 1 is the header)
    no_image = frame["image_path"].isna()
    if no_image.any():
        raise DatasetFormatError(
            f"{_where(path, frame, 'image_path', no_image)} is empty "
            f"({int(no_image.sum())} row(s)); every row names its image"
        )
    for column in checked:
        if column in frame.columns:
            frame[column] = _checked_numbers(path, frame, column, NUMBER_RULES[column])
    frame = _drop_duplicate_rows(path, frame)
    return frame.reset_index(drop=True)


def _where(path: Path, frame: pd.DataFrame, column: str, bad: pd.Series) -> str:
    """`file:line: column (column k)` of the first bad row; frame.index holds the lines."""
    position = list(frame.columns).index(column) + 1
    return f"{path}:{frame.index[bad.to_numpy()][0]}: {column} (column {position})"


def _checked_numbers(path: Path, frame: pd.DataFrame, column: str, rule: NumberRule) -> pd.Series:
    """The column as numbers (int64 for required integers, float64 with NaN otherwise), or
    DatasetFormatError naming the first bad value."""
    raw = frame[column]
    bad = invalid_numbers(raw, rule.low, rule.high, rule.integer)
    if rule.required:
        bad |= raw.isna()
    if bad.any():
        value = raw[bad].iloc[0]
        value = "" if pd.isna(value) else value  # an empty field reads as NaN
        count = int(bad.sum())
        more = f" ({count} row(s) in all)" if count > 1 else ""
        raise DatasetFormatError(
            f"{_where(path, frame, column, bad)} must be {rule.allowed}, got {value!r}{more}"
        )
    values = pd.to_numeric(raw, errors="coerce")
    return values.astype("int64") if rule.integer and rule.required else values.astype("float64")


def _drop_duplicate_rows(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Drop rows identical to an earlier one (warned, counted); fail on an image listed
    twice with any difference, naming the first difference and both lines."""
    frame.attrs["duplicate_rows"] = 0
    if not frame["image_path"].duplicated().any():  # the common case: one hash of one column
        return frame
    exact = frame.duplicated(keep="first")
    if exact.any():
        log.warning(
            "%s: %d duplicate row(s) (identical to an earlier row) ignored, e.g. line(s) %s",
            path,
            int(exact.sum()),
            list(frame.index[exact.to_numpy()][:EXAMPLES]),
        )
        frame = frame[~exact.to_numpy()]
    repeated = frame["image_path"].duplicated(keep=False)
    if repeated.any():
        names = frame.loc[repeated.to_numpy(), "image_path"]
        rows = frame[frame["image_path"] == names.iloc[0]]
        (line_a, a), (line_b, b) = list(rows.iterrows())[:2]
        order = [c for c in CONFLICTS if c in frame.columns] + list(frame.columns)
        column = next(c for c in order if not _same(a[c], b[c]))
        why = CONFLICTS.get(column, "its metadata would be ambiguous")
        raise DatasetFormatError(
            f"{path}: image {names.iloc[0]} is listed with {column} {_shown(a[column])} on line "
            f"{line_a} and {_shown(b[column])} on line {line_b} ({why}); {names.nunique()} "
            "image(s) listed more than once with differences. Each image must be listed once: "
            "fix or remove the extra rows"
        )
    frame.attrs["duplicate_rows"] = int(exact.sum())
    return frame


def _same(a: Any, b: Any) -> bool:
    return bool((pd.isna(a) and pd.isna(b)) or a == b)


def _shown(value: Any) -> str:
    """A cell as the user wrote it: 3 for a month read as 3.0, `empty` for a missing value."""
    if pd.isna(value):
        return "empty"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def stratified_observation_folds(observations: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) of each observation, stratified by class: within each class,
    observations are shuffled (seeded) and dealt round-robin starting at a random fold, so
    every class is spread as evenly as its count allows. `observations` has one row per
    observation with a `class_id` column."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(observations), dtype=np.int64)
    for _, rows in observations.groupby("class_id", sort=True).indices.items():
        order = rng.permutation(rows)
        folds[order] = (np.arange(len(order)) + rng.integers(n_folds)) % n_folds
    return folds


def observation_table(images: pd.DataFrame) -> pd.DataFrame:
    """One row per observation (its first image's class), for splitting."""
    return images.groupby("observationID", sort=True)["class_id"].first().reset_index()


def split_df21(df21: pd.DataFrame, n_folds: int = 3, seed: int = 0) -> pd.Series:
    """Split name per DF21 image: fold 0 is the held-out `test` third, folds 1..n-1 are `fold1`,
    `fold2`, ... (validation of one fold model, extra training data of the others)."""
    obs = observation_table(df21)
    obs["fold"] = stratified_observation_folds(obs, n_folds, seed)
    names = np.array(["test"] + [f"fold{k}" for k in range(1, n_folds)])
    fold_of = dict(zip(obs["observationID"], names[obs["fold"]]))
    return df21["observationID"].map(fold_of)


def aggregate_by_observation(
    observation_ids: Sequence[int], probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-image probabilities (or logits) per observation: (ids sorted, (O, C))."""
    ids = np.asarray(observation_ids)
    unique, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(unique), probs.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=len(unique))[:, None]
    return unique, (sums / counts).astype(np.float32)
