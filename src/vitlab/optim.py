"""Optimisers and LR schedulers: one shape for every pipeline.

The `optimizer` and `scheduler` config groups (configs/optimizer, configs/scheduler) hold
`_partial_: true` Hydra targets. Every LightningModule's `configure_optimizers` returns
`configure_optimizers(optimizer, scheduler, params, trainer)` (which calls `build_optimizer` and
`build_scheduler`); the pipelines' `validate` calls `check_optimization(cfg)` so a bad optimiser
or scheduler key fails before any stage.

A scheduler node may also hold Lightning's stepping keys (`interval`, `frequency`, `monitor`),
which are not constructor arguments, and `???` for values only known at run time
(`RUNTIME_KEYS`: the trainer's optimiser steps and epochs)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vitlab.config import fill_runtime, instantiate_node, to_container
from vitlab.errors import ConfigError

LIGHTNING_KEYS = ("interval", "frequency", "monitor")
RUNTIME_KEYS = ("total_steps", "epochs")


def build_optimizer(node: Mapping[str, Any], params: Iterable[Any]) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (a group's own `weight_decay` wins over the
    node's)."""
    node = to_container(node)
    if not node or not node.get("_partial_"):
        raise ConfigError(
            f"optimizer: expected a `_partial_: true` target (configs/optimizer/*.yaml), "
            f"got {node!r}"
        )
    make = instantiate_node(node, "optimizer")
    try:
        return make(params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer: {err}") from err


def build_scheduler(
    node: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer, runtime: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Lightning's `lr_scheduler` dict for `node` (None: a constant learning rate)."""
    node = dict(to_container(node) or {})
    if not node:
        return None
    if "_target_" not in node:
        raise ConfigError(
            f"scheduler: {sorted(node)} set without a _target_: a config sets values for a "
            "scheduler that is not selected (pick one with scheduler=<name>, see "
            "configs/scheduler/)"
        )
    lightning = {key: node.pop(key) for key in LIGHTNING_KEYS if key in node}
    node = fill_runtime(
        node, {key: runtime[key] for key in RUNTIME_KEYS if key in runtime}, "scheduler"
    )
    make = instantiate_node(node, "scheduler")
    try:
        scheduler = make(optimizer)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler: {err}") from err
    interval = lightning.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"scheduler.interval={interval!r} is not one of ['epoch', 'step']")
    return {"scheduler": scheduler, **lightning, "interval": interval}


def follow_monitor(node: dict[str, Any] | None, monitor: str, mode: str) -> dict[str, Any] | None:
    """A scheduler that watches a metric (ReduceLROnPlateau) follows the run's actual monitor,
    e.g. train/loss (min) when a run has no validation split."""
    if node and "monitor" in node:
        node = {**node, "monitor": monitor}
        if "mode" in node:
            node["mode"] = mode
    return node


def configure_optimizers(
    optimizer: Mapping[str, Any], scheduler: Mapping[str, Any] | None, params: Any, trainer: Any
) -> Any:
    """What a LightningModule's `configure_optimizers` returns for these nodes."""
    built = build_optimizer(optimizer, params)
    schedule = build_scheduler(scheduler, built, trainer_runtime(trainer))
    return built if schedule is None else {"optimizer": built, "lr_scheduler": schedule}


def check_optimization(cfg: DictConfig) -> None:
    """Build the run's optimiser and scheduler on a dummy parameter: every key error surfaces
    here, before any stage, naming `optimizer` or `scheduler`."""
    if "optimizer" not in cfg or cfg.optimizer is None:
        raise ConfigError("optimizer: not set (optimizer=adam|adamw|sgd)")
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr!r}")
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = build_optimizer(cfg.optimizer, dummy)
    build_scheduler(cfg.get("scheduler"), optimizer, {"total_steps": 10, "epochs": 2})


def warmup_cosine_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    cycles: int = 1,
    warmup_start: float = 0.0025,
    min_factor: float = 0.0,
) -> float:
    """LR multiplier: linear warm-up from `warmup_start`, then `cycles` equal cosine decays (each
    restarting at 1) down to `min_factor` over the remaining steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    cycle_length = max(math.ceil(decay_steps / max(cycles, 1)), 1)
    position = min(step - warmup_steps, decay_steps - 1) % cycle_length / cycle_length
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * position))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Per-step linear warm-up over `warmup_epochs`, then `cycles` cosine decays (the GroupViT
    reference schedule). `total_steps`/`epochs` come from the trainer (`???` in the config)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        epochs: int,
        warmup_epochs: float = 1.0,
        cycles: int = 1,
        warmup_start: float = 0.0025,
        min_factor: float = 0.0,
    ):
        total = max(int(total_steps), 1)
        warmup = int(round(warmup_epochs * total / max(int(epochs), 1)))
        super().__init__(
            optimizer,
            lambda step: warmup_cosine_factor(
                step, warmup, total, cycles, warmup_start, min_factor
            ),
        )


def trainer_runtime(trainer: Any) -> dict[str, int]:
    """The run-time values a scheduler node may leave as `???`."""
    return {
        "total_steps": max(int(trainer.estimated_stepping_batches), 1),
        "epochs": max(int(trainer.max_epochs or 1), 1),
    }


def require_node(node: Any, key: str) -> dict[str, Any]:
    """Checkpoints written before the optimizer/scheduler groups store a name (`"adam"`) or a
    `{name: ...}` dict: they still load for prediction, but cannot be trained further."""
    plain = to_container(node) if isinstance(node, Mapping | DictConfig) else None
    if plain is None or "_target_" not in plain:
        raise ConfigError(
            f"{key}={node!r}: written by an older vitlab (before the `{key}` config group); "
            "its training cannot be resumed, train anew"
        )
    return plain


__all__ = [
    "build_optimizer",
    "build_scheduler",
    "follow_monitor",
    "check_optimization",
    "require_node",
    "configure_optimizers",
    "trainer_runtime",
    "warmup_cosine_factor",
    "WarmupCosine",
]
