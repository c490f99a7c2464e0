"""Images a metadata file lists but the disk does not have: one rule for every dataset.

- The image folder itself must exist: a missing folder is an error naming it and its config key
  (e.g. `dataset.train_images_dir`).
- Per split (DF20 / DF21 / test, a PlantCLEF `learn_tag`, a COCO split), images listed but
  missing on disk are skipped, counted and reported, as long as they are at most
  `dataset.max_missing_fraction` of the split's listed images (default 0.05).
- A split with every image missing, or with more than that fraction missing, is an error naming
  the split, the folder, its config key and `dataset.max_missing_fraction`: training on what is
  left would give a run that looks fine and means nothing (a FungiCLEF run without DF20 has the
  label space `[-1]` and a perfect validation accuracy).

The callers find the missing names their own way (a recursive index, a listing, a stat per
path); this module holds the rule, so that it is the same everywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlab.errors import ConfigError, DatasetFormatError

log = logging.getLogger(__name__)

DEFAULT_MAX_MISSING_FRACTION = 0.05
FRACTION_KEY = "dataset.max_missing_fraction"
REPORT_LIST_LIMIT = 100  # names listed in a report; the counts are always complete


def check_max_missing_fraction(value: Any, key: str = FRACTION_KEY) -> float:
    """The configured fraction as a float in [0, 1]; ConfigError naming `key` otherwise."""
    if value is None:
        return DEFAULT_MAX_MISSING_FRACTION
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{key} must be a fraction in [0, 1], got {value!r}")
    if not 0 <= value <= 1:
        raise ConfigError(f"{key} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def require_image_folder(folder: str | Path, key: str) -> Path:
    """`folder` as a Path; DatasetFormatError naming it and its config key if it is not a
    folder."""
    path = Path(folder)
    if not path.is_dir():
        raise DatasetFormatError(f"image folder not found: {path} (config key {key})")
    return path


@dataclass(frozen=True)
class MissingImages:
    """What one split lists and what of it is not on disk."""

    split: str
    folder: str
    listed: int
    missing: int
    examples: tuple[str, ...]

    @property
    def fraction(self) -> float:
        return self.missing / self.listed if self.listed else 0.0

    def report(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "listed": self.listed,
            "missing": self.missing,
            "missing_fraction": round(self.fraction, 6),
            "missing_examples": list(self.examples),
        }


def check_missing_images(
    split: str,
    listed: int,
    missing: Sequence[str],
    folder: str | Path,
    folder_key: str,
    max_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
    source: str | Path | None = None,
    fraction_key: str = FRACTION_KEY,
) -> MissingImages:
    """Apply the rule to one split: `listed` images named by `source` (the metadata file),
    `missing` the names not found below `folder`. Returns the counts (a warning is logged when
    some are missing); raises DatasetFormatError when the split lists nothing, has no image on
    disk, or misses more than `max_fraction` of its images."""
    max_fraction = check_max_missing_fraction(max_fraction, fraction_key)
    where = f" listed in {source}" if source else ""
    if listed == 0:
        raise DatasetFormatError(f"{split}: no image{where}")
    result = MissingImages(
        split, str(folder), int(listed), len(missing), tuple(missing[:REPORT_LIST_LIMIT])
    )
    if not missing:
        return result
    examples = ", ".join(str(m) for m in missing[:3])
    if result.missing == result.listed:
        raise DatasetFormatError(
            f"{split}: none of the {listed} image(s){where} is in {folder} (config key "
            f"{folder_key}), e.g. {examples}; a missing split is an error"
        )
    if result.fraction > max_fraction:
        raise DatasetFormatError(
            f"{split}: {result.missing} of {listed} image(s){where} ({result.fraction:.1%}) are "
            f"missing from {folder} (config key {folder_key}), e.g. {examples}; at most "
            f"{fraction_key}={max_fraction:g} may be missing (raise it to go on without them)"
        )
    log.warning(
        "%s: %d of %d image(s)%s are missing from %s (%.2f%% <= %s=%g): skipped, e.g. %s",
        split,
        result.missing,
        listed,
        where,
        folder,
        100 * result.fraction,
        fraction_key,
        max_fraction,
        examples,
    )
    return result
