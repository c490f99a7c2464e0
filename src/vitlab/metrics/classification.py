"""Single-label classification metrics on integer label arrays."""

from __future__ import annotations

import numpy as np


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    truth, pred = np.asarray(truth), np.asarray(pred)
    return float((truth == pred).mean()) if truth.size else 0.0


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class F1 over the union of labels in truth and prediction (sklearn's
    `f1_score(average='macro')` with zero_division=0)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    labels = np.union1d(truth, pred)
    if labels.size == 0:
        return 0.0
    scores = []
    for label in labels:
        tp = np.sum((truth == label) & (pred == label))
        fp = np.sum((truth != label) & (pred == label))
        fn = np.sum((truth == label) & (pred != label))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))
