"""Single-label classification metrics on integer label arrays.

Macro F1 follows the project's convention (reference/plantclef.md, reference/fungiclef.md):
sklearn's `f1_score(average='macro')`, the mean of the per-label F1 = 2TP / (2TP + FP + FN)
over the labels present in truth ∪ prediction. A label only in the truth or only in the
predictions scores 0; a label absent from both does not count (it is not averaged in as 0 or 1).

`macro_f1` scores two arrays; `MacroF1` is the same metric accumulated batch by batch in a
LightningModule, as torchmetrics state summed across DDP ranks (three bincounts of length C per
batch; torchmetrics' own `MulticlassF1Score` bincounts a C x C confusion matrix per batch, 61 M
bins at 7,806 classes).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    truth, pred = np.asarray(truth), np.asarray(pred)
    return float((truth == pred).mean()) if truth.size else 0.0


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class F1 over the union of labels in truth and prediction (sklearn's
    `f1_score(average='macro')`; no label of the union has a zero denominator). Labels are any
    integers, not necessarily 0..C-1; 0.0 for empty arrays."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth has {truth.size} labels but pred has {pred.size}")
    if truth.size == 0:
        return 0.0
    labels, inverse = np.unique(np.concatenate([truth, pred]), return_inverse=True)
    t_idx, p_idx = inverse[: truth.size], inverse[truth.size :]
    n = labels.size
    tp = np.bincount(t_idx[truth == pred], minlength=n)
    return macro_f1_from_counts(
        tp, np.bincount(t_idx, minlength=n), np.bincount(p_idx, minlength=n)
    )


def macro_f1_from_counts(tp, n_true, n_pred) -> float:
    """Macro F1 from per-class counts (true positives, truth support, predicted count): the
    mean of 2TP / (n_true + n_pred) over classes with n_true + n_pred > 0 (numpy or torch)."""
    tp, n_true, n_pred = (
        a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        for a in (tp, n_true, n_pred)
    )
    present = (n_true + n_pred) > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / (n_true[present] + n_pred[present])))


class MacroF1(Metric):
    """`macro_f1` accumulated batch by batch: per-class TP, truth and prediction counts over an
    epoch (three bincounts of length C per batch), summed across DDP ranks by torchmetrics on
    `compute()`. Log the object itself (`self.log("val/macro_f1", metric)`) and Lightning
    computes, syncs and resets it each epoch. Class indices must be in 0..num_classes-1.

    Its state is not saved in checkpoints (torchmetrics' default): state dicts are unchanged."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        for name in ("tp", "n_true", "n_pred"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def _bincount(self, labels: torch.Tensor, what: str) -> torch.Tensor:
        counts = torch.bincount(labels, minlength=self.num_classes)
        if counts.numel() > self.num_classes:  # (negative labels already fail in bincount)
            raise ValueError(
                f"{what} class {int(labels.max())} is out of range for {self.num_classes} classes"
            )
        return counts

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """`pred`: predicted class indices [N] (or scores [N, C]: argmax); `target`: [N]."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(-1)
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        if pred.shape != target.shape:
            raise ValueError(f"pred has {pred.numel()} labels but target has {target.numel()}")
        self.tp += self._bincount(target[pred == target], "true")
        self.n_true += self._bincount(target, "true")
        self.n_pred += self._bincount(pred, "predicted")

    def compute(self) -> torch.Tensor:
        f1 = macro_f1_from_counts(self.tp, self.n_true, self.n_pred)
        return torch.tensor(f1, dtype=torch.float32, device=self.tp.device)
