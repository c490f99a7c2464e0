"""GroupViT fine-tuning on image-caption pairs (the thesis's recipes), as a LightningModule.

The module wires the model (`vitlab.models.groupvit`), the losses (`vitlab.losses.contrastive`,
`vitlab.losses.entropy`) and the optimisation recipe of the reference: AdamW without weight decay
on biases/1-D/position/group tokens, linear warm-up then cosine (optionally in cycles), gradient
clipping by the Trainer. Contrastive negatives are gathered across DDP ranks, except for the
non-noisy multi-label loss with `non_noisy_scope="local"` (the thesis's choice): that one is
computed on each rank's mini-batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from vitlab import optim
from vitlab.losses.contrastive import (
    CONTRAST_SCOPES,
    TextMemoryBank,
    clip_contrastive_loss,
    gather_for_contrast,
    gather_objects,
    multi_label_contrastive_loss,
    non_noisy_multi_label_loss,
)
from vitlab.losses.entropy import entropy, group_entropy, label_entropy, segment_entropy
from vitlab.models.groupvit.model import GroupViT, ImageEncoding, patch_group_attention

log = logging.getLogger(__name__)

# Fine-tunable components (thesis Table 5) -> parameter-name prefixes.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "grouping_block_1": ("img_encoder.layers.0.downsample.",),
    "grouping_block_2": ("img_encoder.layers.1.downsample.",),
    "image_projector": ("img_projector.",),
    "text_projector": ("text_projector.",),
    "logit_scales": ("logit_scale", "multi_label_logit_scale"),
    "everything": ("",),
}
# never weight-decayed besides biases and 1-D tensors (the reference's skip list)
NO_DECAY_NAMES = ("pos_embed", "group_token", "positional_embedding", "logit_scale")


def select_trainable(model: nn.Module, components: list[str] | tuple[str, ...]) -> int:
    """Freeze everything except the named components; return the trainable parameter count."""
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise ValueError(
            f"trainable components {list(components)} must be a non-empty subset of "
            f"{sorted(COMPONENTS)} (unknown: {unknown})"
        )
    prefixes = tuple(p for c in components for p in COMPONENTS[c])
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        count += param.numel() if param.requires_grad else 0
    return count


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers without trainable parameters in eval mode: a frozen projector must not
    move its running statistics either."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups: decay on weight matrices only (the reference split: no decay
    on biases, 1-D tensors and `NO_DECAY_NAMES`), frozen parameters left out. timm's split, with
    our names as patterns; groups come no-decay first and empty groups are omitted."""
    patterns = [f"*{name}*" for name in NO_DECAY_NAMES]
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=patterns)


@dataclass(frozen=True)
class LossTerm:
    """One term of the training loss, declared once. `name` keys it in `loss_terms` and in the
    metrics train/<name>, val/<name>; `weight_key` is its weight's place under groupvit.losses
    (0 = off), `default` the weight when unset; `compute(module, inputs)` returns the term
    unweighted from the image embedding "image" [B, P] and its `needs`: "caption" [B, P],
    "labels" [B, K, P] (with "mask" [B, K] and the label "strings"), "attention"
    [B, patches, G], "affinity" A_ST [B, G, K] (computed from the labels: needs them too)."""

    name: str
    weight_key: str
    default: float
    needs: tuple[str, ...]
    compute: Callable[[GroupViTFineTuner, dict[str, Any]], Tensor]


# The loss is the sum of these terms, each times its weight, in this order.
TERMS: tuple[LossTerm, ...] = (
    # image-caption CLIP loss, negatives gathered across ranks
    LossTerm(
        "contrastive",
        "contrastive",
        1.0,
        ("caption",),
        lambda m, x: clip_contrastive_loss(
            gather_for_contrast(x["image"]), gather_for_contrast(x["caption"]), m.model.scale()
        ),
    ),
    # image vs its K label prompts (plain or non-noisy, optionally with a memory bank)
    LossTerm(
        "multi_label",
        "multi_label",
        1.0,
        ("labels",),
        lambda m, x: m._multi_label(x["image"], x["labels"], x["mask"], x["strings"]),
    ),
    # thesis 4.7 entropy penalties: GE, LE, SE
    LossTerm(
        "group_entropy",
        "entropy.group",
        0.0,
        ("attention",),
        lambda m, x: group_entropy(x["attention"]),
    ),
    LossTerm(
        "label_entropy",
        "entropy.label",
        0.0,
        ("attention", "labels", "affinity"),
        lambda m, x: label_entropy(x["attention"], x["affinity"], x["mask"]),
    ),
    LossTerm(
        "segment_entropy",
        "entropy.segment",
        0.0,
        ("labels", "affinity"),
        lambda m, x: segment_entropy(
            x["affinity"],
            x["mask"],
            group_weight=m.weights.segment_group_weight,
            label_weight=m.weights.segment_label_weight,
        ),
    ),
)


def _flat_losses(losses: dict[str, Any]) -> dict[str, Any]:
    """groupvit.losses as one flat dict of term names and options. A term's weight is read at its
    `weight_key` (`entropy.group`) and also, as always, under its name (`group_entropy`) at the
    top level or in that section; a section's other keys (`entropy.segment_group_weight`) are
    options like the top-level ones, and a section's value wins over a top-level one."""
    names = {term.weight_key: term.name for term in TERMS}
    sections = {key.rpartition(".")[0] for key in names} - {""}
    top = {key: name for key, name in names.items() if "." not in key}
    values = {top.get(k, k): v for k, v in losses.items() if k not in sections}
    for section in sorted(sections):
        for key, value in dict(losses.get(section) or {}).items():
            values[names.get(f"{section}.{key}", key)] = value
    return values


@dataclass
class LossWeights:
    """groupvit.losses, read: each declared term's weight (`TERMS`, by name; also readable as
    an attribute, `weights.group_entropy`) and the options of the multi-label and
    segment-entropy terms."""

    weight: dict[str, float] = field(default_factory=lambda: {t.name: t.default for t in TERMS})
    non_noisy: bool = False
    # where the non-noisy loss finds its pairs: "global" (the gathered multi-GPU batch) or
    # "local" (each GPU's mini-batch, positives and negatives; the thesis's code)
    non_noisy_scope: str = "global"
    memory_bank: int = 0
    segment_group_weight: float = 0.2
    segment_label_weight: float = 0.1

    def __getattr__(self, name: str) -> float:
        weight = self.__dict__.get("weight", {})
        if name in weight:
            return weight[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_config(cls, losses: dict[str, Any]) -> LossWeights:
        values = _flat_losses(losses)
        weight = {term.name: values.pop(term.name, term.default) for term in TERMS}
        try:
            weights = cls(weight, **values)
        except TypeError as err:
            raise ValueError(f"groupvit.losses: {err}") from err
        contrastive, multi_label = weight["contrastive"], weight["multi_label"]
        if contrastive < 0 or multi_label < 0 or weights.memory_bank < 0:
            raise ValueError("groupvit.losses weights and memory_bank must be >= 0")
        if contrastive == 0 and multi_label == 0:
            raise ValueError("groupvit.losses: contrastive and multi_label are both 0")
        if weights.memory_bank and not multi_label:
            raise ValueError("groupvit.losses.memory_bank needs the multi-label loss")
        if weights.non_noisy_scope not in CONTRAST_SCOPES:
            raise ValueError(
                f"groupvit.losses.non_noisy_scope must be one of {list(CONTRAST_SCOPES)}, "
                f"got {weights.non_noisy_scope!r}"
            )
        if weights.non_noisy_scope != "global" and not (weights.non_noisy and multi_label):
            raise ValueError(
                "groupvit.losses.non_noisy_scope=local applies to the non-noisy multi-label loss: "
                "set groupvit.losses.non_noisy=true and groupvit.losses.multi_label > 0"
            )
        return weights

    @property
    def active(self) -> tuple[LossTerm, ...]:
        """The terms computed, in `TERMS` order: those with a non-zero weight, except that
        without label embeddings only the caption terms run (a GE weight beside the contrastive
        term alone is not computed: the behaviour of the code this table replaced)."""
        on = [term for term in TERMS if self.weight[term.name]]
        if not any("labels" in term.needs for term in on):
            on = [term for term in on if "caption" in term.needs]
        return tuple(on)

    @property
    def needs(self) -> frozenset[str]:
        """The inputs the active terms read."""
        return frozenset(need for term in self.active for need in term.needs)

    @property
    def local_multi_label(self) -> bool:
        """The multi-label term is computed on each rank's mini-batch (no gather)."""
        return self.non_noisy and self.non_noisy_scope == "local"

    @property
    def needs_labels(self) -> bool:
        return "labels" in self.needs


def segment_label_logits(
    segments: Tensor, labels: Tensor, label_mask: Tensor | None, scale: Tensor
) -> Tensor:
    """A_ST: scale * cos(segment, label) [B, G, K] between each image's segments and its labels."""
    logits = scale * torch.einsum("bgd,bkd->bgk", segments, labels)
    if label_mask is not None:
        logits = logits.masked_fill(~label_mask[:, None, :], 0.0)
    return logits


class GroupViTFineTuner(pl.LightningModule):
    """Training step: image, its caption and K label prompts -> weighted sum of loss terms."""

    def __init__(
        self,
        model: GroupViT,
        trainable: list[str],
        losses: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        entropy_map_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.weights = LossWeights.from_config(losses)
        select_trainable(model, trainable)
        # a scale whose loss is off gets no gradient (DDP would fail on it): keep it frozen
        if not self.weights.weight["contrastive"]:
            model.logit_scale.requires_grad_(False)
        if not self.weights.needs_labels:
            model.multi_label_logit_scale.requires_grad_(False)
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total_parameters = sum(p.numel() for p in model.parameters())
        self.memory_bank = (
            TextMemoryBank(self.weights.memory_bank, model.spec.projection_dim)
            if self.weights.memory_bank
            else None
        )
        self.entropy_map_dir = Path(entropy_map_dir) if entropy_map_dir else None
        log.info(
            "trainable parameters: %d of %d (%s)",
            self.trainable_parameters,
            self.total_parameters,
            ", ".join(trainable),
        )

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            freeze_frozen_batchnorm(self.model)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning >= 2.2 does not put the module in train mode itself, and a loaded checkpoint
        # comes in eval mode: without this there would be no Gumbel noise, no drop-path, and
        # frozen BatchNorm statistics would still move. Validation restores these modes.
        self.train()

    def on_fit_start(self) -> None:
        metrics = {
            "params/trainable": float(self.trainable_parameters),
            "params/total": float(self.total_parameters),
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

    # -- losses --------------------------------------------------------------------------

    def _encode_texts(
        self, batch: dict[str, Any], captions: bool, labels: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Normalised caption embeddings [B, P] and label embeddings [B, K, P] (<PAD> rows are not
        encoded: zeros), from ONE text-encoder batch as the reference does: the text projector's
        BatchNorm sees captions and labels together (and never a single row)."""
        parts, b = [], batch["image"].shape[0]
        if captions:
            parts.append(batch["caption_tokens"])
        if labels:
            tokens, mask = batch["label_tokens"], batch["label_mask"].bool()
            k, length = tokens.shape[1], tokens.shape[2]
            valid = mask.reshape(-1)
            parts.append(tokens.reshape(b * k, length)[valid])
        encoded = F.normalize(self.model.encode_text(torch.cat(parts)).float(), dim=-1)
        caption = encoded[:b] if captions else None
        if not labels:
            return caption, None
        flat = encoded.new_zeros((b * k, encoded.shape[-1]))
        flat = flat.index_put((valid.nonzero(as_tuple=True)[0],), encoded[b if captions else 0 :])
        return caption, flat.reshape(b, k, -1)

    def loss_terms(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], ImageEncoding]:
        """The active terms (`LossWeights.active`), unweighted: what train/<name> and val/<name>
        log."""
        encoding = self.model.encode_image(batch["image"])
        inputs = self._term_inputs(batch, encoding)
        return {term.name: term.compute(self, inputs) for term in self.weights.active}, encoding

    def _term_inputs(self, batch: dict[str, Any], encoding: ImageEncoding) -> dict[str, Any]:
        """The image embedding and what the active terms need (`LossTerm`)."""
        needs, model = self.weights.needs, self.model
        x = {"image": F.normalize(model.project_image(encoding).float(), dim=-1)}
        x["caption"], x["labels"] = self._encode_texts(batch, "caption" in needs, "labels" in needs)
        if "labels" in needs:
            x["mask"], x["strings"] = batch["label_mask"].bool(), batch["labels"]
        if "attention" in needs:
            x["attention"] = patch_group_attention(encoding.soft_maps)
        if "affinity" in needs:
            x["affinity"] = self._affinity(encoding, x["labels"], x["mask"])
        return x

    def _affinity(self, encoding: ImageEncoding, labels: Tensor, mask: Tensor) -> Tensor:
        """A_ST [B, G, K] of the image's segments and its label embeddings."""
        segments = F.normalize(self.model.project_segments(encoding).float(), dim=-1)
        return segment_label_logits(segments, labels, mask, self.model.multi_label_scale())

    def _multi_label(
        self, image: Tensor, labels: Tensor, mask: Tensor, strings: list[list[str]]
    ) -> Tensor:
        """The multi-label term: over the gathered global batch, or with
        `non_noisy_scope="local"` over this rank's mini-batch only (pairs, positives and
        negatives; DDP then averages the ranks' gradients, as the thesis's code does)."""
        local = self.weights.local_multi_label
        scale = self.model.multi_label_scale()
        if local:
            image_in, labels_in, mask_in, strings_in = image, labels, mask, list(strings)
        else:
            image_in, labels_in = gather_for_contrast(image), gather_for_contrast(labels)
            mask_in = gather_for_contrast(mask)
            # every rank needs the global batch's strings: positives and bank exclusions agree
            strings_in = gather_objects(list(strings))
        extra = None
        if self.memory_bank is not None:
            # an equal string in the loss's own batch is a positive, never a bank negative
            current = {s for row in strings_in for s in row}
            extra = self.memory_bank.negatives(exclude=current if self.weights.non_noisy else None)
            extra = extra.to(image.device) if extra.numel() else None
        if self.weights.non_noisy:
            loss = non_noisy_multi_label_loss(
                image_in, labels_in, scale, strings_in, mask_in, extra_text_negatives=extra
            )
        else:
            loss = multi_label_contrastive_loss(
                image_in, labels_in, scale, mask_in, extra_text_negatives=extra
            )
        if self.memory_bank is not None and self.training:
            # every rank enqueues the global batch, so the banks stay identical across ranks
            if local:
                labels_all = gather_for_contrast(labels.detach())
                mask_all = gather_for_contrast(mask)
                strings_all = gather_objects(list(strings))
            else:
                labels_all, mask_all, strings_all = labels_in, mask_in, strings_in
            flat_mask = mask_all.reshape(-1)
            flat_strings = [s for row in strings_all for s in row]
            kept = [s for s, m in zip(flat_strings, flat_mask.tolist()) if m]
            self.memory_bank.enqueue(labels_all.reshape(-1, labels_all.shape[-1])[flat_mask], kept)
        return loss

    def weighted_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each term times its weight (`LossTerm.weight_key`): the named parts of the loss."""
        return {name: self.weights.weight[name] * value for name, value in terms.items()}

    def _weighted_total(self, terms: dict[str, Tensor]) -> Tensor:
        """The loss (train/loss, val/loss): the sum of the weighted terms."""
        return sum(self.weighted_terms(terms).values())

    # -- Lightning hooks -------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms, _ = self.loss_terms(batch)
        total = self._weighted_total(terms)
        size = batch["image"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", self.model.scale(), batch_size=size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        terms, encoding = self.loss_terms(batch)
        size = batch["image"].shape[0]
        for name, value in terms.items():
            self.log(f"val/{name}", value, batch_size=size, sync_dist=True)
        self.log("val/loss", self._weighted_total(terms), batch_size=size, sync_dist=True)
        if batch_idx == 0 and self.entropy_map_dir is not None and self.trainer.is_global_zero:
            self._write_entropy_maps(batch, encoding)

    def configure_optimizers(self) -> Any:
        weight_decay = float(self.hparams.optimizer.get("weight_decay", 0.0))
        groups = weight_decay_groups(self.model, weight_decay)
        return optim.configure_optimizers(
            self.hparams.optimizer, self.hparams.scheduler, groups, self.trainer
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lets `load_groupvit(path)` rebuild the model from a Lightning checkpoint alone
        checkpoint["groupvit_spec"] = self.model.spec.to_dict()

    # -- media ---------------------------------------------------------------------------

    def _write_entropy_maps(self, batch: dict[str, Any], encoding: ImageEncoding) -> None:
        from vitlab.reports import entropy_maps_png

        attention = patch_group_attention(encoding.soft_maps).float()
        group_map = entropy(attention, dim=-1)
        label_map = None
        if self.weights.needs_labels:
            mask = batch["label_mask"].bool()
            _, labels = self._encode_texts(batch, captions=False, labels=True)
            affinity = self._affinity(encoding, labels, mask)
            affinity = affinity.masked_fill(~mask[:, None, :], float("-inf"))
            per_patch = attention @ affinity.softmax(dim=-1)
            label_map = entropy(per_patch, dim=-1)
        path = self.entropy_map_dir / f"entropy_maps_epoch{self.current_epoch:03d}.png"
        n_labels = batch["label_tokens"].shape[1] if label_map is not None else None
        entropy_maps_png(
            batch["image"], group_map, label_map, encoding.grid, path, attention.shape[-1], n_labels
        )
        for logger in self.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                logger.log_image("val/entropy_maps", [str(path)], step=self.global_step)
