"""FungiCLEF (Danish Fungi DF20/DF21, FungiCLEF 2023 "PRODUCTION" files) formats and splits.

Layout (file names are the dataset config's defaults):
    FungiCLEF2023_train_metadata_PRODUCTION.csv        DF20, one row per image
    FungiCLEF2023_val_metadata_PRODUCTION.csv          DF21, class_id -1 = unknown species
    FungiCLEF2023_public_test_metadata_PRODUCTION.csv  test images, no labels (optional)
    poison_status_list.csv                             class_id,poisonous
    DF20_300/<image_path>, DF21_300/<image_path>       images (300 px max side version)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vitlab.data.text_files import not_utf8_error
from vitlab.errors import DatasetFormatError

UNKNOWN = -1
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


def read_metadata(path: str | Path, labelled: bool = True) -> pd.DataFrame:
    """One row per image; fail naming any missing required column or a bad class_id."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"FungiCLEF metadata CSV not found: {path}")
    try:
        frame = pd.read_csv(path, low_memory=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8_error(path) from err
    required = REQUIRED_COLUMNS if labelled else REQUIRED_COLUMNS[:2]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetFormatError(f"{path}: missing required column(s) {missing}")
    if labelled:
        ids = pd.to_numeric(frame["class_id"], errors="coerce")
        if ids.isna().any():
            row = int(np.flatnonzero(ids.isna().to_numpy())[0]) + 2
            raise DatasetFormatError(f"{path}:{row}: class_id must be an integer")
        frame["class_id"] = ids.astype("int64")
    frame["observationID"] = frame["observationID"].astype("int64")
    return frame


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
