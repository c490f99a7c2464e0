"""Embed: prepared image shards -> embedding shards, one vector per image.

Cached by a content key of the prepared data's key, the backbone's identity (name, weights,
input size) and the feature reducer's parameters: a rerun with the same inputs does no backbone
forward. Shards already written by an interrupted run are kept; only the rest are computed.
Reused shards (own and prepared inputs) are verified against their recorded checksums first; a
bad one is recomputed with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vitlab.cache import content_key
from vitlab.data.loading import chunks, decode_uint8_batch, prefetch
from vitlab.data.shards import ShardedStage, embeddings_to_arrow, shard_name
from vitlab.engines.local import LocalEngine
from vitlab.models.backbones import Backbone, backbone_in_process, preprocess_batch
from vitlab.runtime import decode_pool_size

log = logging.getLogger(__name__)
B = TypeVar("B", np.ndarray, torch.Tensor)  # a batch: rows along the first axis


class FeatureReducer(Protocol):
    def __call__(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor: ...
    def params(self) -> dict[str, Any]: ...


# At most this many data-parallel forwards on CPU; the cores are split between them.
MAX_FORWARD_WORKERS = 4


@torch.inference_mode()
def embed_pixels(
    backbone: Backbone, features: FeatureReducer, pixels: torch.Tensor
) -> torch.Tensor:
    """Normalised pixels -> feature vectors."""
    return features(backbone.forward_tokens(pixels), backbone.num_prefix_tokens)


def forward_workers(threads: int) -> tuple[int, int]:
    """(forwards side by side, intra-op threads each) for `threads` torch threads. Measured on
    2 cores, batch 64: two 1-thread forwards of half a batch each ran 1.08-1.15x the images/s of
    one 2-thread forward for the tiny ViT and 1.14x for ViT-B/14 at 224 px (the ops of one forward
    do not keep two cores busy), and a decode thread that preempts one of them no longer stalls
    the other at every op's OpenMP barrier."""
    workers = max(1, min(threads, MAX_FORWARD_WORKERS))
    return workers, max(1, threads // workers)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set for the block (threads started in it inherit it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def row_slices(rows: int, parts: int) -> list[slice]:
    """At most `parts` contiguous slices of `rows` rows, sizes differing by at most one."""
    parts = max(1, min(parts, rows))
    edges = [round(i * rows / parts) for i in range(parts + 1)]
    return [slice(start, stop) for start, stop in zip(edges, edges[1:])]


def map_side_by_side(fn: Callable[[B], np.ndarray], batches: Iterable[B]) -> Iterator[np.ndarray]:
    """`fn` (rows -> output rows, e.g. a model forward) over each batch, the batch's rows split
    over `forward_workers` calls running side by side on the torch threads (torch releases the
    GIL in its ops); yields each batch's outputs concatenated, in order."""
    workers, threads_each = forward_workers(torch.get_num_threads())
    if workers == 1:
        yield from map(fn, batches)
        return
    with torch_threads(threads_each), ThreadPoolExecutor(workers, "vitlab-forward") as pool:
        for batch in batches:
            parts = [batch[rows] for rows in row_slices(len(batch), workers)]
            yield np.concatenate(list(pool.map(fn, parts)))


def embed_batches(
    backbone: Backbone, features: FeatureReducer, batches: Iterable[np.ndarray]
) -> Iterator[np.ndarray]:
    """(N, H, W, 3) uint8 batches -> (N, D) float32 embeddings, in order, each batch's
    forward split side by side (`map_side_by_side`)."""

    def embed(images: np.ndarray) -> np.ndarray:
        pixels = preprocess_batch(images, backbone.input_spec)
        return embed_pixels(backbone, features, pixels).float().numpy()

    return map_side_by_side(embed, batches)


def embed_key(prepared_key: str, backbone: Backbone, features: FeatureReducer) -> str:
    return content_key("embed-v1", prepared_key, backbone.identity(), features.params())


class LiveBackbone:
    """For picklable shard tasks: the live `backbone` is used in-process and left out of the
    pickle; a Spark worker builds its own once from `backbone_args` (and reuses it)."""

    backbone_args: dict[str, Any]
    backbone: Backbone | None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "backbone": None}

    def live_backbone(self) -> Backbone:
        return self.backbone or backbone_in_process(self.backbone_args)


@dataclass
class EmbedShardTask(LiveBackbone):
    """Embed one prepared shard. Picklable: on Spark only the backbone's build arguments and
    the feature reducer travel; each worker process builds the backbone once and reuses it."""

    input_dir: str
    backbone_args: dict[str, Any]
    features: FeatureReducer
    batch_size: int
    backbone: Backbone | None = field(default=None, repr=False)  # the live one, in-process

    def __call__(
        self, shard_no: int, rows: pd.DataFrame, progress: Callable[[int], Any] | None
    ) -> tuple[pa.Table, dict[str, Any]]:
        backbone = self.live_backbone()
        table = pq.read_table(Path(self.input_dir) / shard_name(shard_no))
        names = table.column("image_name").to_pylist()
        blobs = table.column("image").to_pylist()
        vectors = []
        with ThreadPoolExecutor(max_workers=decode_pool_size()) as pool:
            batches = zip(chunks(names, self.batch_size), chunks(blobs, self.batch_size))
            decoded = (decode_uint8_batch(b, n, pool) for n, b in batches)
            for batch_vectors in embed_batches(backbone, self.features, prefetch(decoded)):
                vectors.append(batch_vectors)
                if progress:
                    progress(len(batch_vectors))
        if not vectors:  # every image of the shard was skipped by prepare
            vectors.append(np.zeros((0, feature_dim(backbone, self.features)), np.float32))
        column = embeddings_to_arrow(np.concatenate(vectors))
        return table.drop_columns(["image"]).append_column("embedding", column), {}


def feature_dim(backbone: Backbone, features: FeatureReducer) -> int:
    size = backbone.input_spec.size
    return int(embed_pixels(backbone, features, torch.zeros(1, 3, size, size)).shape[1])


def embed_prepared(
    prepared: ShardedStage,
    backbone: Backbone,
    features: FeatureReducer,
    cache_dir: str | Path,
    batch_size: int = 64,
    engine: Any = None,
) -> ShardedStage:
    """Embedding shards for prepared shards (cached); `engine` defaults to the local one."""
    engine = engine or LocalEngine()
    key = embed_key(prepared.key, backbone, features)
    params = {
        "prepared": prepared.key,
        "backbone": backbone.identity(),
        "features": features.params(),
    }
    stage = ShardedStage(Path(cache_dir) / "embed" / key, key, params)
    # Every byte of the embeddings is read by the fit that follows, so a hit verifies all
    # checksums (about 0.6 s/GB with a warm page cache), as does a resume; a bad shard is
    # dropped (the stage is incomplete again) and recomputed below.
    stage.verify(checksum=True)
    if stage.complete:
        log.info(
            "embed: cache hit (key %s, %s)%s",
            key,
            stage.directory,
            "" if engine.name == "local" else f", engine={engine.name} not started",
        )
        return stage
    stage.remove_stale_temporaries()
    todo = [i for i in prepared.shard_indices() if not stage.has_shard(i)]
    if todo:
        prepared.require(todo)  # the prepared shards read below pass their checksums
        rows = [prepared.manifest["shards"][shard_name(i)]["rows"] for i in todo]
        work = pd.DataFrame({"shard": todo, "rows": rows})
        if engine.name != "local" and backbone.build_args is None:
            raise ValueError("engine=spark needs a backbone made by create_backbone")
        task = EmbedShardTask(
            str(prepared.directory),
            backbone.build_args or {},
            features,
            batch_size,
            backbone=backbone,
        )
        engine.map_shards(stage, work, task, "embed", int(sum(rows)))
    dim = _embedding_dim(stage)
    stage.finish(
        {
            "rows": sum(s["rows"] for s in stage.manifest["shards"].values()),
            "dim": dim,
            "engine": engine.name,
        }
    )
    return stage


def _embedding_dim(stage: ShardedStage) -> int:
    for path in stage.shard_paths():
        column_type = pq.read_schema(path).field("embedding").type
        return int(column_type.list_size)
    raise ValueError(f"embed: no image to embed in {stage.directory}")
