"""Per-image embedding rows held in memory (embedding + metadata vectors + the metadata frame)
and the Dataset / DataLoader that train a head on them in whole-batch indexing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class Rows:
    """Aligned per-image arrays of one subset of the data."""

    frame: pd.DataFrame
    embedding: np.ndarray
    metadata: np.ndarray

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(
            self.frame[mask].reset_index(drop=True), self.embedding[mask], self.metadata[mask]
        )


class RowsDataset(Dataset):
    def __init__(self, rows: Rows, targets: dict[str, np.ndarray]):
        self.tensors = {
            "embedding": _tensor(rows.embedding),
            "metadata": _tensor(rows.metadata),
            **{k: _tensor(v) for k, v in targets.items()},
        }

    def __len__(self) -> int:
        return len(self.tensors["embedding"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch in one indexing per tensor (DataLoader uses this when present); the
        per-row path would dominate the cost of training a head on embeddings."""
        index = torch.as_tensor(indices)
        return {k: v[index] for k, v in self.tensors.items()}


def batch_loader(
    dataset: RowsDataset,
    batch_size: int,
    shuffle: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=_already_batched,
    )


def _already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Shares memory with `array`; a read-only array (e.g. from Arrow) is copied first, as torch
    cannot share it safely."""
    return torch.from_numpy(np.require(array, requirements="W"))
