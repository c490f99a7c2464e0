"""The one loss factory of the classification LightningModules (PlantCLEF's
`EmbeddingClassifier`, FungiCLEF's `FungiClassifier`): `build_loss(loss_cfg, stats)`.

A loss YAML says *where* class counts come from (`counts_from: batches|train`), never the
counts themselves; the pipeline hands over its `LabelStats` (number of classes, the training
split's class counts, the poisonous classes if the dataset has a poison list). `LOSS_INPUTS`
says explicitly which runtime values each loss target takes, so nothing inspects signatures.
Every mismatch is a `ConfigError` naming the key, and the pipelines' `validate` calls this with
`LabelStats.dummy(...)` before any stage runs, so a loss that cannot work fails first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitlab.config import instantiate_node, locate_target
from vitlab.deprecations import DEPRECATIONS, read_deprecated
from vitlab.errors import ConfigError
from vitlab.losses.classification import (
    FocalLoss,
    SeesawLoss,
    SeesawPoisonLoss,
    WeightedCrossEntropy,
)

log = logging.getLogger(__name__)

COUNTS_FROM = ("batches", "train")
"""`batches`: counts accumulate over the training batches seen (mmdet's seesaw); `train`: the
training split's class counts, a fixed prior known before the first step."""
CLASS_COUNTS = DEPRECATIONS["loss.class_counts"]
"""The older `class_counts: accumulate|train`, still read (its values: the table's)."""


@dataclass(frozen=True)
class LabelStats:
    """What a pipeline knows about its label space when it builds the loss."""

    num_classes: int
    class_counts: Sequence[int] | None = None  # the training split's, per class index
    poisonous_classes: Sequence[int] | None = None  # None: the dataset has no poison list

    @classmethod
    def dummy(cls, num_classes: int = 4, poison_list: bool = False) -> LabelStats:
        """Stand-in statistics for `validate`: the real ones exist only after embed."""
        counts = [num_classes - i for i in range(num_classes)]
        return cls(num_classes, counts, [0] if poison_list else None)


@dataclass(frozen=True)
class LossInputs:
    """The runtime values a loss target takes besides its YAML keys.

    `counts`: the `counts_from` modes it supports (empty: it takes no counts; the first is the
    default when the YAML sets none). `batches` means the constructor gets `class_counts=None`.
    `expects`: `logits` (any head) or `log_probs` (the head must end in log-softmax)."""

    num_classes: bool = False
    counts: tuple[str, ...] = ()
    poisonous_classes: bool = False
    expects: str = "logits"


LOSS_INPUTS: dict[type, LossInputs] = {
    nn.NLLLoss: LossInputs(expects="log_probs"),
    nn.CrossEntropyLoss: LossInputs(),
    FocalLoss: LossInputs(),
    WeightedCrossEntropy: LossInputs(counts=("train",)),
    SeesawLoss: LossInputs(num_classes=True, counts=("batches", "train")),
    SeesawPoisonLoss: LossInputs(
        num_classes=True, counts=("batches", "train"), poisonous_classes=True
    ),
}
"""Keyed by the loss class, so any import path of it (`vitlab.losses.SeesawLoss`,
`vitlab.losses.classification.SeesawLoss`) finds its entry. Targets not listed (your own, via
`extra_target_prefixes`) get their YAML keys only."""


def loss_inputs(loss_cfg: Mapping[str, Any]) -> LossInputs:
    """The runtime inputs of the class `loss_cfg._target_` names, by any import path of it
    (`LossInputs()` for a class not listed, or a target that may not be built: building it
    names the key)."""
    target = locate_target(loss_cfg.get("_target_"))
    return LOSS_INPUTS.get(target, LossInputs()) if isinstance(target, type) else LossInputs()


def counts_mode(loss_cfg: Mapping[str, Any]) -> str | None:
    """The `counts_from` mode of this loss config (None for a loss without counts), reading the
    deprecated `class_counts: accumulate|train` with a warning; a ConfigError naming the key if
    the loss cannot take it."""
    target = loss_cfg.get("_target_")
    supported = loss_inputs(loss_cfg).counts
    mode = loss_cfg.get("counts_from")
    old = loss_cfg.get("class_counts")
    if old is not None:
        if not isinstance(old, str) or old not in dict(CLASS_COUNTS.values):
            raise ConfigError(
                f"loss.class_counts={old!r}: class counts come from the data; choose where with "
                f"loss.counts_from={'|'.join(COUNTS_FROM)}"
            )
        mode = read_deprecated(CLASS_COUNTS.old, old)
    if mode is None:
        return supported[0] if supported else None
    if mode not in COUNTS_FROM:
        raise ConfigError(f"loss.counts_from={mode!r} is not one of {list(COUNTS_FROM)}")
    if mode not in supported:
        takes = f"supports only {list(supported)}" if supported else "takes no class counts"
        raise ConfigError(f"loss.counts_from={mode}: loss {target} {takes}")
    return mode


def build_loss(loss_cfg: Mapping[str, Any], stats: LabelStats) -> nn.Module:
    """The loss module of `loss_cfg` (the `loss` group, a plain dict or DictConfig) for a label
    space described by `stats`."""
    cfg = {k: v for k, v in dict(loss_cfg).items() if k not in ("counts_from", "class_counts")}
    inputs = loss_inputs(loss_cfg)
    mode = counts_mode(loss_cfg)
    runtime: dict[str, Any] = {}
    if inputs.num_classes:
        runtime["num_classes"] = int(stats.num_classes)
    if mode == "train":
        if stats.class_counts is None:
            raise ConfigError(
                "loss.counts_from=train: this pipeline has no training-split class counts"
            )
        counts = [int(c) for c in stats.class_counts]
        if len(counts) != stats.num_classes:
            raise ConfigError(
                f"loss.counts_from=train: {len(counts)} class counts for "
                f"{stats.num_classes} classes"
            )
        runtime["class_counts"] = counts
    elif mode == "batches":
        runtime["class_counts"] = None
    if inputs.poisonous_classes:
        if stats.poisonous_classes is None:
            raise ConfigError(
                f"loss._target_={loss_cfg.get('_target_')} needs the poisonous classes, and this "
                "dataset has no poison list (FungiCLEF's dataset.poison_csv): use loss=seesaw"
            )
        runtime["poisonous_classes"] = [int(c) for c in stats.poisonous_classes]
    return instantiate_node(cfg, "loss", **runtime)


def outputs_log_probs(output: torch.Tensor) -> bool:
    """Are these head outputs log-probabilities (each row's logsumexp is 0)? Checked on a
    random batch, where logits of a randomly initialised head never normalise by chance."""
    return bool(torch.allclose(output.float().logsumexp(-1), torch.zeros(()), atol=1e-4))


def check_loss_input(
    loss_cfg: Mapping[str, Any],
    head_output: torch.Tensor,
    head_fix: str = "or a head ending in log-softmax (head.model.log_softmax=true)",
) -> None:
    """A ConfigError when the loss expects log-probabilities and the head outputs logits (NLL on
    logits trains without error and means nothing)."""
    if loss_inputs(loss_cfg).expects == "log_probs" and not outputs_log_probs(head_output):
        raise ConfigError(
            f"loss=nll expects log-probabilities (loss._target_={loss_cfg.get('_target_')}), but "
            f"head.model outputs logits: use loss=ce (the same loss on logits), {head_fix}"
        )
