"""Classification losses for long-tailed species data (FungiCLEF): plain, class-weighted and
focal cross-entropy, seesaw, and seesaw + poisonousness BCE. (The weighted sum over auxiliary
heads lives in `FungiClassifier`, which logs each term.)

Each loss is a pure function plus a thin `nn.Module` whose constructor takes plain values
(ints, floats, lists), so Hydra can build it from YAML. Modules take `(logits, target)` with
`target` int64 class indices and return the mean loss over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_tensor(values: Sequence[float] | np.ndarray | Tensor, dtype: torch.dtype) -> Tensor:
    """Hydra hands lists over as `ListConfig`, which torch cannot read directly."""
    if isinstance(values, Tensor):
        return values.detach().to(dtype=dtype).clone()
    array = values if isinstance(values, np.ndarray) else np.asarray(list(values))
    return torch.as_tensor(array).to(dtype)


# --- cross-entropy -------------------------------------------------------------------------------


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Softmax cross-entropy; with `weight` the mean is sum(w_y·l) / sum(w_y), as in torch."""
    return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)


def inverse_frequency_weights(
    class_counts: Sequence[int] | np.ndarray | Tensor, normalise: bool = True
) -> Tensor:
    """Per-class weights w_c ∝ 1/N_c, so every class weighs the same in total; classes with no
    training sample get 0 (they cannot occur as targets, and 1/0 would poison the sum).

    With `normalise`, w_c = N / (K·N_c) with N the number of samples and K the number of classes
    present, i.e. sum_c w_c·N_c / N == 1: the average weight of a training sample is 1, so the
    loss keeps the scale of unweighted CE (sklearn's "balanced" weights). Note that the weighted
    *mean* of `WeightedCrossEntropy` is invariant to a global scale; the normalisation matters
    when the weights are summed or reused elsewhere (e.g. as focal `alpha`)."""
    counts = _as_tensor(class_counts, torch.float64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("class_counts must be a 1-d sequence of non-negative counts, not all 0")
    present = counts > 0
    weights = torch.where(present, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    if normalise:
        weights = weights * counts.sum() / present.sum()
    return weights.to(torch.get_default_dtype())


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with inverse-frequency class weights from the training-set class counts."""

    def __init__(self, class_counts: Sequence[int], label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", inverse_frequency_weights(class_counts))
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target, self.weight, self.label_smoothing)


# --- focal ---------------------------------------------------------------------------------------


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float | Tensor | None = None
) -> Tensor:
    """Softmax focal loss mean(-α_y·(1-p_y)^γ·log p_y): down-weights samples already classified
    confidently. `alpha` is a scalar or a per-class tensor (indexed by target); the mean is a
    plain mean over samples (Lin et al.), unlike torch's weighted CE mean. γ=0, α=None is CE."""
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    loss = -log_p
    if gamma != 0:  # skip pow: d/dx x^0 at x=0 would be 0·inf
        loss = loss * (-torch.expm1(log_p)).clamp(min=0.0).pow(gamma)  # 1-p, exact near p=1
    if alpha is not None:
        loss = loss * (alpha.to(loss.dtype)[target] if isinstance(alpha, Tensor) else alpha)
    return loss.mean()


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None):
        super().__init__()
        self.gamma = float(gamma)
        self.alpha: float | Tensor | None
        if alpha is None or isinstance(alpha, int | float):
            self.alpha = None if alpha is None else float(alpha)
        else:
            self.register_buffer("alpha", _as_tensor(alpha, torch.get_default_dtype()))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, self.gamma, self.alpha)


# --- seesaw --------------------------------------------------------------------------------------


def _seesaw_log_factors(
    logits: Tensor, target: Tensor, class_counts: Tensor, p: float, q: float, eps: float
) -> tuple[Tensor, Tensor]:
    """(B, C) log M and log C, computed in log space so that tiny σ_j or huge counts neither
    underflow nor overflow. Both are 0 in the target column and constants for autograd."""
    log_n = class_counts.detach().double().clamp(min=1).log().to(logits.dtype)
    log_mitigation = p * (log_n[None, :] - log_n[target][:, None]).clamp(max=0.0)
    log_sigma = torch.log_softmax(logits.detach(), dim=-1)
    log_sigma_i = log_sigma.gather(-1, target[:, None]).clamp(min=math.log(eps))
    log_compensation = q * (log_sigma - log_sigma_i).clamp(min=0.0)
    own = F.one_hot(target, logits.shape[-1]).bool()
    return log_mitigation.masked_fill(own, 0.0), log_compensation.masked_fill(own, 0.0)


def seesaw_factors(
    logits: Tensor,
    target: Tensor,
    class_counts: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> tuple[Tensor, Tensor]:
    """The (B, C) mitigation M and compensation C factors of `seesaw_loss` (1 where j == y)."""
    log_m, log_c = _seesaw_log_factors(logits, target, class_counts, p, q, eps)
    return log_m.exp(), log_c.exp()


def seesaw_loss(
    logits: Tensor,
    target: Tensor,
    class_counts: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tensor:
    """Seesaw loss (Wang et al. 2021): CE on z_j + log(M_ij·C_ij) for j != i = target.

    Mitigation M_ij = (N_j/N_i)^p when N_j < N_i: a frequent target class pushes the logits of
    rarer classes down less, so tail classes are not drowned in negative gradients. Counts are
    clamped to >= 1, so a class never seen is treated as seen once: finite, maximally mitigated
    (never -inf, which would cut its gradient entirely), and a target whose own count is 0
    mitigates nothing. Compensation C_ij = (σ_j/max(σ_i, eps))^q when > 1 restores the penalty
    on classes the model wrongly scores above the target. σ is the softmax of the detached
    logits: the factors rescale the gradient and are not themselves optimised."""
    log_m, log_c = _seesaw_log_factors(logits, target, class_counts, p, q, eps)
    return F.cross_entropy(logits + log_m + log_c, target)


class SeesawLoss(nn.Module):
    """Seesaw loss with class counts either fixed or accumulated.

    `class_counts=None`: counts start at 0 and accumulate the labels of every training batch
    before its loss is computed (as in mmdet), so the batch's own classes count at least once.
    Only in training mode: `validation_step` calls the loss too, and validation labels must not
    leak into the prior. The counts are a persistent buffer, so checkpoints resume them.
    `class_counts` given: a fixed prior from the training set, never updated. Early batches of
    the accumulated variant see noisy counts; the fixed prior is exact from the first step."""

    def __init__(
        self,
        num_classes: int,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 1e-2,
        class_counts: Sequence[int] | None = None,
    ):
        super().__init__()
        if p < 0 or q < 0 or eps <= 0:
            raise ValueError(f"seesaw needs p >= 0, q >= 0, eps > 0; got p={p}, q={q}, eps={eps}")
        self.num_classes = int(num_classes)
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.accumulate = class_counts is None
        if class_counts is None:
            counts = torch.zeros(self.num_classes, dtype=torch.long)
        else:
            counts = _as_tensor(class_counts, torch.long)
            if counts.shape != (self.num_classes,) or (counts < 0).any():
                raise ValueError(
                    f"class_counts must be {self.num_classes} non-negative counts, "
                    f"got shape {tuple(counts.shape)}"
                )
        # int64: exact, and untouched by `.half()` / precision plugins casting float buffers.
        self.register_buffer("class_counts", counts)

    @torch.no_grad()
    def _update_counts(self, target: Tensor) -> None:
        seen = torch.bincount(target, minlength=self.num_classes)
        if seen.numel() != self.num_classes:
            raise ValueError(f"target class {seen.numel() - 1} >= num_classes={self.num_classes}")
        self.class_counts += seen

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.accumulate and self.training:
            self._update_counts(target)
        return seesaw_loss(logits, target, self.class_counts, self.p, self.q, self.eps)


# --- seesaw + poisonousness ----------------------------------------------------------------------


def poison_logit(logits: Tensor, poisonous: Tensor) -> Tensor:
    """Logit of P(poisonous) = sum of the softmax over the poisonous classes:
    log(P / (1-P)) = logsumexp(z[poisonous]) - logsumexp(z[rest]). Derived from the class
    logits, so no extra head output is needed. `poisonous` is a (C,) bool mask."""
    masked = logits.masked_fill(~poisonous, -torch.inf)
    rest = logits.masked_fill(poisonous, -torch.inf)
    return torch.logsumexp(masked, dim=-1) - torch.logsumexp(rest, dim=-1)


def poison_bce(logits: Tensor, target: Tensor, poisonous: Tensor) -> Tensor:
    """BCE between the derived poison logit and whether the target class is poisonous."""
    is_poisonous = poisonous[target].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(poison_logit(logits, poisonous), is_poisonous)


class SeesawPoisonLoss(SeesawLoss):
    """L = seesaw + α·BCE(poison logit, target is poisonous), the paper's best loss (α = 0.1).
    The BCE sees the raw logits, not seesaw's rebalanced ones: it scores the model's actual
    P(poisonous). Counts behave as in `SeesawLoss` (same buffer name, same checkpoints)."""

    def __init__(
        self,
        num_classes: int,
        poisonous_classes: Sequence[int],
        alpha: float = 0.1,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 1e-2,
        class_counts: Sequence[int] | None = None,
    ):
        super().__init__(num_classes, p=p, q=q, eps=eps, class_counts=class_counts)
        indices = _as_tensor(poisonous_classes, torch.long)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_classes):
            raise ValueError(f"poisonous_classes must lie in [0, {self.num_classes})")
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[indices] = True
        if not 0 < int(mask.sum()) < self.num_classes:
            raise ValueError("poisonous_classes must hold some but not all classes")
        self.alpha = float(alpha)
        self.register_buffer("poisonous", mask)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = super().forward(logits, target)
        if self.alpha == 0:
            return loss
        return loss + self.alpha * poison_bce(logits, target, self.poisonous)
