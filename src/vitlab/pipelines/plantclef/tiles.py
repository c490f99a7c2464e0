"""Embed test tiles: test quadrats -> one embedding per strategy box, cached like `embed`.

PlantCLEF's predict pushes every box of every test quadrat through the backbone, which costs far
more than the head it feeds (real test set: ~15k tiles of ViT-B at 518 px). The embeddings are a
stage output keyed by the quadrat files (name, size, mtime), the strategy's boxes
(`box_params`: grid size, not the aggregation's top-k), `tile_fit`, the backbone's identity and
the feature reducer, so a rerun or a head-only change (lr, loss, head, top_l) does no backbone
forward: the head reads the cached vectors (`predict_from_tiles`).

Shards of QUADRATS_PER_SHARD quadrats are written atomically and recorded as they finish, so a
killed run resumes with the shards it had. Tiles of consecutive quadrats fill batches of
`batch_size` (the last batch of a shard may be short), and the next quadrats are decoded and cut
in a background thread. A quadrat that cannot be read, or is too small for the boxes, is stored
as one row with its reason (`tile` = -1), so a cache hit reports the same skips.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from vitlab.cache import content_key, files_fingerprint
from vitlab.data import device_images
from vitlab.data.loading import chunks, ordered_map, prefetch
from vitlab.data.plantclef import plot_id_of
from vitlab.data.shards import ShardedStage, arrow_to_embeddings, embeddings_to_arrow
from vitlab.devices import CPU, Compute
from vitlab.engines.local import LocalEngine
from vitlab.models.backbones import Backbone
from vitlab.pipelines.plantclef.predict import (
    PredictionResult,
    QuadratTiles,
    Strategy,
    check_tile_fit,
    cut_tiles,
    head_probabilities,
    mean_colour,
)
from vitlab.stages.embed import (
    FeatureReducer,
    LiveBackbone,
    embed_batches,
    feature_dim,
    forward_batch_size,
    loader_stream,
    loader_workers,
    stage_batch,
    synchronize_loader,
)

log = logging.getLogger(__name__)
QUADRATS_PER_SHARD = 64  # resume granularity: ~576 grid tiles, seconds to minutes of backbone
SKIPPED_TILE = -1  # the `tile` of a quadrat's row that records why it has no tiles
QUADRATS_PER_DECODE = 8  # quadrats per nvJPEG call when the GPU decodes (embed.decode)


def box_params(strategy: Strategy) -> Any:
    """What the strategy's boxes depend on; a strategy without `box_params` is keyed by all of
    its fields (safe: only more cache misses)."""
    describe = getattr(strategy, "box_params", None)
    return describe() if callable(describe) else repr(strategy)


def tiles_key(
    images: Sequence[Path],
    root: Path,
    strategy: Strategy,
    tile_fit: str,
    backbone: Backbone,
    features: FeatureReducer,
    compute: Compute = CPU,
) -> str:
    extra = [compute.cache_params()] if compute.cache_params() else []
    return content_key(
        "tiles-v1",
        files_fingerprint(images, root),
        box_params(strategy),
        tile_fit,
        backbone.identity(),
        features.params(),
        *extra,
    )


@dataclass
class TileEmbedTask(LiveBackbone):
    """Embed the tiles of one shard's quadrats (rows: `image`, a path). Picklable like
    `EmbedShardTask`: on Spark each worker builds the backbone once from its build arguments."""

    root: str
    backbone_args: dict[str, Any]
    features: FeatureReducer
    strategy: Strategy
    tile_fit: str
    batch_size: int
    backbone: Backbone | None = field(default=None, repr=False)
    compute: Compute = CPU

    def load(self, shard_no: int, rows: pd.DataFrame) -> Iterator[Any]:
        """The shard's quadrat paths, then each quadrat's tiles, decoded and cut by a pool of
        loader threads a few quadrats ahead, in a background thread."""
        backbone = self.live_backbone()  # here, not in the loader: built once, on this thread
        size, fill = backbone.input_spec.size, mean_colour(backbone)
        return prefetch(self._cut([Path(p) for p in rows["image"]], size, fill), depth=8)

    def _cut(self, paths: list[Path], size: int, fill: tuple[int, int, int]) -> Iterator[Any]:
        yield paths
        workers = loader_workers(self.compute)
        if self.compute.decode_on_device:  # files read by the pool, decoded and cut on the GPU
            groups = list(chunks(paths, QUADRATS_PER_DECODE))
            with ThreadPoolExecutor(workers, "vitlab-read") as pool, loader_stream(self.compute):
                for group, blobs in zip(groups, ordered_map(read_files, groups, pool, ahead=4)):
                    yield from self._cut_on_device(group, blobs, size, fill)
            return

        def cut(path: Path) -> Any:
            return cut_tiles(path, self.strategy, size, self.tile_fit, fill)

        with ThreadPoolExecutor(workers, "vitlab-tiles") as pool:
            yield from ordered_map(cut, paths, pool, ahead=2 * workers)

    def _cut_on_device(
        self, paths: list[Path], blobs: list[bytes], size: int, fill: tuple[int, int, int]
    ) -> Iterator[QuadratTiles]:
        """Quadrats decoded in one nvJPEG call and cut on the GPU (the loader's stream is
        synchronised before they are handed over); a group nvJPEG cannot decode (a PNG, a
        corrupt file) is cut on the CPU, quadrat by quadrat, which names the culprit."""
        device = self.compute.device
        decoded = device_images.decode_jpegs(blobs, device)
        if decoded is None:
            for path in paths:
                quadrat = cut_tiles(path, self.strategy, size, self.tile_fit, fill)
                if quadrat.tiles is not None:
                    quadrat.tiles = torch.from_numpy(quadrat.tiles).to(device)
                yield quadrat
            return
        cut: list[QuadratTiles] = []
        images, boxes = [], []
        for path, image in zip(paths, decoded):
            try:
                own = self.strategy.boxes(int(image.shape[2]), int(image.shape[1]))
            except ValueError as err:  # e.g. fewer pixels than grid cells
                cut.append(QuadratTiles(plot_id_of(path), None, f"{path}: {err}"))
                continue
            cut.append(QuadratTiles(plot_id_of(path), None))
            images.append(image)
            boxes.append(own)
        tiles = iter(device_images.cut_tiles(images, boxes, size, self.tile_fit, fill))
        for quadrat in cut:  # every group's boxes fitted in a few batched calls
            if quadrat.error is None:
                quadrat.tiles = next(tiles)
        synchronize_loader(device)
        yield from cut

    def run(
        self, loaded: Iterator[Any], progress: Callable[[int], Any] | None
    ) -> tuple[pa.Table, dict[str, Any]]:
        backbone = self.live_backbone()
        paths = next(loaded)
        quadrats = loaded
        names: list[str] = []
        plots: list[str] = []
        tile_numbers: list[int] = []
        errors: list[str | None] = []

        def tile_batches() -> Iterator[np.ndarray]:
            """Batches of `batch_size` tiles across quadrats (the last one may be short); the
            rows above are recorded as the quadrats are read."""
            pending: list[np.ndarray] = []  # tiles not yet batched, in order
            for path, quadrat in zip(paths, quadrats):
                name = str(path.relative_to(self.root))
                if quadrat.tiles is None:  # one row with the reason, no forward
                    names.append(name)
                    plots.append(quadrat.plot_id)
                    tile_numbers.append(SKIPPED_TILE)
                    errors.append(quadrat.error or "unreadable")
                else:
                    count = len(quadrat.tiles)
                    names.extend([name] * count)
                    plots.extend([quadrat.plot_id] * count)
                    tile_numbers.extend(range(count))
                    errors.extend([None] * count)
                    pending.append(quadrat.tiles)
                    pending, full = _full_batches(pending, self.batch_size)
                    yield from (stage_batch(batch, self.compute) for batch in full)
                if progress:
                    progress(1)
            if pending:
                yield stage_batch(_concat(pending), self.compute)

        vectors = list(embed_batches(backbone, self.features, tile_batches(), self.compute))
        is_tile = np.asarray(tile_numbers, dtype=np.int64) != SKIPPED_TILE
        dim = vectors[0].shape[1] if vectors else feature_dim(backbone, self.features)
        embeddings = np.zeros((len(names), dim), np.float32)  # skipped quadrats' rows: zeros
        if vectors:
            embeddings[is_tile] = np.concatenate(vectors)
        table = pa.table(
            {
                "image": pa.array(names, pa.string()),
                "plot_id": pa.array(plots, pa.string()),
                "tile": pa.array(tile_numbers, pa.int32()),
                "error": pa.array(errors, pa.string()),
                "embedding": embeddings_to_arrow(embeddings),
            }
        )
        return table, {"quadrats": len(paths), "tiles": int(is_tile.sum())}


def read_files(paths: Sequence[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def _concat(parts: list[Any]) -> Any:
    """Tiles of several quadrats in one array: numpy on the CPU path, a tensor on the GPU's."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def _full_batches(pending: list[Any], batch_size: int) -> tuple[list[Any], list[Any]]:
    """The leftover tiles and as many whole batches of `batch_size` as `pending` holds, in
    order."""
    total = sum(len(t) for t in pending)
    if total < batch_size:
        return pending, []
    tiles = _concat(pending)
    whole = total // batch_size * batch_size
    full = [tiles[start : start + batch_size] for start in range(0, whole, batch_size)]
    return ([tiles[whole:]] if whole < total else []), full


def embed_test_tiles(
    images: Sequence[Path],
    root: str | Path,
    strategy: Strategy,
    backbone: Backbone,
    features: FeatureReducer,
    cache_dir: str | Path,
    tile_fit: str = "center_crop",
    batch_size: int | str = 64,
    engine: Any = None,
    compute: Compute = CPU,
) -> tuple[ShardedStage, int]:
    """The cached tile embeddings of `images` (files under `root`), and how many quadrats this
    call pushed through the backbone (0 on a cache hit). The backbone is on `compute.device`."""
    check_tile_fit(tile_fit)
    engine = engine or LocalEngine()
    root = Path(root)
    images = list(images)
    key = tiles_key(images, root, strategy, tile_fit, backbone, features, compute)
    params = {
        "quadrats": len(images),
        "root": str(root),
        "boxes": box_params(strategy),
        "tile_fit": tile_fit,
        "backbone": backbone.identity(),
        "features": features.params(),
        **compute.cache_params(),
    }
    stage = ShardedStage(Path(cache_dir) / "tiles" / key, key, params)
    stage.verify(checksum=True)
    if stage.complete:
        log.info("embed tiles: cache hit (key %s, %s): no backbone forward", key, stage.directory)
        return stage, 0
    stage.remove_stale_temporaries()
    shard_of = np.arange(len(images)) // QUADRATS_PER_SHARD
    todo = sorted(int(s) for s in set(shard_of.tolist()) if not stage.has_shard(int(s)))
    work = pd.DataFrame({"shard": shard_of, "image": [str(p) for p in images]})
    work = work[work["shard"].isin(todo)]
    if len(work):
        if engine.name != "local" and backbone.build_args is None:
            raise ValueError("engine=spark needs a backbone made by create_backbone")
        batch_size = forward_batch_size(batch_size, backbone, features, compute)
        task = TileEmbedTask(
            str(root),
            backbone.build_args or {},
            features,
            strategy,
            tile_fit,
            batch_size,
            backbone=backbone,
            compute=compute,
        )
        engine.map_shards(stage, work, task, f"embed tiles ({strategy.name})", len(work))
    stage.finish({"quadrats": len(images), "engine": engine.name})
    return stage, len(work)


def predict_from_tiles(
    stage: ShardedStage,
    strategy: Strategy,
    head: torch.nn.Module,
    species_ids: Sequence[int],
    tile_fit: str = "center_crop",
    batch_size: int = 4096,
    multilabel: bool = False,
) -> PredictionResult:
    """Plot id -> species ids from cached tile embeddings: head -> softmax (a sigmoid per
    species with `multilabel`) -> the strategy's aggregate per quadrat, in the order the
    quadrats were embedded. A skipped quadrat gets an empty prediction and its reason in
    `skipped`, as in `predict_quadrats`."""
    predictions: dict[str, list[int]] = {}
    skipped: list[str] = []
    tile_count = 0
    head.eval()
    for table in stage.iter_tables():
        vectors = arrow_to_embeddings(table.column("embedding"))
        probs = _head_probabilities(head, vectors, batch_size, multilabel)
        for plot_id, start, end, error in quadrat_spans(table):
            if error is not None:
                log.warning("predict: skipped %s", error)
                skipped.append(error)
                predictions[plot_id] = []
            else:
                predictions[plot_id] = strategy.aggregate(probs[start:end], species_ids)
                tile_count += end - start
    return PredictionResult(predictions, tile_count, skipped, tile_fit)


@torch.inference_mode()
def _head_probabilities(
    head: torch.nn.Module, vectors: np.ndarray, batch_size: int, multilabel: bool = False
) -> np.ndarray:
    tensor = torch.from_numpy(np.array(vectors))  # Arrow memory is read-only
    return torch.cat(
        [
            head_probabilities(head(tensor[i : i + batch_size].float()), multilabel)
            for i in range(0, len(tensor), batch_size)
        ]
    ).numpy()


def quadrat_spans(table: pa.Table) -> Iterator[tuple[str, int, int, str | None]]:
    """(plot id, first row, end row, skip reason or None) of each quadrat of a tiles shard:
    a quadrat's rows are consecutive."""
    images = table.column("image").to_numpy(zero_copy_only=False)
    plots = table.column("plot_id").to_pylist()
    errors = table.column("error").to_pylist()
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]]).tolist() if len(images) else []
    for start, end in zip(starts, [*starts[1:], len(images)]):
        yield plots[start], start, end, errors[start]
