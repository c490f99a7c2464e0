"""Optuna sweeps: `python sweep.py sweep=<name> [experiment=...] [key=value ...]`.

Composes the training config with Hydra's compose API, creates or resumes the study in the
configured storage, and runs trials (each a normal `train.py` run, pruned from its per-epoch
validation metric) until the study holds `sweep.n_trials` finished trials. Several
processes pointed at the same storage share the study and finish `n_trials` in total.
Writes `best_params.json` and `param_importance.png` to `<paths.root_dir>/sweeps/<study_name>/`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vitlab.config import ConfigError, to_container
from vitlab.sweeps import (
    OptunaPruning,
    build_pruner,
    build_sampler,
    build_storage,
    suggest_overrides,
)

log = logging.getLogger("vitlab.sweep")
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def compose_trial(overrides: list[str], output_dir: Path) -> DictConfig:
    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a Hydra app: `${hydra:...}` resolves from HydraConfig
    return cfg


def run_training(cfg: DictConfig) -> dict[str, Any]:
    if cfg.pipeline == "fungiclef":
        from vitlab.run_fungiclef import train_fungiclef

        return train_fungiclef(cfg)
    from vitlab.run import train

    return train(cfg)


def run_sweep(overrides: list[str]) -> optuna.Study:
    from vitlab.run import EXTRA_CALLBACKS

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose_trial(overrides, Path(os.getcwd()))
        if base.get("sweep") is None:
            raise ConfigError("sweep=<name> is required (a file in configs/sweep/)")
        spec = base.sweep
        sweep_dir = Path(base.paths.root_dir) / "sweeps" / spec.study_name
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = create_or_load_study(spec)

        def finished() -> int:
            return len(study.get_trials(deepcopy=False, states=FINISHED))

        def objective(trial: optuna.Trial) -> float:
            trial_overrides = suggest_overrides(trial, to_container(spec.params))
            out = sweep_dir / f"trial_{trial.number:04d}"
            cfg = compose_trial([*overrides, *trial_overrides], out)
            with open_dict(cfg):
                if cfg.logger and cfg.logger.get("wandb"):
                    cfg.logger.wandb.group = spec.study_name  # one W&B group per study
            pruning = OptunaPruning(trial, cfg.fit.monitor)
            token = EXTRA_CALLBACKS.set((pruning,))
            start = time.perf_counter()
            try:
                summary = run_training(cfg)
            finally:
                EXTRA_CALLBACKS.reset(token)
                # time inside the training run; wall_seconds - this = the sweep's own overhead
                trial.set_user_attr("train_seconds", time.perf_counter() - start)
            trial.set_user_attr("stage_seconds", summary.get("stage_seconds", {}))
            if pruning.pruned:
                raise optuna.TrialPruned()
            value = summary.get("fit_metrics", {}).get(cfg.optimized_metric)
            if value is None:
                raise ValueError(f"the run reported no {cfg.optimized_metric} (optimized_metric)")
            return float(value)

        while finished() < spec.n_trials:
            if not run_one_trial(study, objective, spec.n_trials):
                break
        _write_results(study, sweep_dir, base)
    return study


def create_or_load_study(spec: DictConfig, attempts: int = 5) -> optuna.Study:
    """Create or load the study. Workers started together can race to create the storage's
    schema (SQLite: "UNIQUE constraint failed: alembic_version"); the loser retries."""
    import random

    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.create_study(
                study_name=spec.study_name,
                storage=build_storage(spec.storage),
                sampler=build_sampler(to_container(spec.sampler)),
                pruner=build_pruner(to_container(spec.pruner)),
                direction=spec.direction,
                load_if_exists=True,
            )
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def run_one_trial(study: optuna.Study, objective, n_trials: int) -> bool:
    """Ask for a trial and run it, unless the study already has `n_trials` trials with smaller
    numbers that are running or finished (trial numbers come from the shared storage, so
    several workers never run more than `n_trials` in total); such an excess trial is closed as
    FAIL with user attribute `excess` and not counted. Returns False when the study is full."""
    trial = study.ask()
    earlier = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and t.state != optuna.trial.TrialState.FAIL
    ]
    if len(earlier) >= n_trials:
        trial.set_user_attr("excess", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    start = time.perf_counter()
    state, value = optuna.trial.TrialState.COMPLETE, None
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        state = optuna.trial.TrialState.PRUNED
    except Exception:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("wall_seconds", time.perf_counter() - start)
    study.tell(trial, value, state=state)
    return True


def _write_results(study: optuna.Study, sweep_dir: Path, base: DictConfig) -> None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        log.warning("no complete trial yet in study %s", study.study_name)
        return
    best = {
        "study": study.study_name,
        "value": study.best_value,
        "params": study.best_params,
        "trial": study.best_trial.number,
        "states": {
            s.name: len(study.get_trials(deepcopy=False, states=(s,)))
            for s in optuna.trial.TrialState
        },
    }
    (sweep_dir / "best_params.json").write_text(json.dumps(best, indent=2))
    log.info("best of %s: %s", study.study_name, best)
    if len(complete) >= 2:
        try:
            importance = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as err:  # e.g. a parameter that never varied
            log.warning("parameter importance not computed: %s", err)
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(list(importance), list(importance.values()), color="tab:blue")
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title(study.study_name)
        fig.tight_layout()
        fig.savefig(sweep_dir / "param_importance.png", dpi=100)
        plt.close(fig)
    _log_to_wandb(best, sweep_dir, base)


def _log_to_wandb(best: dict[str, Any], sweep_dir: Path, base: DictConfig) -> None:
    """The study's result as one W&B run in the study's group (when W&B is on)."""
    wandb_cfg = base.logger.get("wandb") if base.logger else None
    if not wandb_cfg or wandb_cfg.get("mode") == "disabled":
        return
    import wandb

    run = wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.get("entity"),
        group=best["study"],
        job_type="sweep-summary",
        mode=wandb_cfg.mode,
        dir=str(sweep_dir),
        config={"best_params": best["params"]},
    )
    run.summary.update(
        {
            "best_value": best["value"],
            "best_trial": best["trial"],
            **{f"trials/{k}": v for k, v in best["states"].items()},
        }
    )
    image = sweep_dir / "param_importance.png"
    if image.is_file():
        run.log({"param_importance": wandb.Image(str(image))})
    run.finish()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        run_sweep(sys.argv[1:])
    except ConfigError as err:
        log.error("ConfigError: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
