"""Embed: prepared image shards -> embedding shards, one vector per image.

Cached by a content key of the prepared data's key, the backbone's identity (name, weights,
input size) and the feature reducer's parameters: a rerun with the same inputs does no backbone
forward. Shards already written by an interrupted run are kept; only the rest are computed.
Reused shards (own and prepared inputs) are verified against their recorded checksums first; a
bad one is recomputed with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
            for images in prefetch(decoded):
                pixels = preprocess_batch(images, backbone.input_spec)
                vectors.append(embed_pixels(backbone, self.features, pixels).float().numpy())
                if progress:
                    progress(len(images))
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
