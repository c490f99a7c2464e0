"""FungiCLEF head training: embeddings + metadata -> species (+ auxiliary targets)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from vitlab import optim
from vitlab.config import instantiate_node
from vitlab.losses import LabelStats, build_loss
from vitlab.metrics.classification import MacroF1

IGNORE = -100  # auxiliary target unknown for this row (e.g. the genus of an unknown species)


class FungiClassifier(pl.LightningModule):
    def __init__(
        self,
        head: dict[str, Any],
        loss: dict[str, Any],
        embed_dim: int,
        meta_groups: dict[str, tuple[int, int]],
        species_ids: list[int],
        class_counts: list[int],
        poisonous_classes: list[int],
        aux_sizes: dict[str, int],
        aux_weights: dict[str, float],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ):
        """`optimizer`/`scheduler`: `_partial_` nodes (configs/optimizer, configs/scheduler)."""
        super().__init__()
        self.save_hyperparameters()
        active_aux = {k: v for k, v in aux_sizes.items() if aux_weights.get(k, 0) > 0}
        # every FungiCLEF head takes these runtime arguments (see `vitlab.models.heads`)
        self.head = instantiate_node(
            head,
            "head.model",
            embed_dim=embed_dim,
            meta_groups=meta_groups,
            num_classes=len(species_ids),
            aux_outputs=active_aux,
        )
        self.loss_fn = build_loss(
            loss, LabelStats(len(species_ids), class_counts, poisonous_classes)
        )
        self.aux_weights = {k: float(aux_weights[k]) for k in active_aux}
        # epoch-level validation metrics over class indices (the unknown class -1, when in the
        # label space, is an index like any other), summed over DDP ranks, not checkpointed
        self.val_acc = MulticlassAccuracy(len(species_ids), average="micro", validate_args=False)
        self.val_macro_f1 = MacroF1(len(species_ids))

    def forward(self, embedding: torch.Tensor, metadata: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(embedding, metadata)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        out = self(batch["embedding"], batch["metadata"])
        terms = {"species": self.loss_fn(out["species"], batch["species"])}
        for name, weight in self.aux_weights.items():
            target = batch[name]
            if name == "poisonous":
                terms[name] = weight * F.binary_cross_entropy_with_logits(
                    out[name].squeeze(1), target.float()
                )
            elif (target != IGNORE).any():
                terms[name] = weight * F.cross_entropy(out[name], target, ignore_index=IGNORE)
        return sum(terms.values()), terms, out["species"]

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss, terms, _ = self._losses(batch)
        n = len(batch["species"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        loss, _, logits = self._losses(batch)
        n = len(logits)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        pred, truth = logits.argmax(-1), batch["species"]
        self.val_acc.update(pred, truth)
        self.val_macro_f1.update(pred, truth)
        # Lightning computes (synced across ranks) and resets the metric objects each epoch
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/macro_f1", self.val_macro_f1, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        return optim.configure_optimizers(
            self.hparams.optimizer, self.hparams.scheduler, self.parameters(), self.trainer
        )

    @torch.inference_mode()
    def predict_logits(
        self, embedding: np.ndarray, metadata: np.ndarray, batch_size: int = 4096
    ) -> np.ndarray:
        self.eval()
        out = [
            self(
                torch.as_tensor(embedding[i : i + batch_size]),
                torch.as_tensor(metadata[i : i + batch_size]),
            )["species"]
            .float()
            .numpy()
            for i in range(0, len(embedding), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.hparams.species_ids)))
