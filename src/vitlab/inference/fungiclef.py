"""FungiCLEF inference: fold ensembles and the open-set (unknown species) rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitlab.data.fungiclef import UNKNOWN

AVERAGES = ("probs", "logits")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


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
        return softmax(np.mean(logits_per_model, axis=0))
    return np.mean([softmax(z) for z in logits_per_model], axis=0)


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


def tune_entropy_threshold(
    probs: np.ndarray, class_ids: Sequence[int], truth: np.ndarray, candidates: int = 50
) -> tuple[float | None, float]:
    """The threshold (None = rule off) minimising the Track 1 error on labelled rows, e.g. the
    out-of-fold validation predictions of the fold models."""
    best: tuple[float | None, float] = (
        None,
        float(np.mean(predict_with_open_set(probs, class_ids, None) != truth)),
    )
    values = entropy(probs)
    for t in np.unique(np.quantile(values, np.linspace(0.5, 1.0, candidates))):
        error = float(np.mean(predict_with_open_set(probs, class_ids, float(t)) != truth))
        if error < best[1]:
            best = (float(t), error)
    return best
