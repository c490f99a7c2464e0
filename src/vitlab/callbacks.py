"""Lightning callbacks every pipeline's Trainer gets (see `vitlab.pipelines.base.build_trainer`)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


class BestCheckpoint(ModelCheckpoint):
    """`best.ckpt`: the epoch with the best `monitor`; among epochs that tie on it, the one with
    the best `tie_breaker` (lower is better, e.g. `val/loss`).

    A saturating metric (macro F1 reaching 1.0 on a small validation set) would otherwise keep
    the first epoch to reach it, whose probabilities can still be nearly flat.
    """

    def __init__(self, *, tie_breaker: str | None = None, **kwargs: Any):
        kwargs.setdefault("save_top_k", 1)
        if kwargs["save_top_k"] != 1:
            raise ValueError("BestCheckpoint keeps one checkpoint (save_top_k=1)")
        super().__init__(**kwargs)
        self.tie_breaker = tie_breaker if tie_breaker != kwargs.get("monitor") else None
        self.best_tie_score: torch.Tensor | None = None

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or self.tie_breaker is None or not self.best_k_models:
            return False
        best = self.best_k_models[self.kth_best_model_path]
        tie = trainer.callback_metrics.get(self.tie_breaker)
        better = bool(
            torch.equal(current.detach().cpu().float(), best.detach().cpu().float())
            and tie is not None
            and (self.best_tie_score is None or float(tie) < float(self.best_tie_score))
        )
        return trainer.strategy.reduce_boolean_decision(better)

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        if self.tie_breaker is not None:
            tie = monitor_candidates.get(self.tie_breaker)
            self.best_tie_score = None if tie is None else tie.detach().cpu().clone()
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_score": self.best_tie_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_tie_score = state_dict.get("best_tie_score")
        super().load_state_dict(self._carried_over(state_dict))

    def _carried_over(self, state: dict[str, Any]) -> dict[str, Any]:
        """Resumed into a new run folder (train.py ckpt_path=...): copy the earlier run's
        best.ckpt here and keep its score, so the best epoch is chosen as in an uninterrupted
        run (Lightning would otherwise forget the score and never write into this folder's
        best.ckpt until the next epoch). The earlier run's files are only read."""
        old_best = state.get("best_model_path")
        if not (self.dirpath and old_best and Path(old_best).is_file()):
            return state
        if Path(state.get("dirpath") or "").resolve() == Path(self.dirpath).resolve():
            return state
        new_best = Path(self.dirpath) / Path(old_best).name
        new_best.parent.mkdir(parents=True, exist_ok=True)
        partial = new_best.with_name(new_best.name + ".partial")
        shutil.copyfile(old_best, partial)
        partial.replace(new_best)
        score = state.get("best_model_score")
        return {
            **state,
            "dirpath": self.dirpath,
            "best_model_path": str(new_best),
            "kth_best_model_path": str(new_best),
            "kth_value": score,
            "best_k_models": {str(new_best): score},
            "last_model_path": "",
        }


def last_epoch_checkpoint(dirpath: str) -> ModelCheckpoint:
    """`last.ckpt` rewritten after every epoch. (`save_last=True` on the best-checkpoint callback
    rewrites it only when a new best is saved, so it lagged behind the real last epoch.)"""
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )


def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def epoch_line(
    epoch: int,
    max_epochs: int | None,
    metrics: dict[str, float],
    epoch_seconds: float,
    samples: int,
    mean_epoch_seconds: float,
) -> str:
    """`epoch 3/40 | train/loss 1.234 val/loss 1.100 | 2.1 s/epoch, 57 samples/s | ETA 1m17s`"""
    shown = " ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))
    rate = f"{epoch_seconds:.1f} s/epoch, {samples / max(epoch_seconds, 1e-9):.1f} samples/s"
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    line = f"epoch {epoch + 1}{total} | {shown} | {rate}"
    if max_epochs and max_epochs > 0:
        line += f" | ETA {format_duration(mean_epoch_seconds * (max_epochs - epoch - 1))}"
    return line


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (dict, tuple or tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values if isinstance(values, list | tuple) else list(values):
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    return 0


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if isinstance(value, torch.Tensor) and value.numel() == 1
    }


class EpochLog(pl.Callback):
    """One log line per training epoch (metrics, rate, ETA), whatever the progress bar does:
    a run whose output goes to a file shows its progress (Hydra writes it to `<run>/*.log`).

    Metrics logged per step (GroupViT's loss terms) are shown as their mean over the epoch, not
    the last step's value; epoch-level metrics as logged. The ETA assumes every remaining epoch
    runs (early stopping can end sooner)."""

    def __init__(self, logger_name: str = "vitlab.progress"):
        self.progress_log = logging.getLogger(logger_name)
        self._epoch_start = 0.0
        self._durations: list[float] = []
        self._samples = 0
        self._step_values: dict[str, list[float]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._samples = 0
        self._step_values = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self._samples += batch_size_of(batch)  # counted: a streaming loader has no length
        for name, value in scalar_metrics(trainer).items():
            if name.startswith("train/"):
                self._step_values.setdefault(name, []).append(value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._epoch_start
        self._durations.append(seconds)
        metrics = scalar_metrics(trainer)
        for name, values in self._step_values.items():
            # a per-step metric still holds its last step's value: show the epoch's mean (an
            # epoch-level metric has changed since the last step: keep it as logged)
            if name in metrics and metrics[name] == values[-1]:
                metrics[name] = sum(values) / len(values)
        mean = sum(self._durations[-5:]) / len(self._durations[-5:])  # recent epochs
        self.progress_log.info(
            epoch_line(
                trainer.current_epoch, trainer.max_epochs, metrics, seconds, self._samples, mean
            )
        )


def trained_checkpoint(trainer: pl.Trainer, checkpoint_dir: Path) -> Path:
    """The checkpoint a pipeline continues with: best.ckpt, else last.ckpt, else (with
    `fast_dev_run`, where checkpoint callbacks do not save) the trained state saved now as
    final.ckpt."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.best_model_path:
        return Path(callback.best_model_path)
    if (checkpoint_dir / "last.ckpt").is_file():
        return checkpoint_dir / "last.ckpt"
    final = checkpoint_dir / "final.ckpt"
    trainer.save_checkpoint(final, weights_only=False)  # a full checkpoint: resumable
    return final
