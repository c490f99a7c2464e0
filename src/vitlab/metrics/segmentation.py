"""Semantic-segmentation scores in the mmseg convention, streamed image by image.

- One [C, C] int64 confusion matrix per dataset: rows are truth classes, columns predictions.
  Pixels whose truth is the ignore index (255 by default) are left out.
- IoU of class c = I/U with I = matrix[c, c] and U = row sum + column sum - I, both summed over
  the WHOLE dataset (not a mean of per-image IoUs). A class with U = 0 (neither in the truth nor
  predicted anywhere) has IoU nan and is skipped by the mIoU (nan-mean); a class that is
  predicted but never in the truth has IoU 0 and counts.
- Pixel accuracy = trace / total counted pixels.
- `reduce_zero_label` (ADE20K): applied to the TRUTH label map only, as mmseg does — truth 0
  becomes the ignore index, the ignore index stays ignored, every other label is shifted down
  by one. Predictions are expected to be in the reduced class space [0, C) already.
  (mmseg writes 255 for the zeros whatever the ignore index; here they become the ignore index,
  which is the same thing for the default 255.)

Predictions must be integer class indices in [0, C) at every pixel (ignored pixels included):
anything else is a ValueError naming the value. Truth labels must be in [0, C) or the ignore
index. Numpy arrays and torch tensors (any device; counted with `torch.bincount` there) are
accepted. All scores are fractions in [0, 1].
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ConfusionMatrixAccumulator",
    "confusion_matrix",
    "iou_from_confusion",
    "miou_from_confusion",
    "pixel_accuracy_from_confusion",
]


def _torch_module(*arrays: Any) -> Any:
    """The torch module if any argument is a tensor (without importing torch otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(a, torch.Tensor) for a in arrays):
        return torch
    return None


def _few(values: Any, torch: Any) -> str:
    """'[a, b, c]' (up to 5 distinct values, then '...') for error messages."""
    unique = (torch.unique(values) if torch is not None else np.unique(values)).tolist()
    return "[" + ", ".join(str(int(v)) for v in unique[:5]) + (", ...]" if len(unique) > 5 else "]")


def confusion_matrix(
    pred: Any,
    truth: Any,
    num_classes: int,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
) -> np.ndarray:
    """[C, C] int64 counts of one image (or any batch of pixels): `matrix[t, p]` is the number
    of counted pixels with truth t predicted as p. See the module docstring for the rules."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    torch = _torch_module(pred, truth)
    if torch is not None:
        device = pred.device if isinstance(pred, torch.Tensor) else truth.device
        pred, truth = (torch.as_tensor(x, device=device) for x in (pred, truth))
        for name, x in (("prediction", pred), ("truth", truth)):
            if x.dtype.is_floating_point or x.dtype.is_complex:
                raise ValueError(f"{name} must hold integer class indices, got {x.dtype}")
    else:
        pred, truth = np.asarray(pred), np.asarray(truth)
        for name, x in (("prediction", pred), ("truth", truth)):
            if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
                raise ValueError(f"{name} must hold integer class indices, got {x.dtype}")
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != truth shape {tuple(truth.shape)}"
        )
    if torch is not None:
        p, t = pred.reshape(-1).to(torch.int64), truth.reshape(-1).to(torch.int64)
    else:
        p, t = pred.reshape(-1).astype(np.int64), truth.reshape(-1).astype(np.int64)

    bad = (p < 0) | (p >= num_classes)
    if bad.any():
        first = int(p[bad][0])
        raise ValueError(
            f"predicted class {first} out of range [0, {num_classes}) "
            f"(out-of-range values: {_few(p[bad], torch)})"
        )
    if reduce_zero_label:
        zero, ignored = t == 0, t == ignore_index
        t = t - 1
        t[zero | ignored] = ignore_index
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    bad = (t < 0) | (t >= num_classes)
    if bad.any():
        first = int(t[bad][0])
        raise ValueError(
            f"truth label {first} is neither a class in [0, {num_classes}) nor the ignore "
            f"index {ignore_index}"
            + (" (after reduce_zero_label)" if reduce_zero_label else "")
            + f" (offending values: {_few(t[bad], torch)})"
        )
    index = t * num_classes + p
    size = num_classes * num_classes
    if torch is not None:
        counts = torch.bincount(index, minlength=size).cpu().numpy()
    else:
        counts = np.bincount(index, minlength=size)
    return counts.astype(np.int64).reshape(num_classes, num_classes)


def _check_square(matrix: Any) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {matrix.shape}")
    return matrix


def iou_from_confusion(matrix: Any) -> np.ndarray:
    """Per-class IoU = I/U (float64), nan where the union is 0."""
    matrix = _check_square(matrix).astype(np.float64)
    intersection = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def miou_from_confusion(matrix: Any) -> float:
    """Mean IoU over the classes whose IoU is defined (nan if none is)."""
    iou = iou_from_confusion(matrix)
    defined = iou[~np.isnan(iou)]
    return float(defined.mean()) if defined.size else math.nan


def pixel_accuracy_from_confusion(matrix: Any) -> float:
    """Correct / counted pixels (nan if no pixel was counted)."""
    matrix = _check_square(matrix)
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else math.nan


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ConfusionMatrixAccumulator:
    """Dataset-level confusion matrix, fed one image (or batch of pixels) at a time.

    `update` adds `confusion_matrix(pred, truth, ...)`; `merge` adds another accumulator's
    counts (e.g. from another worker). Scores are computed from the summed counts.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.n_updates = 0

    def update(self, pred: Any, truth: Any) -> ConfusionMatrixAccumulator:
        self.matrix += confusion_matrix(
            pred, truth, self.num_classes, self.ignore_index, self.reduce_zero_label
        )
        self.n_updates += 1
        return self

    def merge(self, other: ConfusionMatrixAccumulator) -> ConfusionMatrixAccumulator:
        mine = (self.num_classes, self.ignore_index, self.reduce_zero_label)
        theirs = (other.num_classes, other.ignore_index, other.reduce_zero_label)
        if mine != theirs:
            raise ValueError(
                "cannot merge accumulators with different (num_classes, ignore_index, "
                f"reduce_zero_label): {mine} vs {theirs}"
            )
        self.matrix += other.matrix
        self.n_updates += other.n_updates
        return self

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.matrix)

    def miou(self) -> float:
        return miou_from_confusion(self.matrix)

    def accuracy(self) -> float:
        """Pixel accuracy."""
        return pixel_accuracy_from_confusion(self.matrix)

    def class_accuracy(self) -> np.ndarray:
        """Per-class accuracy (recall, mmseg's "Acc"): I / truth pixels, nan if none."""
        truth_pixels = self.matrix.sum(1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(truth_pixels > 0, np.diag(self.matrix) / truth_pixels, np.nan)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready scores, nan written as None:
        `{"miou", "iou": [per class], "pixel_accuracy",
          "per_class": {name: {"iou", "accuracy", "pixels"}}}` (pixels = truth pixels)."""
        if class_names is None:
            class_names = [str(c) for c in range(self.num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        if len(set(class_names)) != len(class_names):
            raise ValueError("class names must be unique")
        iou = [_none_if_nan(v) for v in self.iou()]
        acc = [_none_if_nan(v) for v in self.class_accuracy()]
        pixels = self.matrix.sum(1)
        return {
            "miou": _none_if_nan(self.miou()),
            "iou": iou,
            "pixel_accuracy": _none_if_nan(self.accuracy()),
            "per_class": {
                name: {"iou": iou[c], "accuracy": acc[c], "pixels": int(pixels[c])}
                for c, name in enumerate(class_names)
            },
        }
