"""Multi-label fit data: single-plant embeddings (one species each) mixed with collage
embeddings (a set of species each), as (embedding, multi-hot row) batches.

Each training epoch draws as many samples as there are single images and collages together, a
share `proportion` of them collages; which ones depends only on (seed, epoch), so a resumed run
sees the batches of the uninterrupted one. Validation reads every single image and collage once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitlab.data.shards import ShardedStage, arrow_to_embeddings
from vitlab.errors import ConfigError
from vitlab.pipelines.plantclef.fit import EmbeddingSplits

log = logging.getLogger(__name__)


class LabelSetDataset(Dataset):
    """Embeddings with a set of class indices each (a one-element set for a single image)."""

    def __init__(self, x: np.ndarray, labels: list[np.ndarray]):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.labels[i]


def multi_hot_collate(num_classes: int):
    def collate(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([item[0] for item in items]))
        y = torch.zeros(len(items), num_classes)
        for row, (_, labels) in enumerate(items):
            y[row, torch.as_tensor(labels, dtype=torch.long)] = 1.0
        return x, y

    return collate


class MixedSampler(Sampler[int]):
    """Indices into [singles..., collages...]: `len(self)` draws per epoch, a share `proportion`
    from the collages, each pool in a fresh permutation (cycled when drawn more than once)."""

    def __init__(self, n_single: int, n_collage: int, proportion: float, seed: int):
        self.n_single, self.n_collage = n_single, n_collage
        self.proportion = proportion if n_collage else 0.0
        if not n_single:
            self.proportion = 1.0
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_single + self.n_collage

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n_from_collages = int(round(self.proportion * len(self)))
        singles = _cycled(rng, self.n_single, len(self) - n_from_collages)
        collages = self.n_single + _cycled(rng, self.n_collage, n_from_collages)
        order = np.concatenate([singles, collages])
        return iter(order[rng.permutation(len(order))].tolist())


def _cycled(rng: np.random.Generator, pool: int, draws: int) -> np.ndarray:
    if not draws:
        return np.zeros(0, dtype=np.int64)
    rounds = -(-draws // pool)
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:draws]


@dataclass
class MultiLabelSplits:
    """Single-image splits (`singles`, the label map's owner) plus collages by split."""

    singles: EmbeddingSplits
    collages: dict[str, tuple[np.ndarray, list[np.ndarray]]]
    proportion: float
    seed: int = 0

    @property
    def species_ids(self) -> list[int]:
        return self.singles.species_ids

    @property
    def dim(self) -> int:
        return self.singles.dim

    @property
    def counts(self) -> dict[str, int]:
        return {
            tag: n + len(self.collages.get(tag, ((), []))[1])
            for tag, n in self.singles.counts.items()
        }

    @property
    def report(self) -> dict[str, Any]:
        collages = {f"collages_{t}": len(labels) for t, (_, labels) in self.collages.items()}
        return {**self.singles.report, **collages, "collage_proportion": self.proportion}

    def images_loader(self, tag: str, batch_size: int) -> DataLoader | None:
        """The single images of a split (for the per-image accuracy of the best checkpoint)."""
        return self.singles.loader(tag, batch_size, shuffle=False)

    def loader(self, tag: str, batch_size: int, shuffle: bool) -> DataLoader | None:
        x_single, y_single = self.singles.arrays.get(tag, (np.zeros((0, self.dim)), []))
        x_collage, sets = self.collages.get(tag, (np.zeros((0, self.dim), np.float32), []))
        if not len(x_single) + len(sets):
            return None
        labels = [np.array([y]) for y in np.asarray(y_single)] + list(sets)
        x = np.concatenate([x_single, x_collage]).astype(np.float32, copy=False)
        dataset = LabelSetDataset(x, labels)
        proportion = self.proportion if shuffle else 0.0
        sampler = MixedSampler(len(x_single), len(sets), proportion, self.seed) if shuffle else None
        collate = multi_hot_collate(len(self.species_ids))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def load_collage_splits(
    singles: EmbeddingSplits, collages: ShardedStage, proportion: float, seed: int = 0
) -> MultiLabelSplits:
    """The collage embeddings by split, their species restricted to the label map (a species
    the filter dropped is removed from a collage's set)."""
    if singles.streaming:
        raise ConfigError("collages.enabled=true needs fit.loader=memory")
    table = collages.read_table(["species_ids", "learn_tag", "embedding"])
    tags = np.asarray(table.column("learn_tag").to_pylist())
    embeddings = arrow_to_embeddings(table.column("embedding"))
    index_of = {s: i for i, s in enumerate(singles.species_ids)}
    sets = [
        np.array(sorted(index_of[s] for s in species if s in index_of), dtype=np.int64)
        for species in table.column("species_ids").to_pylist()
    ]
    by_split = {}
    for tag in np.unique(tags):
        rows = np.flatnonzero(tags == tag)
        by_split[str(tag)] = (embeddings[rows], [sets[i] for i in rows])
    splits = MultiLabelSplits(singles, by_split, proportion, seed)
    log.info("fit data with collages: %s", splits.report)
    return splits
