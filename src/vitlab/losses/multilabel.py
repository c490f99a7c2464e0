"""Multi-label losses: one sigmoid per species, the target a set of species (a multi-hot row).

PlantCLEF's training images show one plant (a one-hot row); its collages show several. The
losses below take either class indices (single-label batches, turned into one-hot rows) or
multi-hot float rows, and sum over classes, mean over the batch.

ASL (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021), per class
with p = sigmoid(logit) and the shifted probability p_m = max(p - m, 0):
    L+ = (1 - p)^γ+ · log(p)            L- = p_m^γ- · log(1 - p_m)
    L  = -y · L+ - (1 - y) · L-
γ- > γ+ down-weights the many easy negatives (a plot holds a few of thousands of species);
the margin m discards negatives whose probability is already below m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOG_CLAMP = 1e-8  # log(0) guard of the ASL terms, as in the paper's implementation


def multi_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (batch,) -> one-hot float rows; multi-hot rows (batch, classes) as float."""
    if target.dim() == 1:
        return F.one_hot(target.long(), num_classes).float()
    if target.shape[-1] != num_classes:
        raise ValueError(f"multi-hot targets have {target.shape[-1]} columns for {num_classes}")
    return target.float()


def asymmetric_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    margin: float = 0.05,
) -> torch.Tensor:
    """Mean over the batch of the per-row sum of the ASL terms (module docstring)."""
    y = multi_hot(target, logits.shape[-1])
    p = torch.sigmoid(logits.float())
    p_m = (p - margin).clamp(min=0) if margin > 0 else p
    positive = y * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=LOG_CLAMP))
    negative = (1 - y) * p_m.pow(gamma_neg) * torch.log((1 - p_m).clamp(min=LOG_CLAMP))
    return -(positive + negative).sum(-1).mean()


def focal_bce(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) per class, summed over classes, mean over the batch:
    -α_t (1 - p_t)^γ log p_t, with α weighting positives (1 - α negatives) when set."""
    y = multi_hot(target, logits.shape[-1])
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * y + (1 - p) * (1 - y)
    loss = bce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    return loss.sum(-1).mean()


class MultiLabelLoss(nn.Module):
    """Marks a loss as multi-label: the head's outputs are read through a sigmoid per class
    (training targets multi-hot, predictions probabilities that need not sum to 1)."""

    multilabel = True


class BCEWithLogits(MultiLabelLoss):
    """Binary cross-entropy per class, summed over classes, mean over the batch."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = multi_hot(target, logits.shape[-1])
        bce = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
        return bce.sum(-1).mean()


class AsymmetricLoss(MultiLabelLoss):
    """ASL (module docstring); `gamma_pos`, `gamma_neg`, `margin` are the paper's γ+, γ-, m."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, margin: float = 0.05):
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"gamma_pos and gamma_neg must be >= 0: {gamma_pos}, {gamma_neg}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1): {margin}")
        self.gamma_pos, self.gamma_neg, self.margin = gamma_pos, gamma_neg, margin

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return asymmetric_loss(logits, target, self.gamma_pos, self.gamma_neg, self.margin)


class FocalBCE(MultiLabelLoss):
    """Sigmoid focal loss per class (`focal_bce`)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0: {gamma}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or null: {alpha}")
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_bce(logits, target, self.gamma, self.alpha)


def is_multilabel(loss: nn.Module) -> bool:
    return bool(getattr(loss, "multilabel", False))
