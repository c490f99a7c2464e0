"""FungiCLEF inference: fold ensembles and the open-set (unknown species) rule."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.special import softmax

from vitlab.data.fungiclef import UNKNOWN
from vitlab.metrics.fungiclef import track1, track2, track3, track4

AVERAGES = ("probs", "logits")
# the official score an `open_set_threshold=tune` minimises (`ensemble.tune_track`); Track 3 =
# Track 1 + Track 2 carries both the classification error and the poison cost
TUNE_TRACKS = (1, 2, 3, 4)
DEFAULT_TUNE_TRACK = 3


def ensemble_probabilities(
    logits_per_model: Sequence[np.ndarray], average: str = "probs"
) -> np.ndarray:
    """Average several models' outputs for the same rows: the mean of their softmax
    probabilities (the team's code) or the softmax of their mean logits (the paper's text)."""
    if average not in AVERAGES:
        raise ValueError(f"ensemble.average={average!r} is not one of {list(AVERAGES)}")
    if not logits_per_model:
        raise ValueError("ensemble of no model")
    if average == "logits":
        return softmax(np.mean(logits_per_model, axis=0), axis=1)
    return np.mean([softmax(z, axis=1) for z in logits_per_model], axis=0)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def predict_with_open_set(
    probs: np.ndarray, class_ids: Sequence[int], threshold: float | None
) -> np.ndarray:
    """Argmax class id per row; -1 (unknown) where the entropy exceeds `threshold` (the 2023
    winner's rule). A learnt unknown class in `class_ids` is predicted by the argmax as usual."""
    ids = np.asarray(class_ids)
    pred = ids[probs.argmax(axis=1)]
    if threshold is not None:
        pred = np.where(entropy(probs) > threshold, UNKNOWN, pred)
    return pred


def track_objective(track: int, poisonous: Iterable[int] = ()) -> Callable:
    """`f(y_true, y_pred) -> float`, the unrounded official Track `track` (lower is better)."""
    if track not in TUNE_TRACKS:
        raise ValueError(f"ensemble.tune_track={track!r} is not one of {list(TUNE_TRACKS)}")
    poison = sorted(set(int(c) for c in poisonous))
    return {
        1: track1,
        2: lambda t, p: track2(t, p, poison),
        3: lambda t, p: track3(t, p, poison),
        4: track4,
    }[track]


def tune_entropy_threshold(
    probs: np.ndarray,
    class_ids: Sequence[int],
    truth: np.ndarray,
    candidates: int = 50,
    track: int = DEFAULT_TUNE_TRACK,
    poisonous: Iterable[int] = (),
) -> tuple[float | None, float]:
    """The threshold (None = rule off) minimising the official Track `track` on labelled rows,
    e.g. the out-of-fold validation predictions of the fold models; returns it with its score.

    Track 1 alone ignores what the rule costs in Track 2: a poisonous species turned into
    "unknown" is an eaten poisonous mushroom (100 per observation), so the default is Track 3
    (Track 1 + Track 2) with the poisonous class ids in `poisonous`. Ties keep the rule off,
    then the lowest threshold."""
    score = track_objective(track, poisonous)
    truth = np.asarray(truth)
    best: tuple[float | None, float] = (
        None,
        float(score(truth, predict_with_open_set(probs, class_ids, None))),
    )
    values = entropy(probs)
    for t in np.unique(np.quantile(values, np.linspace(0.5, 1.0, candidates))):
        value = float(score(truth, predict_with_open_set(probs, class_ids, float(t))))
        if value < best[1]:
            best = (float(t), value)
    return best
