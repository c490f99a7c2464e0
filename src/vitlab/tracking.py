"""Experiment tracking: a local CSV/JSON record always, W&B when configured (offline default).

Lightning loggers are built here so fit, predict and score log to the same runs; W&B media
(tables, images) go through `log_table` / `log_image`, which also write local files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from vitlab.data.shards import atomic_write_text

log = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")


class RunTracker:
    def __init__(self, logger_cfg: DictConfig, run_dir: Path, job_type: str, config: DictConfig):
        self.run_dir = run_dir
        self.loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
        self.wandb: WandbLogger | None = None
        wandb_cfg = logger_cfg.get("wandb") if logger_cfg else None
        if wandb_cfg and wandb_cfg.get("mode", "offline") != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = WandbLogger(
                project=wandb_cfg.project,
                entity=wandb_cfg.get("entity"),
                group=wandb_cfg.get("group"),
                tags=list(wandb_cfg.get("tags") or []),
                name=wandb_cfg.get("name"),
                mode=wandb_cfg.mode,
                save_dir=str(run_dir),
                job_type=job_type,
            )
            self.wandb.log_hyperparams(OmegaConf.to_container(config, resolve=True))
            self.loggers.append(self.wandb)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.experiment.summary.update(metrics)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
        path = self.run_dir / f"{name}.csv"
        with open(path, "w", newline="") as handle:
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

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finalize("success")
        if self.wandb is not None:
            import wandb

            wandb.finish()  # each run of a multirun gets its own W&B run


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    return path
