"""Optuna studies over any experiment, driven through Hydra's compose API (see sweep.py).

A search space is declared in `configs/sweep/<name>.yaml` under `params`, each entry a config
key with `type: float|int|categorical`, `low`/`high`/`log`/`step` or `choices`, and optionally
`when: {other.key: value}` to sample it only when an earlier choice matches (conditional
parameters). Storage, sampler and pruner come from the same file; each trial is a normal
training run whose value is the metric the experiment optimises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
import pytorch_lightning as pl

PARAM_TYPES = ("float", "int", "categorical")


def suggest_overrides(trial: optuna.Trial, params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Hydra overrides `key=value` for one trial; a conditional parameter is sampled only when
    its `when` conditions hold for the values already chosen in this trial."""
    chosen: dict[str, Any] = {}
    for key, spec in params.items():
        when = dict(spec.get("when") or {})
        if any(chosen.get(k) != v for k, v in when.items()):
            continue
        kind = spec.get("type")
        if kind == "float":
            value = trial.suggest_float(
                key,
                float(spec["low"]),
                float(spec["high"]),
                log=bool(spec.get("log", False)),
                step=spec.get("step"),
            )
        elif kind == "int":
            value = trial.suggest_int(
                key,
                int(spec["low"]),
                int(spec["high"]),
                log=bool(spec.get("log", False)),
                step=int(spec.get("step", 1)),
            )
        elif kind == "categorical":
            value = trial.suggest_categorical(key, list(spec["choices"]))
        else:
            raise ValueError(f"sweep.params.{key}.type={kind!r} is not one of {list(PARAM_TYPES)}")
        chosen[key] = value
    return [f"{k}={v}" for k, v in chosen.items()]


def build_sampler(spec: Mapping[str, Any] | None) -> optuna.samplers.BaseSampler:
    spec = dict(spec or {"name": "tpe"})
    name, seed = spec.pop("name", "tpe"), spec.pop("seed", None)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if name not in samplers:
        raise ValueError(f"sweep.sampler.name={name!r} is not one of {sorted(samplers)}")
    return samplers[name](seed=seed, **spec)


def build_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    spec = dict(spec or {"name": "median"})
    name = spec.pop("name", "median")
    pruners = {
        "median": optuna.pruners.MedianPruner,
        "none": optuna.pruners.NopPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "threshold": optuna.pruners.ThresholdPruner,
    }
    if name not in pruners:
        raise ValueError(f"sweep.pruner.name={name!r} is not one of {sorted(pruners)}")
    return pruners[name](**spec)


def build_storage(url: str | None) -> optuna.storages.BaseStorage | str | None:
    """An RDB URL (sqlite:///..., postgresql://...) as is; `journal:<path>` for a journal file
    shared by many workers on one file system; None for in-memory."""
    if url and url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return url


class OptunaPruning(pl.Callback):
    """Report the monitored validation metric each epoch; stop the run when Optuna prunes."""

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial, self.monitor, self.pruned = trial, monitor, False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.monitor]), trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True
