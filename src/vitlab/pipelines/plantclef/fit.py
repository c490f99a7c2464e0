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
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from vitlab.atomic import atomic_write_text
from vitlab.callbacks import trained_checkpoint
from vitlab.data.epoch_shuffle import EpochShuffle
from vitlab.data.shards import ShardedStage, arrow_to_embeddings
from vitlab.data.streaming import ParquetStream
from vitlab.errors import ConfigError
from vitlab.metrics.classification import accuracy, macro_f1
from vitlab.safe_load import fit_resumable, load_lightning_module
from vitlab.tasks.classification import EmbeddingClassifier

log = logging.getLogger(__name__)
LABEL_MAP_FILE = "label_map.json"


SPLITS = ("train", "val", "test")
LOADERS = ("memory", "streaming")


def species_filter(train_species: np.ndarray, min_images: int) -> list[int]:
    """Species with at least `min_images` training images, sorted by id (the class order)."""
    ids, counts = np.unique(train_species, return_counts=True)
    return [int(s) for s in ids[counts >= min_images]]


@dataclass
class EmbeddingSplits:
    """Labelled embeddings by split (`learn_tag`), restricted to the species of the label map.

    `loader="memory"` holds them as tensors (the common case for heads); `loader="streaming"`
    reads the shards batch by batch (`ParquetStream`) for data larger than memory. Either way
    `loader(tag, ...)` gives (x, y) batches."""

    species_ids: list[int]
    dim: int
    counts: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    shard_paths: list[Path] = field(default_factory=list)
    seed: int = 0

    @property
    def streaming(self) -> bool:
        return not self.arrays

    def images_loader(self, tag: str, batch_size: int) -> DataLoader | None:
        """The images of a split in order (the per-image accuracy of the best checkpoint)."""
        return self.loader(tag, batch_size, shuffle=False)

    def loader(self, tag: str, batch_size: int, shuffle: bool) -> DataLoader | None:
        if not self.counts.get(tag):
            return None
        if not self.streaming:
            x, y = self.arrays[tag]
            dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
            sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        stream = ParquetStream(
            self.shard_paths,
            batch_size=batch_size,
            shuffle=shuffle,
            columns=["species_id", "learn_tag", "embedding"],
            seed=self.seed,
        )
        return DataLoader(LabelledBatches(stream, tag, self.species_ids), batch_size=None)


class LabelledBatches(IterableDataset):
    """(embedding, class index) batches of one split from a `ParquetStream`."""

    def __init__(self, stream: ParquetStream, tag: str, species_ids: list[int]):
        super().__init__()
        self.stream, self.tag = stream, tag
        self.species = np.asarray(species_ids, dtype=np.int64)  # sorted: searchsorted maps
        self.epochs_started = 0

    def __iter__(self):
        # Lightning calls set_epoch on samplers only: a new pass is a new epoch's shuffle order
        self.stream.set_epoch(self.epochs_started)
        self.epochs_started += 1
        for batch in self.stream:
            species = batch["species_id"].astype(np.int64)
            index = np.searchsorted(self.species, species).clip(0, len(self.species) - 1)
            keep = (batch["learn_tag"] == self.tag) & (self.species[index] == species)
            if keep.any():
                yield torch.from_numpy(batch["embedding"][keep]), torch.from_numpy(index[keep])


def load_splits(
    stage: ShardedStage, min_images_per_species: int, loader: str = "memory", seed: int = 0
) -> EmbeddingSplits:
    if loader not in LOADERS:
        raise ValueError(f"fit.loader={loader!r} is not one of {list(LOADERS)}")
    labels = stage.read_table(["species_id", "learn_tag"])  # small even for 1.4 M rows
    species = labels.column("species_id").to_numpy()
    tags = np.asarray(labels.column("learn_tag").to_pylist())
    kept = species_filter(species[tags == "train"], min_images_per_species)
    if not kept:  # the metadata check passed, but images were missing or corrupt
        raise ConfigError(
            f"dataset.min_images_per_species={min_images_per_species} leaves no species to train "
            "on among the prepared images (see prepare_report: missing or corrupt images)"
        )
    known = np.isin(species, kept)
    counts = {tag: int(((tags == tag) & known).sum()) for tag in SPLITS}
    report = {
        "species_total": int(len(np.unique(species))),
        "species_kept": len(kept),
        "images_dropped_by_species_filter": int((~known).sum()),
        **{f"images_{tag}": counts[tag] for tag in SPLITS},
        "loader": loader,
    }
    log.info("fit data: %s", report)
    dim = int(stage.manifest.get("report", {}).get("dim") or 0) or _dim_of(stage)
    splits = EmbeddingSplits(kept, dim, counts, report, seed=seed)
    if loader == "streaming":
        splits.shard_paths = stage.shard_paths()
        return splits
    embeddings = arrow_to_embeddings(stage.read_table(["embedding"]).column("embedding"))
    index_of = {s: i for i, s in enumerate(kept)}
    for tag in SPLITS:
        rows = (tags == tag) & known
        y = np.array([index_of[int(s)] for s in species[rows]], dtype=np.int64)
        splits.arrays[tag] = (embeddings[rows], y)
    return splits


def _dim_of(stage: ShardedStage) -> int:
    return int(pq.read_schema(stage.shard_paths()[0]).field("embedding").type.list_size)


@dataclass
class FitResult:
    best_checkpoint: Path
    last_checkpoint: Path | None
    metrics: dict[str, float]
    module: EmbeddingClassifier


def evaluate(module: EmbeddingClassifier, loader: DataLoader) -> dict[str, float]:
    truth, pred = [], []
    for x, y in loader:
        pred.append(module.predict_labels(x.numpy()))
        truth.append(y.numpy())
    truth_all, pred_all = np.concatenate(truth), np.concatenate(pred)
    return {"acc": accuracy(truth_all, pred_all), "macro_f1": macro_f1(truth_all, pred_all)}


def fit_head(
    splits: Any,
    module: EmbeddingClassifier,
    trainer: pl.Trainer,
    batch_size: int,
    checkpoint_dir: Path,
    resume_from: str | None = None,
) -> FitResult:
    """Fit `module` on `splits` (EmbeddingSplits, or MultiLabelSplits with collages) and
    score the best checkpoint on the single images of val and test."""
    train_loader = splits.loader("train", batch_size, shuffle=True)
    val_loader = splits.loader("val", batch_size, shuffle=False)
    fit_resumable(trainer, module, train_loader, val_loader, resume_from)
    ckpt_cb = trainer.checkpoint_callback
    last = checkpoint_dir / "last.ckpt" if (checkpoint_dir / "last.ckpt").is_file() else None
    best = trained_checkpoint(trainer, checkpoint_dir)
    write_label_map(best.parent, splits.species_ids)
    best_module = load_lightning_module(EmbeddingClassifier, best)
    # callback_metrics are the last epoch's; the *_images/* metrics below are the best checkpoint's
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        metrics[f"best/{ckpt_cb.monitor}"] = float(ckpt_cb.best_model_score)
    for tag in ("val", "test"):
        loader = splits.images_loader(tag, 4096)
        if loader is not None:
            for name, value in evaluate(best_module, loader).items():
                metrics[f"{tag}_images/{name}"] = value
    return FitResult(best, last, metrics, best_module)


def write_label_map(directory: Path, species_ids: list[int]) -> Path:
    path = directory / LABEL_MAP_FILE
    atomic_write_text(path, json.dumps({"species_ids": species_ids}))
    return path


def read_label_map(checkpoint: Path) -> list[int] | None:
    path = Path(checkpoint).parent / LABEL_MAP_FILE
    return json.loads(path.read_text())["species_ids"] if path.is_file() else None
