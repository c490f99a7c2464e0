"""Experiment tracking: a local CSV/JSON record always, W&B when configured (offline default).

Lightning loggers are built here so fit, predict and score log to the same runs; W&B media
(tables, images) go through `log_table` / `log_image`, which also write local files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from vitlab.atomic import atomic_output
from vitlab.data.shards import atomic_write_text

log = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")


class RunTracker:
    def __init__(self, logger_cfg: DictConfig, run_dir: Path, job_type: str, config: DictConfig):
        self.run_dir = run_dir
        set_aside_previous(run_dir / "csv")  # CSVLogger would delete an earlier run's log
        self.loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
        self.wandb: WandbLogger | None = None
        wandb_cfg = logger_cfg.get("wandb") if logger_cfg else None
        if wandb_cfg and wandb_cfg.get("mode", "offline") != "disabled":
            use_wandb_mode(wandb_cfg.mode)
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

    def finish(self, failed: bool = False) -> None:
        """Close the loggers; a failed run ends its W&B run with exit code 1 (shown as failed)."""
        for logger in self.loggers:
            logger.finalize("failed" if failed else "success")
        if self.wandb is not None:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)  # each multirun job gets its own run


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
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    return path
