"""A classification head trained on precomputed embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score

from vitlab import optim
from vitlab.config import instantiate_node
from vitlab.losses import LabelStats, build_loss
from vitlab.losses.multilabel import is_multilabel, multi_hot
from vitlab.metrics.classification import MacroF1


class EmbeddingClassifier(pl.LightningModule):
    """Everything needed to rebuild the head is in the hyperparameters, so
    `EmbeddingClassifier.load_from_checkpoint(path)` restores it with its label map."""

    def __init__(
        self,
        head: dict[str, Any],
        loss: dict[str, Any],
        in_features: int,
        species_ids: list[int],
        optimizer: dict[str, Any] | str | None = None,
        scheduler: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        class_counts: list[int] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
    ):
        """`optimizer`/`scheduler`: `_partial_` nodes (configs/optimizer, configs/scheduler).
        `class_counts`: the training split's count per class index (for
        `loss.counts_from=train`); None in checkpoints written before it was recorded.
        `lr`/`weight_decay`: only in checkpoints written before the optimizer group (their
        `optimizer` is a name); such checkpoints predict but cannot be trained further."""
        super().__init__()
        self.save_hyperparameters()
        self.head = instantiate_node(
            head, "head.model", in_features=in_features, num_classes=len(species_ids)
        )
        self.loss_fn = build_loss(loss, LabelStats(len(species_ids), class_counts))
        self.species_ids = list(species_ids)
        # a sigmoid per species (a multi-label loss: BCE, ASL, focal BCE) or a softmax
        self.multilabel = is_multilabel(self.loss_fn)
        # multi-label decision thresholds chosen on validation data after training
        # (`vitlab.inference.multilabel.choose_thresholds`), saved in the checkpoint
        self.decision: dict[str, Any] | None = None
        # epoch-level validation metrics, summed over DDP ranks (not saved in checkpoints)
        n = len(species_ids)
        if self.multilabel:  # macro over species, each sigmoid thresholded at 0.5
            self.val_macro_f1 = MultilabelF1Score(n, average="macro", validate_args=False)
        else:
            self.val_acc = MulticlassAccuracy(n, average="micro", validate_args=False)
            self.val_macro_f1 = MacroF1(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.head(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        out = self.head(x)
        loss = self.loss_fn(out, y)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        if self.multilabel:
            probs, truth = torch.sigmoid(out.float()), multi_hot(y, out.shape[-1]).long()
            self.val_macro_f1.update(probs, truth)
            self.log("val/macro_f1", self.val_macro_f1, on_step=False, on_epoch=True, prog_bar=True)
            return
        pred = out.argmax(dim=-1)
        self.val_acc.update(pred, y)
        self.val_macro_f1.update(pred, y)
        # Lightning computes (synced across ranks) and resets the metric objects each epoch
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/macro_f1", self.val_macro_f1, on_step=False, on_epoch=True, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.decision is not None:
            checkpoint["decision"] = self.decision

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.decision = checkpoint.get("decision")

    def configure_optimizers(self) -> Any:
        optimizer = optim.require_node(self.hparams.optimizer, "optimizer")
        return optim.configure_optimizers(
            optimizer, self.hparams.scheduler, self.parameters(), self.trainer
        )

    @torch.inference_mode()
    def predict_labels(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        self.eval()
        out = [
            self.head(torch.as_tensor(x[i : i + batch_size])).argmax(-1).numpy()
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
