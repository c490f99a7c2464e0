"""Entropy regularisers of the thesis (4.7), all minimised and added to the contrastive losses:
GE (group entropy), LE (label entropy) and SE (segment-affinity entropy, after TIER).

Natural log; 0·log 0 = 0 in value and in gradient (no NaN for exact zeros). Every regulariser is
a scalar mean over the batch, each image weighing the same.

Shapes: `patch_group_attn` [B, P, G] holds per-patch distributions over the final-stage groups
(the soft Attn = A1 @ A2); `segment_label_logits` [B, G, K] is A_ST, the affinities of each
image's G segment embeddings with its own K label embeddings. The temperature of A_ST shapes the
entropies, so pass it already scaled as wished (e.g. logit_scale · normalised dot products).
`label_mask` [B, K] bool, True = valid label; padding labels are excluded as if absent, and an
image without any valid label is left out of LE and SE (graph-attached 0 if no image has one).
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """-sum p·log p along `dim` for each distribution; zeros contribute 0 (log is taken of p
    clamped to the dtype's smallest normal, so the gradient stays finite too)."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim)


def group_entropy(patch_group_attn: Tensor) -> Tensor:
    """GE: entropy of each patch's distribution over the groups, mean over patches and batch.
    Uniform attention gives log G, a hard assignment 0."""
    if patch_group_attn.ndim != 3:
        raise ValueError(f"patch_group_attn must be [B, P, G], got {tuple(patch_group_attn.shape)}")
    return entropy(patch_group_attn, dim=-1).mean()


def _check(segment_label_logits: Tensor, label_mask: Tensor | None) -> Tensor:
    if segment_label_logits.ndim != 3:
        raise ValueError(
            f"segment_label_logits must be [B, G, K], got {tuple(segment_label_logits.shape)}"
        )
    batch, _, k = segment_label_logits.shape
    if label_mask is None:
        return torch.ones(batch, k, dtype=torch.bool, device=segment_label_logits.device)
    if label_mask.shape != (batch, k):
        raise ValueError(f"label_mask must be [{batch}, {k}], got {tuple(label_mask.shape)}")
    return label_mask.to(device=segment_label_logits.device, dtype=torch.bool)


def _label_softmax(segment_label_logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over labels with the padding labels at probability 0 (rows need >= 1 valid)."""
    return segment_label_logits.masked_fill(~mask[:, None, :], -torch.inf).softmax(dim=-1)


def label_entropy(
    patch_group_attn: Tensor, segment_label_logits: Tensor, label_mask: Tensor | None = None
) -> Tensor:
    """LE: T_aff = Attn · softmax_labels(A_ST) ([B, P, K], each patch a distribution over the
    image's valid labels); entropy per patch over labels, mean over patches and batch."""
    mask = _check(segment_label_logits, label_mask)
    if patch_group_attn.ndim != 3 or patch_group_attn.shape[::2] != segment_label_logits.shape[:2]:
        raise ValueError(
            f"patch_group_attn [B, P, G] {tuple(patch_group_attn.shape)} does not match "
            f"segment_label_logits [B, G, K] {tuple(segment_label_logits.shape)}"
        )
    keep = mask.any(dim=-1)
    if not bool(keep.any()):
        return (patch_group_attn.sum() + segment_label_logits.sum()) * 0.0
    attn, logits, mask = patch_group_attn[keep], segment_label_logits[keep], mask[keep]
    t_aff = attn @ _label_softmax(logits, mask).to(attn.dtype)
    return entropy(t_aff, dim=-1).mean()


def segment_entropy(
    segment_label_logits: Tensor,
    label_mask: Tensor | None = None,
    group_weight: float = 0.2,
    label_weight: float = 0.1,
) -> Tensor:
    """SE: group_weight · mean over groups of the entropy of the row-softmax (each group over
    the valid labels) + label_weight · mean over valid labels of the entropy of the
    column-softmax (each label over the groups). Both means are per image, then over the batch.
    """
    mask = _check(segment_label_logits, label_mask)
    keep = mask.any(dim=-1)
    if not bool(keep.any()):
        return segment_label_logits.sum() * 0.0
    logits, mask = segment_label_logits[keep], mask[keep]
    per_group = entropy(_label_softmax(logits, mask), dim=-1)  # [B, G]
    # padding columns are zeroed (finite whatever they held) and then left out of the mean
    per_label = entropy(logits.masked_fill(~mask[:, None, :], 0.0).softmax(dim=1), dim=1)
    per_label = torch.where(mask, per_label, torch.zeros_like(per_label))  # [B, K]
    mean_labels = (per_label.sum(-1) / mask.sum(-1)).mean()
    return group_weight * per_group.mean() + label_weight * mean_labels
