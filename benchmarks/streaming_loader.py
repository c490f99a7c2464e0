"""Streaming Parquet loader throughput vs a raw pyarrow scan of the same files.

Writes N embedding rows (D-dim float32, like an embed-stage output) into Parquet shards, then in
one process, alternating over repeats:
  raw      `pq.ParquetFile(path).read_row_group(g)` for every row group + `arrow_to_embeddings`
           (the minimum work to get numpy arrays out of the files);
(both read the columns head training needs: species_id and embedding)
  stream   `DataLoader(ParquetStream(..., shuffle=True), batch_size=None)` batches of B rows.
Prints the median rows/s of each and the median of the per-pair ratios stream/raw with its spread
and the load average (target >= 0.8).

Run: PYTHONPATH=src python benchmarks/streaming_loader.py [--rows 400000 --dim 768]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _machine import paired_ratio, report_load
from torch.utils.data import DataLoader

from vitlab.data.shards import arrow_to_embeddings, embeddings_to_arrow
from vitlab.data.streaming import ParquetStream

COLUMNS = ["species_id", "embedding"]  # what head training reads; both readers read these


def write_shards(root: Path, rows: int, dim: int, shard_rows: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        table = pa.table(
            {
                "image_name": [f"img{start + j}" for j in range(n)],
                "species_id": rng.integers(0, 7806, n),
                "embedding": embeddings_to_arrow(rng.normal(size=(n, dim)).astype(np.float32)),
            }
        )
        path = root / f"part-{i:05d}.parquet"
        pq.write_table(table, path, row_group_size=8192)
        paths.append(path)
    return paths


def raw_scan(paths: list[Path]) -> int:
    rows = 0
    for path in paths:
        handle = pq.ParquetFile(path)
        for group in range(handle.num_row_groups):
            table = handle.read_row_group(group, columns=COLUMNS)
            rows += len(arrow_to_embeddings(table.column("embedding")))
            table.column("species_id").to_numpy()
    return rows


def stream_scan(paths: list[Path], batch_size: int, workers: int) -> int:
    stream = ParquetStream(paths, batch_size=batch_size, columns=COLUMNS, shuffle=True)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return sum(len(batch["embedding"]) for batch in loader)


def rate(fn) -> float:
    start = time.perf_counter()
    rows = fn()
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=9)
    args = parser.parse_args()
    report_load("start")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.rows, args.dim, args.shard_rows)
        assert raw_scan(paths) == stream_scan(paths, args.batch_size, args.workers) == args.rows
        raw_rates: list[float] = []
        stream_rates: list[float] = []

        def raw() -> float:
            raw_rates.append(rate(lambda: raw_scan(paths)))
            return raw_rates[-1]

        def stream() -> float:
            stream_rates.append(rate(lambda: stream_scan(paths, args.batch_size, args.workers)))
            return stream_rates[-1]

        ratio = paired_ratio(stream, raw, args.pairs)
    size_mb = args.rows * args.dim * 4 / 2**20
    print(
        f"{args.rows} rows x {args.dim} float32 ({size_mb:.0f} MiB), batch {args.batch_size}, "
        f"workers {args.workers}, {args.pairs} alternating pairs"
    )
    print("| reader | median rows/s |\n|---|---|")
    print(f"| raw pyarrow scan | {statistics.median(raw_rates):,.0f} |")
    print(f"| ParquetStream (shuffled) | {statistics.median(stream_rates):,.0f} |")
    print(f"stream/raw, median of per-pair ratios = {ratio} (target >= 0.8)")
    report_load("end")


if __name__ == "__main__":
    main()
