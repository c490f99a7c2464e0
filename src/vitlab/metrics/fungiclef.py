"""FungiCLEF 2024 official scores, per observation, as the organisers' evaluation script has them.

Labels are species class ids; `-1` means "unknown species" (absent from the training set) and is
an ordinary label for accuracy and F1. Poisonousness comes from a species list
(`class_id,poisonous`): `-1` is never poisonous, even if a list says otherwise, and a class id
absent from the list counts as not poisonous (the organisers test membership of the poisonous
set, so a species they do not know is edible to them).

- Track 1, classification error: (#known predicted as another class + #unknown predicted as
  known + #known predicted as unknown) / N, i.e. 1 - accuracy with -1 as a class.
- Track 2, poisonousness confusion cost: (100·PSC + 1·ESC) / N. PSC counts poisonous truths
  predicted as any non-poisonous label (-1 included); ESC counts non-poisonous truths (-1
  included) predicted as a poisonous species. Poisonous predicted as another poisonous species
  costs nothing here.
- Track 3 = Track 1 + Track 2 (summed before rounding).
- Track 4 (2023): (#known predicted as another known + 10·#unknown predicted as known +
  0.1·#known predicted as unknown) / N.
- Macro F1: mean per-label F1 over truth ∪ prediction labels (sklearn's `average='macro'` with
  its default labels), ×100.
The pure functions return unrounded values (`macro_f1` in percent, as the organisers compute
it); `fungiclef_scores` rounds like the organisers (tracks to 4 decimals, macro F1 in percent to
2, both with `np.round`) and reports macro F1 as a fraction in [0, 1] like accuracy and
poisonous recall (the leaderboard's 57.70 is 0.577 here).

Files: the ground truth may have one row per observation or one row per *image* as the
organisers publish it (observationID repeated); like their `evaluate.py`, the first row of each
observation counts, and rows of one observation that disagree on the class are an error. A
submission must list each observation once.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from vitlab.atomic import atomic_write_text
from vitlab.errors import DatasetFormatError

UNKNOWN = -1
COLUMNS = ("observationID", "class_id")
POISON_COLUMNS = ("class_id", "poisonous")
PSC_COST = 100.0
ESC_COST = 1.0


# --------------------------------------------------------------------------------------- files


def _read_int_columns(path: Path, columns: tuple[str, ...]) -> list[tuple[int, tuple[int, ...]]]:
    """Rows of `columns` as ints, with their line numbers; extra columns are ignored.

    Extra columns are allowed so that a metadata CSV (one row per image, many columns) can be
    read directly; the error names file and line because these files are edited by hand.
    """
    if not path.is_file():
        raise DatasetFormatError(f"CSV file not found: {path}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DatasetFormatError(
                    f"{path}:1: header must contain columns {', '.join(columns)}; "
                    f"missing {', '.join(missing)} (got {header})"
                )
            index = [header.index(c) for c in columns]
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DatasetFormatError(
                        f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}"
                    )
                try:
                    values = tuple(int(row[i]) for i in index)
                except ValueError as err:
                    cells = {c: row[i] for c, i in zip(columns, index)}
                    raise DatasetFormatError(
                        f"{path}:{line_no}: values must be integers, got {cells}"
                    ) from err
                rows.append((line_no, values))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetFormatError(f"{path}: cannot read CSV: {err}") from err
    return rows


def read_fungiclef_csv(path: str | Path) -> dict[int, int]:
    """Read a submission CSV (`observationID,class_id`) into observationID -> class_id.

    An observation listed twice is an error, even with the same class: a submission has one
    row per observation, as the organisers require. (A ground truth, which comes one row per
    image, is read with `read_fungiclef_truth`.)
    """
    path = Path(path)
    out: dict[int, int] = {}
    for line_no, (obs, class_id) in _read_int_columns(path, COLUMNS):
        if obs in out:
            raise DatasetFormatError(f"{path}:{line_no}: observationID {obs} listed twice")
        out[obs] = class_id
    return out


def read_fungiclef_truth(path: str | Path) -> dict[int, int]:
    """Read a ground-truth CSV (`observationID,class_id`, extra columns allowed) into
    observationID -> class_id.

    The organisers' truth has one row per image, so an observation is usually listed several
    times; their `evaluate.py` keeps the first row of each observationID, and so does this.
    Rows of one observation with different classes are an error naming both lines (a first-row
    rule would pick a class by file order).
    """
    path = Path(path)
    out: dict[int, int] = {}
    first_line: dict[int, int] = {}
    for line_no, (obs, class_id) in _read_int_columns(path, COLUMNS):
        if obs not in out:
            out[obs], first_line[obs] = class_id, line_no
        elif out[obs] != class_id:
            raise DatasetFormatError(
                f"{path}:{line_no}: observationID {obs} listed twice with different classes: "
                f"class_id {class_id} here, {out[obs]} on line {first_line[obs]}"
            )
    return out


def read_poison_list(path: str | Path) -> set[int]:
    """Read a species list (`class_id,poisonous`, 0/1) into the set of poisonous class ids.

    Repeated rows that agree are accepted (a per-image metadata CSV has a `poisonous` column
    too); rows that disagree are an error, since the organisers' list never does. `-1` is
    dropped: an unknown species is never poisonous.
    """
    path = Path(path)
    status: dict[int, int] = {}
    for line_no, (class_id, flag) in _read_int_columns(path, POISON_COLUMNS):
        if flag not in (0, 1):
            raise DatasetFormatError(f"{path}:{line_no}: poisonous must be 0 or 1, got {flag}")
        if status.setdefault(class_id, flag) != flag:
            raise DatasetFormatError(
                f"{path}:{line_no}: class_id {class_id} listed as both poisonous and not"
            )
    return {c for c, flag in status.items() if flag == 1 and c != UNKNOWN}


def write_fungiclef_submission(predictions: Mapping[int, int], path: str | Path) -> Path:
    """Write `observationID,class_id` rows sorted by id, atomically (temp file + os.replace).

    Atomic so an interrupted run never leaves a truncated file that would score as valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(COLUMNS)] + [f"{int(o)},{int(predictions[o])}" for o in sorted(predictions)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------- scoring


def _poison_array(poisonous: Iterable[int]) -> np.ndarray:
    ids = np.unique(np.asarray(list(poisonous), dtype=np.int64).ravel())
    return ids[ids != UNKNOWN]


def _checked(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("no observations to score")
    return y_true, y_pred


def _weighted_error(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    cost_unknown_as_known: float,
    cost_known_as_unknown: float,
) -> float:
    """Error with separate costs for the two open-set mistakes; other mistakes cost 1.

    The sum is taken in the organisers' order (other, unknown-as-known, known-as-unknown) so
    the float result is the same bit for bit.
    """
    y_true, y_pred = _checked(y_true, y_pred)
    true_known, pred_known = y_true != UNKNOWN, y_pred != UNKNOWN
    other = int(np.sum(true_known & pred_known & (y_true != y_pred)))
    unknown_as_known = int(np.sum(~true_known & pred_known))
    known_as_unknown = int(np.sum(true_known & ~pred_known))
    total = (
        other + unknown_as_known * cost_unknown_as_known + known_as_unknown * cost_known_as_unknown
    )
    return total / y_true.size


def track1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Classification error, -1 a class like any other (= 1 - accuracy)."""
    return _weighted_error(y_true, y_pred, cost_unknown_as_known=1, cost_known_as_unknown=1)


def track2(y_true: np.ndarray, y_pred: np.ndarray, poisonous: Iterable[int]) -> float:
    """(100·PSC + ESC) / N: a poisonous mushroom eaten costs 100 times an edible one wasted."""
    y_true, y_pred = _checked(y_true, y_pred)
    poison = _poison_array(poisonous)
    true_poison, pred_poison = np.isin(y_true, poison), np.isin(y_pred, poison)
    psc = int(np.sum(true_poison & ~pred_poison))
    esc = int(np.sum(~true_poison & pred_poison))
    return (PSC_COST * psc + ESC_COST * esc) / y_true.size


def track3(y_true: np.ndarray, y_pred: np.ndarray, poisonous: Iterable[int]) -> float:
    """User-focused loss: Track 1 + Track 2."""
    return track1(y_true, y_pred) + track2(y_true, y_pred, poisonous)


def track4(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """2023 error with special costs: unknown predicted known ×10, known predicted unknown ×0.1."""
    return _weighted_error(y_true, y_pred, cost_unknown_as_known=10, cost_known_as_unknown=0.1)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of observations with the exact class (-1 included)."""
    y_true, y_pred = _checked(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-label F1 over truth ∪ prediction labels, ×100 (unrounded).

    Per label F1 = 2TP / (2TP + FP + FN), which is sklearn's value: no label of the union can
    have a zero denominator, so `zero_division` never applies. Labels predicted but absent from
    the truth (e.g. an unseen class) count, with F1 0, exactly as in the official script.
    """
    y_true, y_pred = _checked(y_true, y_pred)
    labels, inverse = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t_idx, p_idx = inverse[: y_true.size], inverse[y_true.size :]
    n = labels.size
    tp = np.bincount(t_idx[y_true == y_pred], minlength=n)
    support = np.bincount(t_idx, minlength=n) + np.bincount(p_idx, minlength=n)
    return float(np.mean(2 * tp / support) * 100)


def poisonous_recall(y_true: np.ndarray, y_pred: np.ndarray, poisonous: Iterable[int]) -> float:
    """Fraction of poisonous-truth observations predicted as *some* poisonous species.

    Choice: the poison counts as caught when it is flagged, whatever the species (the user is
    warned either way); this is 1 - PSC / #poisonous. NaN when the truth has no poisonous
    observation.
    """
    y_true, y_pred = _checked(y_true, y_pred)
    poison = _poison_array(poisonous)
    true_poison = np.isin(y_true, poison)
    if not true_poison.any():
        return math.nan
    return float(np.mean(np.isin(y_pred[true_poison], poison)))


def _aligned(
    truth: Mapping[int, int], submission: Mapping[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Truth and prediction arrays in observationID order; the submission must match exactly.

    The organisers reject a submission that misses observations or adds others, so a partial
    score would be a score nobody else can reproduce.
    """
    if not truth:
        raise DatasetFormatError("the ground truth has no observations")
    missing = sorted(set(truth) - set(submission))
    extra = sorted(set(submission) - set(truth))
    problems = []
    if missing:
        problems.append(f"misses {len(missing)} observation(s) of the truth, e.g. {missing[:5]}")
    if extra:
        problems.append(f"has {len(extra)} observation(s) not in the truth, e.g. {extra[:5]}")
    if problems:
        raise DatasetFormatError("submission " + "; and ".join(problems))
    ids = sorted(truth)
    y_true = np.fromiter((truth[i] for i in ids), dtype=np.int64, count=len(ids))
    y_pred = np.fromiter((submission[i] for i in ids), dtype=np.int64, count=len(ids))
    return y_true, y_pred


def fungiclef_scores(
    truth: Mapping[int, int], submission: Mapping[int, int], poisonous: Iterable[int]
) -> dict[str, float | None]:
    """All scores of a submission, rounded as on the leaderboard.

    Tracks to 4 decimals; macro F1 rounded in percent to 2 decimals as the organisers do, then
    given as a fraction (26.67 % -> 0.2667) so that it shares the unit of accuracy and
    poisonous recall, which are fractions, unrounded (poisonous recall is None when the truth
    has no poisonous observation, so the JSON stays strict).
    """
    y_true, y_pred = _aligned(truth, submission)
    poison = _poison_array(poisonous)
    t1, t2 = track1(y_true, y_pred), track2(y_true, y_pred, poison)
    recall = poisonous_recall(y_true, y_pred, poison)
    return {
        "track1": float(np.round(t1, 4)),
        "track2": float(np.round(t2, 4)),
        "track3": float(np.round(t1 + t2, 4)),
        "track4": float(np.round(track4(y_true, y_pred), 4)),
        "macro_f1": round(float(np.round(macro_f1(y_true, y_pred), 2)) / 100, 4),
        "accuracy": accuracy(y_true, y_pred),
        "poisonous_recall": None if math.isnan(recall) else recall,
    }
