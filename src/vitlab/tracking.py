"""Experiment tracking: a local CSV/JSON record always, W&B and TensorBoard when configured
(W&B offline by default).

Lightning loggers are built here so fit, predict and score log to the same runs; W&B media
(tables, images, segmentation masks) go through `log_table` / `log_image` / `log_masks`, which
also write local files where they have a local form.

What a W&B run holds:
- config: the run's resolved Hydra config as composed (`head`, `loss`, ... exactly as on the
  command line), logged once when the run starts; the LightningModule's hyperparameters, which
  Lightning logs at every `fit`, go under `module` (`<scope>/module` inside a `scope`) so they
  never replace a Hydra group of the same name.
- name: the run's command-line overrides (`optimizer.lr=1e-3,loss=seesaw`), see `run_name`.
- metrics logged inside `RunTracker.scope("fold1")` are `fold1/<key>` in W&B and TensorBoard and
  carry a `fold` column in the CSV (one run per experiment; see the FungiCLEF pipeline).
- checkpoints as `model` artifacts when `logger.wandb.log_model` is true (offline too).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from argparse import Namespace
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from vitlab.atomic import atomic_output
from vitlab.config import to_container
from vitlab.data.shards import atomic_write_text
from vitlab.errors import ConfigError
from vitlab.secrets import mask_secrets, mask_tree

log = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")


class ScopedLogging:
    """What `RunTracker.scope` sets on its loggers: a key prefix (W&B, TensorBoard) and extra
    CSV columns, so several trainings in one run (FungiCLEF's folds) keep apart."""

    key_prefix: str = ""
    columns: dict[str, Any]

    def scoped(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        prefix = self.key_prefix
        return {f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()}


class VitlabWandbLogger(ScopedLogging, WandbLogger):
    """Lightning's WandbLogger, except that the module's hyperparameters go under `module`
    (Lightning logs them with `config.update(..., allow_val_change=True)`, which replaced the
    Hydra config's `head` and `loss` groups by the module's arguments of the same names) and
    that metrics logged inside a scope get its prefix."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.columns = {}
        # Lightning always passes `anonymous=None` to wandb.init, for which wandb >= 0.19
        # prints "The anonymous setting has no effect" on every run: pass nothing instead
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from lightning_fabric.utilities.logger import (
            _convert_json_serializable,
            _convert_params,
            _sanitize_callable_params,
        )

        params = _convert_json_serializable(_sanitize_callable_params(_convert_params(params)))
        key = f"{self.key_prefix}/module" if self.key_prefix else "module"
        self.experiment.config.update({key: params}, allow_val_change=True)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(self.scoped(metrics), step)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Only `best.ckpt` becomes the `model` artifact. Lightning would also log `last.ckpt`
        (its own "best" of a monitor-less callback) as a later version with the alias `best`."""
        from vitlab.callbacks import BestCheckpoint

        if isinstance(checkpoint_callback, BestCheckpoint):
            super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Log the fit's checkpoints (Lightning calls this when a fit ends), then forget their
        callbacks: the run's own `finish` finalizes again after their Trainer is gone."""
        try:
            super().finalize(status)
        finally:
            self._checkpoint_callbacks.clear()

    def set_scope(self, prefix: str) -> None:
        self.key_prefix = prefix
        # one checkpoint artifact per scope (fold), not versions of one that overwrite "best"
        self._checkpoint_name = f"model-{self.experiment.id}" + (f"-{prefix}" if prefix else "")


class VitlabCSVLogger(ScopedLogging, CSVLogger):
    """Lightning's CSVLogger with the scope's columns (e.g. `fold`) on every row."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.columns = {}

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({**metrics, **self.columns}, step)


def _tensorboard_logger_class():
    from pytorch_lightning.loggers import TensorBoardLogger

    class VitlabTensorBoardLogger(ScopedLogging, TensorBoardLogger):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.columns = {}

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            super().log_metrics(self.scoped(metrics), step)

    return VitlabTensorBoardLogger


class RunTracker:
    def __init__(self, logger_cfg: DictConfig, run_dir: Path, job_type: str, config: DictConfig):
        check_logger_config(logger_cfg)  # before anything is written
        self.run_dir = run_dir
        set_aside_previous(run_dir / "csv")  # CSVLogger would delete an earlier run's log
        self.csv = VitlabCSVLogger(save_dir=str(run_dir), name="csv", version="")
        self.loggers: list[Logger] = [self.csv]
        self.wandb: VitlabWandbLogger | None = None
        self.tensorboard: Logger | None = None
        tb_cfg = logger_cfg.get("tensorboard") if logger_cfg else None
        if tb_cfg is not None:
            set_aside_previous(run_dir / "tensorboard")  # its events would mix with the new run's
            self.tensorboard = _tensorboard_logger_class()(
                save_dir=str(run_dir), name="tensorboard", version="", **to_container(tb_cfg)
            )
            self.loggers.append(self.tensorboard)
        wandb_cfg = logger_cfg.get("wandb") if logger_cfg else None
        if wandb_cfg and wandb_cfg.get("mode", "offline") != "disabled":
            use_wandb_mode(wandb_cfg.mode)
            self.wandb = VitlabWandbLogger(
                project=wandb_cfg.project,
                entity=wandb_cfg.get("entity"),
                group=wandb_cfg.get("group"),
                tags=list(wandb_cfg.get("tags") or []),
                name=run_name(config),
                mode=wandb_cfg.mode,
                save_dir=str(run_dir),
                job_type=job_type,
                log_model=bool(wandb_cfg.get("log_model", False)),
                # the artifact references the checkpoint in place (no copy in W&B's staging
                # folder): it is not rewritten after its fit ends
                add_file_policy="immutable",
                config=run_config(config),  # once, as composed: never replaced by the module's
            )
            self.wandb.experiment  # noqa: B018 - start the run now: its config and name are set
            self.loggers.append(self.wandb)

    @contextmanager
    def scope(self, prefix: str, **columns: Any) -> Iterator[None]:
        """Inside, metrics go to W&B and TensorBoard as `<prefix>/<key>` (and the module's
        hyperparameters as `<prefix>/module`), to the CSV with `columns` on each row:
        `with tracker.scope("fold1", fold="fold1"): trainer.fit(...)`."""
        scoped = [lg for lg in self.loggers if isinstance(lg, ScopedLogging)]
        for logger in scoped:
            if isinstance(logger, VitlabWandbLogger):
                logger.set_scope(prefix)
            else:
                logger.key_prefix = prefix
            logger.columns = dict(columns)
        try:
            yield
        finally:
            for logger in scoped:
                if isinstance(logger, VitlabWandbLogger):
                    logger.set_scope("")
                else:
                    logger.key_prefix = ""
                logger.columns = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.experiment.summary.update(self.wandb.scoped(metrics))

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        path = self.run_dir / f"{name}.csv"
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
        if self.wandb is not None:
            import wandb

            self.wandb.experiment.log(
                {name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}
            )
        return path

    def log_image(self, name: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.experiment.log({name: wandb.Image(str(path))})

    def log_masks(
        self, name: str, items: Sequence[MaskedImage], class_labels: dict[int, str]
    ) -> None:
        """Images with prediction / ground-truth masks under one W&B key (W&B's mask overlay:
        toggle the masks and classes in the UI)."""
        if self.wandb is None or not items:
            return
        import wandb

        images = []
        for item in items:
            masks = {"prediction": {"mask_data": item.prediction, "class_labels": class_labels}}
            if item.truth is not None:
                masks["ground_truth"] = {"mask_data": item.truth, "class_labels": class_labels}
            images.append(wandb.Image(item.image, masks=masks, caption=item.caption))
        self.wandb.experiment.log({name: images})

    def finish(self, failed: bool = False) -> None:
        """Close the loggers; a failed run ends its W&B run with exit code 1 (shown as failed)."""
        for logger in self.loggers:
            logger.finalize("failed" if failed else "success")
        if self.wandb is not None:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)  # each multirun job gets its own run


@dataclass
class MaskedImage:
    """One image for `RunTracker.log_masks`: RGB array [H, W, 3], label maps [H, W]."""

    image: np.ndarray
    prediction: np.ndarray
    truth: np.ndarray | None
    caption: str


def run_config(config: DictConfig) -> dict[str, Any]:
    """The config as W&B records it: resolved, without Hydra's own node (a Hydra app's config
    has none; one composed by a test or the sweep driver may, with keys only a launcher sets)."""
    if "hydra" in config:
        config = config.copy()
        with open_dict(config):
            del config["hydra"]
    return mask_tree(OmegaConf.to_container(config, resolve=True))  # URL passwords: ***


NAME_EXCLUDED = ("hydra.", "logger", "paths.", "dataset.root", "ckpt_path", "sweep")
"""Overrides left out of run names: where things are, how they are logged, which sweep."""
NAME_LENGTH = 128


def run_name(config: DictConfig) -> str | None:
    """`logger.wandb.name` when set, else the run's command-line overrides as typed
    (`optimizer.lr=0.001,loss=seesaw`; paths, logger and sweep settings left out, floats
    shortened to 4 significant digits), else the experiment's name."""
    explicit = OmegaConf.select(config, "logger.wandb.name")
    if explicit:
        return str(explicit)
    parts = {}  # a key given twice: Hydra applies the last one
    for override in task_overrides():
        if not _excluded_from_name(override):
            part = name_part(override)
            parts.pop(part.partition("=")[0], None)
            parts[part.partition("=")[0]] = part
    name = ",".join(parts.values())
    if len(name) > NAME_LENGTH:
        name = name[: NAME_LENGTH - 3] + "..."
    return name or config.get("experiment_name") or None


def task_overrides() -> list[str]:
    """This run's command-line overrides (Hydra's `hydra.overrides.task`); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _excluded_from_name(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(
        key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".")
        for p in NAME_EXCLUDED
    )


def name_part(override: str) -> str:
    """`+optimizer.amsgrad=true` -> `optimizer.amsgrad=true`; `lr=0.0012345678` ->
    `lr=0.001235`."""
    override = override.lstrip("+")
    key, sep, value = override.partition("=")
    if sep and "." in value:
        try:
            value = f"{float(value):.4g}"
        except ValueError:
            pass
    return f"{key}{sep}{value}"


def check_logger_config(logger_cfg: DictConfig | None) -> None:
    """`logger.tensorboard` needs tensorboard (or tensorboardX) importable; `logger.wandb.mode`
    one of WANDB_MODES. Named before any work."""
    if not logger_cfg:
        return
    wandb_cfg = logger_cfg.get("wandb")
    if wandb_cfg and wandb_cfg.get("mode", "offline") not in WANDB_MODES:
        raise ConfigError(
            f"logger.wandb.mode={wandb_cfg.get('mode')!r}: choose one of {list(WANDB_MODES)}"
        )
    if logger_cfg.get("tensorboard") is not None and not tensorboard_available():
        raise ConfigError(
            "logger.tensorboard: TensorBoard logging needs the `tensorboard` package (a vitlab "
            "dependency: pip install -e .) or `tensorboardX`; or use logger=wandb|csv"
        )


def tensorboard_available() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None


def use_wandb_mode(mode: str) -> None:
    """Set before W&B starts: the mode passed to `wandb.init` alone still let an offline run look
    up W&B's API host (telemetry); with WANDB_MODE in the environment offline means no network."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = mode


@contextmanager
def recorded_run(
    run_dir: Path, summary: dict[str, Any], timer: Any, tracker: RunTracker
) -> Iterator[dict[str, Any]]:
    """The body of a run: `summary.json` says `status: running` while it works (what a killed
    run leaves), then `completed`, or `failed` with the error; W&B gets the matching exit code.
    `timer.seconds` goes in as `stage_seconds`. Under DDP only rank zero writes the file."""
    summary["status"] = "running"
    if rank_zero_only.rank == 0:
        write_json(run_dir / "summary.json", summary)
    failed = False
    try:
        yield summary
    except BaseException as err:
        failed = True
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        summary["status"] = "failed" if failed else "completed"
        summary["stage_seconds"] = dict(timer.seconds)
        if rank_zero_only.rank == 0:  # Lightning knows the rank by now
            write_json(run_dir / "summary.json", summary)
        tracker.finish(failed=failed)


def set_aside_previous(path: Path) -> Path | None:
    """A rerun into the same run folder: move the earlier run's `path` (its checkpoints or CSV
    log, which Lightning would version or delete) to `<name>.previous-<time>` so the new run
    owns the names `best.ckpt` / `last.ckpt` and nothing is lost."""
    if rank_zero_only.rank != 0 or not path.is_dir() or not any(path.iterdir()):
        return None  # DDP: rank zero moves it
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target = path.with_name(f"{path.name}.previous-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.name}.previous-{stamp}-{suffix}")
    os.replace(path, target)
    log.warning("%s holds an earlier run's files: moved to %s", path, target)
    return target


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """`payload` as JSON, atomically, with URL passwords masked (summaries, scores)."""
    atomic_write_text(path, mask_secrets(json.dumps(payload, indent=2, default=str)))
    return path
