"""Fit: train a head on cached embeddings with Lightning.

The species filter (`min_images_per_species`, counted on training rows) defines the label map,
species id <-> class index, which is saved in the checkpoint and as `label_map.json` beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitlab.data.shards import ShardedStage, arrow_to_embeddings
from vitlab.metrics.classification import accuracy, macro_f1
from vitlab.tasks.classification import EmbeddingClassifier

log = logging.getLogger(__name__)
LABEL_MAP_FILE = "label_map.json"


@dataclass
class EmbeddingSplits:
    species_ids: list[int]
    x: dict[str, np.ndarray] = field(default_factory=dict)
    y: dict[str, np.ndarray] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.x["train"].shape[1])


def species_filter(train_species: np.ndarray, min_images: int) -> list[int]:
    """Species with at least `min_images` training images, sorted by id (the class order)."""
    ids, counts = np.unique(train_species, return_counts=True)
    return [int(s) for s in ids[counts >= min_images]]


def load_splits(stage: ShardedStage, min_images_per_species: int) -> EmbeddingSplits:
    table = stage.read_table(["species_id", "learn_tag", "embedding"])
    embeddings = arrow_to_embeddings(table.column("embedding"))
    species = table.column("species_id").to_numpy()
    tags = np.asarray(table.column("learn_tag").to_pylist())
    kept = species_filter(species[tags == "train"], min_images_per_species)
    if not kept:
        raise ValueError(
            f"dataset.min_images_per_species={min_images_per_species} leaves no species to train on"
        )
    index_of = {s: i for i, s in enumerate(kept)}
    splits = EmbeddingSplits(species_ids=kept)
    known = np.isin(species, kept)
    for tag in ("train", "val", "test"):
        rows = (tags == tag) & known
        splits.x[tag] = embeddings[rows]
        splits.y[tag] = np.array([index_of[int(s)] for s in species[rows]], dtype=np.int64)
    splits.report = {
        "species_total": int(len(np.unique(species))),
        "species_kept": len(kept),
        "images_dropped_by_species_filter": int((~known).sum()),
        **{f"images_{tag}": int(len(splits.y[tag])) for tag in ("train", "val", "test")},
    }
    log.info("fit data: %s", splits.report)
    return splits


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


@dataclass
class FitResult:
    best_checkpoint: Path
    last_checkpoint: Path | None
    metrics: dict[str, float]
    module: EmbeddingClassifier


def fit_head(
    splits: EmbeddingSplits,
    module: EmbeddingClassifier,
    trainer: pl.Trainer,
    batch_size: int,
    checkpoint_dir: Path,
) -> FitResult:
    has_val = len(splits.y["val"]) > 0
    train_loader = _loader(splits.x["train"], splits.y["train"], batch_size, shuffle=True)
    val_loader = _loader(splits.x["val"], splits.y["val"], batch_size, False) if has_val else None
    trainer.fit(module, train_loader, val_loader)
    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else None
    last = Path(ckpt_cb.last_model_path) if ckpt_cb and ckpt_cb.last_model_path else None
    if best is None:
        best = checkpoint_dir / "final.ckpt"
        trainer.save_checkpoint(best)
    write_label_map(best.parent, splits.species_ids)
    best_module = EmbeddingClassifier.load_from_checkpoint(best, map_location="cpu")
    # callback_metrics are the last epoch's; the *_images/* metrics below are the best checkpoint's
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        metrics[f"best/{ckpt_cb.monitor}"] = float(ckpt_cb.best_model_score)
    for tag in ("val", "test"):
        if len(splits.y[tag]):
            pred = best_module.predict_labels(splits.x[tag])
            metrics[f"{tag}_images/acc"] = accuracy(splits.y[tag], pred)
            metrics[f"{tag}_images/macro_f1"] = macro_f1(splits.y[tag], pred)
    return FitResult(best, last, metrics, best_module)


def write_label_map(directory: Path, species_ids: list[int]) -> Path:
    path = directory / LABEL_MAP_FILE
    path.write_text(json.dumps({"species_ids": species_ids}))
    return path


def read_label_map(checkpoint: Path) -> list[int] | None:
    path = Path(checkpoint).parent / LABEL_MAP_FILE
    return json.loads(path.read_text())["species_ids"] if path.is_file() else None
