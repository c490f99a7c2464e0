"""Embed: prepared image shards -> embedding shards, one vector per image.

Cached by a content key of the prepared data's key, the backbone's identity (name, weights,
input size) and the feature reducer's parameters: a rerun with the same inputs does no backbone
forward. Shards already written by an interrupted run are kept; only the rest are computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from vitlab.cache import content_key
from vitlab.data.loading import chunks, decode_uint8_batch, prefetch
from vitlab.data.shards import ShardedStage, embeddings_to_arrow
from vitlab.models.backbones import Backbone, preprocess_batch
from vitlab.progress import progress

log = logging.getLogger(__name__)


class FeatureReducer(Protocol):
    def __call__(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor: ...
    def params(self) -> dict[str, Any]: ...


@torch.inference_mode()
def embed_pixels(
    backbone: Backbone, features: FeatureReducer, pixels: torch.Tensor
) -> torch.Tensor:
    """Normalised pixels -> feature vectors."""
    return features(backbone.forward_tokens(pixels), backbone.num_prefix_tokens)


def embed_key(prepared_key: str, backbone: Backbone, features: FeatureReducer) -> str:
    return content_key("embed-v1", prepared_key, backbone.identity(), features.params())


def _decoded_batches(
    stage: ShardedStage, todo: list[int], batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[tuple[int, pa.Table, np.ndarray]]:
    paths = stage.shard_paths()
    for shard_no in todo:
        table = pa.parquet.read_table(paths[shard_no])
        names = table.column("image_name").to_pylist()
        blobs = table.column("image").to_pylist()
        for start_names, start_blobs in zip(chunks(names, batch_size), chunks(blobs, batch_size)):
            yield shard_no, table, decode_uint8_batch(start_blobs, start_names, pool)


def embed_prepared(
    prepared: ShardedStage,
    backbone: Backbone,
    features: FeatureReducer,
    cache_dir: str | Path,
    batch_size: int = 64,
) -> ShardedStage:
    import pyarrow.parquet  # noqa: F401 - registers pa.parquet

    key = embed_key(prepared.key, backbone, features)
    params = {
        "prepared": prepared.key,
        "backbone": backbone.identity(),
        "features": features.params(),
    }
    stage = ShardedStage(Path(cache_dir) / "embed" / key, key, params)
    if stage.complete:
        log.info("embed: cache hit %s (%s)", key, stage.directory)
        return stage
    n_shards = len(prepared.shard_paths())
    todo = [i for i in range(n_shards) if not stage.has_shard(i)]
    total = sum(
        prepared.manifest["shards"][p.name]["rows"]
        for i, p in enumerate(prepared.shard_paths())
        if i in todo
    )
    bar = progress(total, "embed")
    pending: dict[int, list[np.ndarray]] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for shard_no, table, images in prefetch(_decoded_batches(prepared, todo, batch_size, pool)):
            vectors = embed_pixels(
                backbone, features, preprocess_batch(images, backbone.input_spec)
            )
            pending.setdefault(shard_no, []).append(vectors.float().numpy())
            bar.update(len(images))
            done_rows = sum(len(v) for v in pending[shard_no])
            if done_rows == table.num_rows:
                out = table.drop_columns(["image"]).append_column(
                    "embedding", embeddings_to_arrow(np.concatenate(pending.pop(shard_no)))
                )
                stage.write_shard(shard_no, out)
    bar.close()
    dim = _embedding_dim(stage)
    for shard_no in todo:  # shards whose images were all skipped by prepare
        if not stage.has_shard(shard_no):
            empty = pa.parquet.read_table(prepared.shard_paths()[shard_no]).drop_columns(["image"])
            column = embeddings_to_arrow(np.zeros((0, dim), np.float32))
            stage.write_shard(shard_no, empty.append_column("embedding", column))
    stage.finish({"rows": sum(s["rows"] for s in stage.manifest["shards"].values()), "dim": dim})
    return stage


def _embedding_dim(stage: ShardedStage) -> int:
    for path in stage.shard_paths():
        column_type = pa.parquet.read_schema(path).field("embedding").type
        return int(column_type.list_size)
    raise ValueError(f"embed: no image to embed in {stage.directory}")
