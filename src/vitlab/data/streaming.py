"""Streaming Parquet loader for data larger than memory.

`ParquetStream` is a torch `IterableDataset` over Parquet shards. The unit of work is one row
group of one file; units are dealt round-robin to the (DDP rank, DataLoader worker) pairs, so each
row is delivered exactly once per epoch across all workers and ranks. Shuffling is two-level and
costs one copy of each row: the unit order is permuted per epoch (seeded by seed + epoch,
identical on every rank), then each row group's rows are permuted once (one gather per column)
and batches are slices of it; a batch holds rows of one row group, or of two consecutive ones
where a group's last rows carry over. So a batch is as random as a row group: PlantCLEF's prepare
stage deals the images to shards in a fixed random order for that reason. It yields whole
batches (a dict of numpy arrays per column, an embedding column as (B, D) float32), so use it
with `DataLoader(stream, batch_size=None)`: the per-row Python work of a row-wise dataset would
dominate the cost of reading embeddings. For precomputed embeddings `num_workers=0` is fastest
(the next row group is read in a background thread; worker processes add IPC of every batch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vitlab.data.loading import prefetch
from vitlab.data.shards import arrow_to_embeddings


@dataclass(frozen=True)
class ReadUnit:
    path: str
    row_group: int
    rows: int


def list_units(paths: Sequence[str | Path]) -> list[ReadUnit]:
    """Every (file, row group) of the shards, in a fixed order."""
    units = []
    for path in sorted(str(p) for p in paths):
        meta = pq.ParquetFile(path).metadata
        units += [ReadUnit(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return units


def distributed_position() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def units_for(units: Sequence[ReadUnit], consumer: int, consumers: int) -> list[ReadUnit]:
    """Round-robin share of one consumer (rank * workers + worker) among `consumers`."""
    return list(units[consumer::consumers])


def _columns_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_fixed_size_list(column.type):
            out[name] = arrow_to_embeddings(column)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


Batch = dict[str, np.ndarray]


def _concat(a: Batch | None, b: Batch) -> Batch:
    return b if a is None else {k: np.concatenate([a[k], b[k]]) for k in b}


def _take(batch: Batch, index: np.ndarray | slice) -> Batch:
    return {k: v[index] for k, v in batch.items()}


def _length(batch: Batch | None) -> int:
    return 0 if batch is None else len(next(iter(batch.values())))


class ParquetStream(IterableDataset):
    def __init__(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 256,
        columns: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if not paths:
            raise ValueError("ParquetStream needs at least one Parquet file")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.units = list_units(paths)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.columns = list(columns) if columns else None
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call at each epoch start (as with DistributedSampler) for a new shuffle order."""
        self.epoch = epoch

    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)

    def _my_units(self) -> list[ReadUnit]:
        rank, world = distributed_position()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        units = list(self.units)
        if self.shuffle:  # same permutation on every rank and worker: the split stays exact
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(units))
            units = [units[i] for i in order]
        return units_for(units, rank * workers + worker, world * workers)

    def _unit_batches(self, units: Sequence[ReadUnit]) -> Iterator[Batch]:
        for unit in units:
            table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=self.columns)
            yield _columns_to_numpy(table)

    def _permuted(self, pieces: Iterator[Batch], rng: np.random.Generator) -> Iterator[Batch]:
        """Each row group with its rows in a new random order: one gather per column, the only
        copy of the rows (batches are then slices of it)."""
        for piece in pieces:
            order = rng.permutation(_length(piece))
            yield {key: values[order] for key, values in piece.items()}

    def _sequential_batches(self, pieces: Iterator[Batch]) -> Iterator[Batch]:
        """Batches in file order; whole batches inside a row group are views, not copies."""
        carry: Batch | None = None  # rows short of a batch, carried to the next piece
        for piece in pieces:
            start = 0
            if carry is not None:
                start = self.batch_size - _length(carry)
                carry = _concat(carry, _take(piece, slice(0, start)))
                if _length(carry) < self.batch_size:
                    continue
                yield carry
                carry = None
            n = _length(piece)
            end = start + (n - start) // self.batch_size * self.batch_size
            for s in range(start, end, self.batch_size):
                yield _take(piece, slice(s, s + self.batch_size))
            if end < n:
                carry = _take(piece, slice(end, None))
        if carry is not None and not self.drop_last:
            yield carry

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        rng = np.random.default_rng((self.seed, self.epoch, info.id if info else 0))
        # the next row group is read in a background thread (pyarrow releases the GIL)
        pieces = prefetch(self._unit_batches(self._my_units()), depth=2)
        if self.shuffle:
            pieces = self._permuted(pieces, rng)
        yield from self._sequential_batches(pieces)
