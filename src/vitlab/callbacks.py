"""Lightning callbacks every pipeline's Trainer gets (see `vitlab.pipelines.base.build_trainer`)."""

from __future__ import annotations

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
        super().load_state_dict(state_dict)


def last_epoch_checkpoint(dirpath: str) -> ModelCheckpoint:
    """`last.ckpt` rewritten after every epoch. (`save_last=True` on the best-checkpoint callback
    rewrites it only when a new best is saved, so it lagged behind the real last epoch.)"""
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
