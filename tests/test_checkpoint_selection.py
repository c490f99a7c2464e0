"""best.ckpt breaks ties on a saturated metric by validation loss; last.ckpt is the last epoch."""

from __future__ import annotations

from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from vitlab.pipelines.base import build_trainer
from vitlab.safe_load import allowlisted_globals
from vitlab.tracking import RunTracker

F1_BY_EPOCH = [0.5, 0.8, 1.0, 1.0, 1.0, 0.9, 1.0, 0.9]  # saturates at 1.0 from epoch 2
LOSS_BY_EPOCH = [2.0, 1.5, 1.2, 0.9, 0.7, 0.6, 0.8, 0.5]  # lowest loss among the ties: epoch 4


class ScriptedMetrics(pl.LightningModule):
    """Logs a scripted validation curve (what a small, saturating validation set produces)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        epoch = self.current_epoch
        self.log("val/macro_f1", F1_BY_EPOCH[epoch])
        self.log("val/loss", LOSS_BY_EPOCH[epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _cfg(tie_breaker: str | None):
    return OmegaConf.create(
        {
            "fit": {"early_stopping_patience": 0, "tie_breaker": tie_breaker},
            "trainer": {
                "_target_": "pytorch_lightning.Trainer",
                "max_epochs": len(F1_BY_EPOCH),
                "accelerator": "cpu",
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "num_sanity_val_steps": 0,
            },
        }
    )


def _epoch_of(path) -> int:
    with allowlisted_globals():
        return torch.load(path, weights_only=True)["epoch"]


def _fit(tmp_path, tie_breaker):
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    tracker = RunTracker(OmegaConf.create({}), tmp_path, "train", OmegaConf.create({}))
    checkpoints = tmp_path / "checkpoints"
    run = SimpleNamespace(tracker=tracker, run_dir=tmp_path)  # what build_trainer reads
    trainer = build_trainer(_cfg(tie_breaker), run, checkpoints, "val/macro_f1", "max")
    trainer.fit(ScriptedMetrics(), data, data)
    return trainer, checkpoints


def test_ties_on_a_saturated_metric_are_broken_by_validation_loss(tmp_path):
    trainer, checkpoints = _fit(tmp_path, "val/loss")
    assert trainer.checkpoint_callback.best_model_path == str(checkpoints / "best.ckpt")
    assert _epoch_of(checkpoints / "best.ckpt") == 4  # F1 1.0 with the lowest loss
    assert _epoch_of(checkpoints / "last.ckpt") == len(F1_BY_EPOCH) - 1  # the real last epoch
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_without_tie_breaker_the_first_epoch_reaching_the_best_is_kept(tmp_path):
    _, checkpoints = _fit(tmp_path, None)
    assert _epoch_of(checkpoints / "best.ckpt") == 2
    assert _epoch_of(checkpoints / "last.ckpt") == len(F1_BY_EPOCH) - 1
