"""The one table of renamed and deprecated config keys (after timm's `register_model_deprecations`).

Every key a user may still write from an earlier version has ONE entry here: the old key, what
replaces it, and the version the entry goes away in. What happens to the old key:
- refused (`still_read=False`): the key is no longer read. A run given it stops with a
  ConfigError naming the new key (`pipelines.base.prepare_run`, a sweep's parameters in
  `sweep_driver.check_params`, PlantCLEF's `validate` for `predict.center_crop`). Hydra refuses
  an unknown key and suggests `+key=...`, which would add it unread: this names the new one.
- still read (`still_read=True`): the old key keeps working with a FutureWarning naming the new
  one, and the configs keep a `null` placeholder for it so that `key=value` composes without `+`
  (`loss.class_counts` in configs/loss/*.yaml, `dataset.bg_threshold` in the segmentation
  datasets' configs). `values` maps an old value to the new key's where they differ.
- `group`: an older name of a config group (`task=segmentation` is `pipeline=segmentation`),
  kept as configs/task/*.yaml and warned about by `prepare_run`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vitlab.errors import ConfigError

VERSION = "0.1.0"  # pyproject.toml's
REMOVED_IN = "0.2.0"  # the next minor: the entries below go then


@dataclass(frozen=True)
class Deprecation:
    old: str  # the dotted key (or, for a group, the group's name) of earlier versions
    new: str  # what replaces it: a key, `group=choices` or a hint
    removed_in: str = REMOVED_IN
    still_read: bool = False  # True: read with a FutureWarning; False: refused (ConfigError)
    group: bool = False  # `old` is a config group (`old=<option>`), warned about
    values: tuple[tuple[str, str], ...] = ()  # still read: old value -> the new key's value

    def refusal(self) -> str:
        """The error text of a refused key."""
        return f"{self.old} was renamed: use {self.new}"

    def new_value(self, value: Any) -> Any:
        """The new key's value for the old key's `value` (the same value unless mapped)."""
        return dict(self.values).get(value, value) if isinstance(value, str) else value

    def warning(self, value: Any) -> str:
        return (
            f"{self.old}={value} is deprecated (removed in {self.removed_in}): use "
            f"{self.new}={self.new_value(value)}"
        )


DEPRECATIONS: dict[str, Deprecation] = {
    d.old: d
    for d in (
        Deprecation("head.lr", "optimizer.lr"),
        Deprecation("head.weight_decay", "optimizer.weight_decay"),
        Deprecation("head.optimizer", "optimizer=adam|adamw|sgd"),
        Deprecation("head.scheduler", "scheduler=none|cosine_warm_restarts|plateau|warmup_cosine"),
        Deprecation(
            "groupvit.optim",
            "optimizer.lr, optimizer.weight_decay and scheduler.* (warmup_epochs, ...)",
        ),
        Deprecation(
            "predict.center_crop",
            "predict.tile_fit=center_crop (the default, was center_crop=true) | resize (was "
            "center_crop=false) | pad",
        ),
        Deprecation(
            "loss.class_counts",
            "loss.counts_from",
            still_read=True,
            values=(("accumulate", "batches"), ("train", "train")),
        ),
        Deprecation("dataset.bg_threshold", "segmentation.bg_threshold", still_read=True),
        Deprecation("task", "pipeline", still_read=True, group=True),
    )
}
"""Old key -> its entry. README "Renamed keys" lists them for users."""


def renamed_keys() -> dict[str, str]:
    """The refused keys -> what replaces them."""
    return {d.old: d.new for d in DEPRECATIONS.values() if not d.still_read}


def renamed_error(old: str) -> ConfigError:
    """The ConfigError of a refused key given anyway."""
    return ConfigError(DEPRECATIONS[old].refusal())


def refuse_renamed(cfg: Any) -> None:
    """A ConfigError naming the new key when the run's config sets a refused one."""
    from omegaconf import OmegaConf

    for old in renamed_keys():
        if OmegaConf.select(cfg, old) is not None:
            raise renamed_error(old)


def read_deprecated(old: str, value: Any, stacklevel: int = 3) -> Any:
    """A still-read key's `value` as the new key's (`None` stays None), with a FutureWarning
    naming the new key."""
    if value is None:
        return None
    entry = DEPRECATIONS[old]
    warnings.warn(entry.warning(value), FutureWarning, stacklevel=stacklevel)
    return entry.new_value(value)


def warn_deprecated_groups(choices: Mapping[str, Any] | None = None) -> None:
    """A FutureWarning for each older group name this run selected (`task=segmentation`), from
    Hydra's choices (`hydra.runtime.choices`; nothing outside a Hydra run)."""
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        choices = HydraConfig.get().runtime.choices
    for entry in DEPRECATIONS.values():
        if entry.group:
            read_deprecated(entry.old, choices.get(entry.old), stacklevel=3)
