"""Which folders the synthetic generators own, so they delete or overwrite nothing else.

A generator claims its output folder before writing anything: the folder must be new, empty,
or carry `OWNER_MARKER` (written first, so a killed generator leaves a folder that is still
recognisably ours). `COMPLETE_MARKER` is written last and records the spec it was made from.
A non-empty folder without the owner marker is a user's folder: it is refused, never touched.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from vitlab.data.shards import atomic_write_text
from vitlab.errors import ConfigError

OWNER_MARKER = ".vitlab-synthetic"
COMPLETE_MARKER = ".complete"
REAL_DATASETS = "dataset=plantclef|fungiclef|coco_captions"


class ForeignFolderError(ConfigError):
    """A generator was pointed at a folder it did not create; the folder is left untouched."""


def is_generated(out_dir: str | Path) -> bool:
    """True when `out_dir` was created by a vitlab generator (complete or not). Folders from
    versions before the owner marker are recognised by their completion marker's `seed=N`."""
    out = Path(out_dir)
    if (out / OWNER_MARKER).is_file():
        return True
    marker = out / COMPLETE_MARKER
    try:
        return marker.is_file() and re.fullmatch(r"seed=\d+\n?", marker.read_text()) is not None
    except (OSError, UnicodeDecodeError):
        return False


def is_complete(out_dir: str | Path, spec: Any = None) -> bool:
    """True when a generator finished writing `out_dir` (with `spec`, when given and recorded)."""
    marker = Path(out_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    if spec is None:
        return True
    recorded = _recorded_spec(marker)
    return recorded is None or recorded == _spec_dict(spec)


def claim_output_dir(out_dir: str | Path) -> Path:
    """Make `out_dir` an empty folder owned by the generator and return it.

    A missing or empty folder is created/used; a folder carrying the owner marker is emptied
    (its content is ours); anything else raises ForeignFolderError without touching it.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ForeignFolderError(f"{out} is a file, not a folder: refusing to generate data there")
    if out.is_dir() and any(out.iterdir()):
        if not is_generated(out):
            raise ForeignFolderError(
                f"{out} is not empty and was not created by vitlab's synthetic generator (no "
                f"{OWNER_MARKER} marker): it is left untouched. Real data needs {REAL_DATASETS} "
                "with dataset.root=<your folder>; synthetic data needs a new or empty folder."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OWNER_MARKER).write_text("created by vitlab's synthetic data generator\n")
    return out


def mark_complete(out_dir: str | Path, spec: Any) -> None:
    atomic_write_text(Path(out_dir) / COMPLETE_MARKER, json.dumps(_spec_dict(spec)) + "\n")


def _spec_dict(spec: Any) -> dict[str, Any]:
    raw = asdict(spec) if is_dataclass(spec) else dict(spec)
    return json.loads(json.dumps(raw))  # tuples -> lists, as read back from the marker


def _recorded_spec(marker: Path) -> dict[str, Any] | None:
    try:
        recorded = json.loads(marker.read_text())
    except (ValueError, OSError):
        return None  # an older marker (`seed=N`): the spec was not recorded
    return recorded if isinstance(recorded, dict) else None
