"""Contrastive losses of GroupViT and of the thesis: CLIP image-text, GroupViT multi-label, the
thesis's non-noisy multi-label loss (5.10), and a FIFO memory bank of text negatives (6.1.2).

Pure tensor functions. Embeddings are L2-normalised by the caller, and `logit_scale` is the
already exponentiated (and clamped) temperature, a scalar tensor or float: logits are
`logit_scale · a @ b.T`. Every loss is a scalar mean.

Distributed training: gather the embeddings (and label strings) of all ranks with
`gather_for_contrast` / `gather_objects` and compute the loss over the whole global batch, so
every rank computes the same global loss. The gather keeps gradients: its backward sums the
gradients of all ranks' (identical) losses into each rank's local rows, i.e. world × dL/dx, and
DDP's gradient averaging divides by world again, so parameters receive exactly dL/dθ of the
global loss.

Scope (`CONTRAST_SCOPES`): "global" is the above. "local" skips the gather: each rank computes
the loss on its own mini-batch only (positives AND negatives from that mini-batch), and DDP's
gradient averaging yields the gradient of the mean of the per-rank losses. The thesis computes
its non-noisy multi-label loss this way (its code contrasts each GPU's mini-batch, no
all-gather, while the image-caption loss is gathered); the losses below are scope-agnostic,
the caller decides whether to gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

T = TypeVar("T")

# where a contrastive loss finds its pairs: the global multi-GPU batch or each rank's mini-batch
CONTRAST_SCOPES: tuple[str, ...] = ("global", "local")


# --- distributed gathering -----------------------------------------------------------------------


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the SUM over ranks of the gradient w.r.t. its
    own rows. Public collectives only (`torch.distributed.nn.functional.all_gather` is deprecated
    and its suggested replacement is private); all_reduce + slice works on every backend."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        dist = torch.distributed
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_for_contrast(x: Tensor) -> Tensor:
    """Concatenate `x` of every rank along dim 0 (rank order), keeping gradients; identity
    without an initialised process group or with a single rank. All ranks must pass the same
    shape (pad ragged batches before gathering)."""
    if _world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_objects(items: Sequence[T]) -> list[T]:
    """Concatenate the picklable `items` (e.g. label strings) of every rank in rank order, the
    order of `gather_for_contrast`; a copy of `items` without distribution."""
    world = _world_size()
    if world == 1:
        return list(items)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


# --- soft cross-entropy and CLIP -----------------------------------------------------------------


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean over rows of -sum_j t_j·log_softmax(z)_j; targets are used as given (rows are
    expected to sum to 1). A column with logit -inf and target 0 contributes nothing (no NaN)."""
    log_p = torch.log_softmax(logits, dim=-1)
    terms = torch.where(targets != 0, targets * log_p, torch.zeros_like(log_p))
    return -terms.sum(dim=-1).mean()


def clip_contrastive_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float
) -> Tensor:
    """Symmetric CLIP loss: logits = scale·Z_I·Z_T^T (B x B), cross-entropy with the positives
    on the diagonal, mean of the image->text and text->image directions."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be [B, D], got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# --- multi-label ---------------------------------------------------------------------------------


def _label_mask(label_mask: Tensor | None, batch: int, k: int, device: torch.device) -> Tensor:
    if label_mask is None:
        return torch.ones(batch, k, dtype=torch.bool, device=device)
    if label_mask.shape != (batch, k):
        raise ValueError(f"label_mask must be [{batch}, {k}], got {tuple(label_mask.shape)}")
    return label_mask.to(device=device, dtype=torch.bool)


def _zero_loss(*tensors: Tensor | float) -> Tensor:
    """A 0 still attached to the inputs' graph, so DDP sees every parameter used."""
    parts = [t.sum() * 0.0 for t in tensors if isinstance(t, Tensor)]
    return torch.stack(parts).sum()


def multi_label_positives(label_mask: Tensor) -> Tensor:
    """[B, N] bool, N = number of valid labels (label_mask [B, K], True = valid, flattened in
    row-major order): column j is a positive of its own image only (GroupViT's definition)."""
    batch, k = label_mask.shape
    owner = torch.arange(batch, device=label_mask.device).repeat_interleave(k)
    owner = owner[label_mask.reshape(-1).bool()]
    return owner[None, :] == torch.arange(batch, device=label_mask.device)[:, None]


def non_noisy_positives(
    labels: Sequence[Sequence[str]], label_mask: Tensor | None = None
) -> Tensor:
    """[B, N] bool over the N valid labels (row-major order, as `multi_label_positives`):
    column j is a positive of image i iff its label string equals one of image i's own valid
    label strings (thesis 5.10: strings are compared, not embeddings, so two prompts of the same
    word are positives of each other). Exact string equality: pass the label words, not the
    prompted texts, normalised as wished (e.g. lower-cased)."""
    batch = len(labels)
    k = len(labels[0]) if batch else 0
    if any(len(row) != k for row in labels):
        raise ValueError("labels must be a rectangular B x K nested sequence of strings")
    mask = _label_mask(label_mask, batch, k, torch.device("cpu")).cpu()
    valid = [[s for s, ok in zip(row, mrow) if ok] for row, mrow in zip(labels, mask.tolist())]
    vocab: dict[str, int] = {}
    column_ids = [vocab.setdefault(s, len(vocab)) for row in valid for s in row]
    membership = torch.zeros(batch, len(vocab), dtype=torch.bool)
    for i, row in enumerate(valid):
        membership[i, torch.tensor([vocab[s] for s in row], dtype=torch.long)] = True
    positives = membership[:, torch.tensor(column_ids, dtype=torch.long)]
    return positives.to(label_mask.device if label_mask is not None else "cpu")


def soft_target_multi_label_loss(
    image_emb: Tensor,
    label_emb: Tensor,
    positives: Tensor,
    logit_scale: Tensor | float,
    extra_text_negatives: Tensor | None = None,
) -> Tensor:
    """The core of the multi-label losses. image_emb [B, D], label_emb [N, D], positives [B, N]
    bool.

    image->text: each image against the N labels plus the M `extra_text_negatives` ([M, D],
    appended columns with target 0, detached: constants); soft target uniform over its positive
    columns.
    text->image: each label against the B images; soft target uniform over its positive images.
    Soft-target cross-entropy, each direction a mean over its rows, then the mean of the two.
    Rows without any positive (an image with no valid label, a label with no positive image)
    are left out of their direction; they still serve as negatives in the other one. With no
    positive at all the loss is a graph-attached 0."""
    if image_emb.ndim != 2 or label_emb.ndim != 2 or image_emb.shape[1] != label_emb.shape[1]:
        raise ValueError(
            f"image_emb must be [B, D] and label_emb [N, D], got {tuple(image_emb.shape)} "
            f"and {tuple(label_emb.shape)}"
        )
    if positives.shape != (image_emb.shape[0], label_emb.shape[0]):
        raise ValueError(
            f"positives must be [{image_emb.shape[0]}, {label_emb.shape[0]}], "
            f"got {tuple(positives.shape)}"
        )
    positives = positives.to(device=image_emb.device, dtype=torch.bool)
    if not bool(positives.any()):
        return _zero_loss(image_emb, label_emb, logit_scale)
    target = positives.to(image_emb.dtype)

    texts = label_emb
    if extra_text_negatives is not None and extra_text_negatives.numel():
        if extra_text_negatives.ndim != 2 or extra_text_negatives.shape[1] != label_emb.shape[1]:
            raise ValueError(
                f"extra_text_negatives must be [M, {label_emb.shape[1]}], "
                f"got {tuple(extra_text_negatives.shape)}"
            )
        extra = extra_text_negatives.detach().to(device=label_emb.device, dtype=label_emb.dtype)
        texts = torch.cat([label_emb, extra], dim=0)
        target = F.pad(target, (0, extra.shape[0]))

    image_rows = positives.any(dim=1)
    logits_img = logit_scale * image_emb[image_rows] @ texts.T
    target_img = target[image_rows]
    loss_img = soft_cross_entropy(logits_img, target_img / target_img.sum(-1, keepdim=True))

    text_rows = positives.any(dim=0)
    logits_txt = logit_scale * label_emb[text_rows] @ image_emb.T
    target_txt = positives.T[text_rows].to(image_emb.dtype)
    loss_txt = soft_cross_entropy(logits_txt, target_txt / target_txt.sum(-1, keepdim=True))
    return 0.5 * (loss_img + loss_txt)


def _flatten_labels(
    image_emb: Tensor, label_emb: Tensor, label_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    if label_emb.ndim != 3 or label_emb.shape[0] != image_emb.shape[0]:
        raise ValueError(
            f"label_emb must be [B, K, D] with B = {image_emb.shape[0]}, "
            f"got {tuple(label_emb.shape)}"
        )
    batch, k, dim = label_emb.shape
    mask = _label_mask(label_mask, batch, k, label_emb.device)
    return label_emb.reshape(batch * k, dim)[mask.reshape(-1)], mask


def multi_label_contrastive_loss(
    image_emb: Tensor,
    label_emb: Tensor,
    logit_scale: Tensor | float,
    label_mask: Tensor | None = None,
    extra_text_negatives: Tensor | None = None,
) -> Tensor:
    """GroupViT's multi-label contrastive loss. image_emb [B, D], label_emb [B, K, D] (the K
    label prompts of each image's caption), label_mask [B, K] bool, True = valid (padding labels
    are removed entirely: neither columns nor rows).

    image->text over all valid labels of the batch (+ `extra_text_negatives` columns, target 0),
    soft target 1/K_i on the image's own K_i valid labels; text->image: each valid label against
    the B images, one-hot on its own image. Mean of the two soft cross-entropies. An image with
    no valid label contributes no image->text row (it remains a negative for the labels).
    With K = 1 and no mask this is `clip_contrastive_loss`."""
    flat, mask = _flatten_labels(image_emb, label_emb, label_mask)
    positives = multi_label_positives(mask)
    return soft_target_multi_label_loss(
        image_emb, flat, positives, logit_scale, extra_text_negatives
    )


def non_noisy_multi_label_loss(
    image_emb: Tensor,
    label_emb: Tensor,
    logit_scale: Tensor | float,
    labels: Sequence[Sequence[str]],
    label_mask: Tensor | None = None,
    extra_text_negatives: Tensor | None = None,
) -> Tensor:
    """The thesis's non-noisy multi-label loss (5.10): as `multi_label_contrastive_loss`, but a
    label whose string equals one of image i's own valid label strings is a positive of image i
    too, wherever it sits in the batch (`non_noisy_positives`). image->text target uniform over
    all positive columns of the row, text->image target uniform over all images holding that
    label string. `labels` is B x K strings aligned with label_emb (gathered with
    `gather_objects` under DDP). Identical to the plain loss when no string repeats across
    images. Bank negatives should exclude the batch's strings (`TextMemoryBank.negatives`)."""
    flat, mask = _flatten_labels(image_emb, label_emb, label_mask)
    if len(labels) != label_emb.shape[0]:
        raise ValueError(f"labels has {len(labels)} rows, label_emb {label_emb.shape[0]}")
    if any(len(row) != label_emb.shape[1] for row in labels):
        raise ValueError(f"every row of labels must hold K = {label_emb.shape[1]} strings")
    positives = non_noisy_positives(labels, mask).to(image_emb.device)
    return soft_target_multi_label_loss(
        image_emb, flat, positives, logit_scale, extra_text_negatives
    )


# --- memory bank ---------------------------------------------------------------------------------


class TextMemoryBank(nn.Module):
    """FIFO queue of past (detached) text / label embeddings used as extra negatives of the
    image->text direction (`extra_text_negatives`): the thesis's future work (6.1.2) to enlarge
    the negative pool that the non-noisy loss shrinks.

    The embeddings, write pointer and fill count are buffers, so checkpoints keep them. The label
    strings live in a Python list beside them and are NOT in the state_dict: after
    `load_state_dict` the restored entries have unknown strings and are never excluded (they are
    overwritten within `size` enqueued rows). Under DDP, enqueue the gathered embeddings and
    strings so every rank's bank stays identical. Entries are stale embeddings of an older
    model, as in MoCo; keep `size` moderate relative to the learning rate."""

    queue: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("queue", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._labels: list[str | None] = [None] * self.size

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def reset(self) -> None:
        self.queue.zero_()
        self.ptr.zero_()
        self.filled.zero_()
        self._labels = [None] * self.size

    @torch.no_grad()
    def enqueue(self, emb: Tensor, labels: Sequence[str] | None = None) -> None:
        """Append emb [N, D] (detached), overwriting the oldest entries once full; with N > size
        only the last `size` rows are kept. `labels`, if given, are the N label strings."""
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"emb must be [N, {self.dim}], got {tuple(emb.shape)}")
        names: list[str | None] = [None] * emb.shape[0] if labels is None else list(labels)
        if len(names) != emb.shape[0]:
            raise ValueError(f"{len(names)} labels for {emb.shape[0]} embeddings")
        if emb.shape[0] > self.size:
            emb, names = emb[-self.size :], names[-self.size :]
        n = emb.shape[0]
        if n == 0:
            return
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(n)) % self.size
        self.queue[slots.to(self.queue.device)] = emb.detach().to(self.queue)
        for slot, name in zip(slots.tolist(), names):
            self._labels[slot] = name
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def _slots(self) -> list[int]:
        """Filled slots, oldest first."""
        filled = int(self.filled)
        start = (int(self.ptr) - filled) % self.size
        return [(start + i) % self.size for i in range(filled)]

    def labels(self) -> list[str | None]:
        """The stored strings in the order of `negatives()` (None where unknown)."""
        return [self._labels[s] for s in self._slots()]

    def negatives(self, exclude: set[str] | None = None) -> Tensor:
        """The stored embeddings [n, D], oldest first ([0, D] when empty), without the entries
        whose label string is in `exclude`: pass the current batch's label strings, since under
        the non-noisy definition an equal string is a positive and can never be a negative."""
        slots = self._slots()
        if exclude:
            slots = [s for s in slots if self._labels[s] is None or self._labels[s] not in exclude]
        index = torch.tensor(slots, dtype=torch.long, device=self.queue.device)
        return self.queue.index_select(0, index)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._labels = [None] * self.size  # strings are not checkpointed

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
