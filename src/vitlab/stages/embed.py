"""Embed: prepared image shards -> embedding shards, one vector per image.

Cached by a content key of the prepared data's key, the backbone's identity (name, weights,
input size) and the feature reducer's parameters: a rerun with the same inputs does no backbone
forward. Shards already written by an interrupted run are kept; only the rest are computed.
Reused shards (own and prepared inputs) are verified against their recorded checksums first; a
bad one is recomputed with a warning.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vitlab.cache import content_key
from vitlab.data.device_images import decode_jpegs, stack_same_size
from vitlab.data.loading import chunks, decode_uint8_batch, prefetch
from vitlab.data.shards import ShardedStage, embeddings_to_arrow, shard_name
from vitlab.devices import CPU, Compute
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
    backbone: Backbone,
    features: FeatureReducer,
    batches: Iterable[np.ndarray | torch.Tensor],
    compute: Compute = CPU,
) -> Iterator[np.ndarray]:
    """(N, H, W, 3) uint8 batches -> (N, D) float32 embeddings, in order, on `compute`'s
    device and precision. On the CPU each batch's forward is split side by side
    (`map_side_by_side`); on a GPU see `embed_on_device`. The backbone must already be on
    `compute.device`."""
    if compute.device.type != "cpu":
        return embed_on_device(backbone, features, batches, compute)

    def embed(images: np.ndarray | torch.Tensor) -> np.ndarray:
        with compute.autocast():  # per thread: entered in the worker that runs the forward
            pixels = preprocess_batch(images, backbone.input_spec)
            return embed_pixels(backbone, features, pixels).float().numpy()

    return map_side_by_side(embed, batches)


def embed_on_device(
    backbone: Backbone,
    features: FeatureReducer,
    batches: Iterable[np.ndarray | torch.Tensor],
    compute: Compute,
) -> Iterator[np.ndarray]:
    """The GPU path: each uint8 batch (pinned by `stage_batch` in the loader thread) is copied
    without blocking, normalised on the device, forwarded under autocast, and its embeddings
    copied back into pinned memory; the host waits for batch i only after batch i+1 is queued,
    so the device never waits for Python between batches."""
    device = compute.device
    pinned = device.type == "cuda"
    in_flight: deque[tuple[torch.Tensor, Any, Any]] = deque()
    for images in batches:
        host = torch.as_tensor(images)
        pixels = preprocess_batch(host.to(device, non_blocking=pinned), backbone.input_spec)
        with compute.autocast():
            vectors = embed_pixels(backbone, features, pixels)
        out = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=pinned)
        out.copy_(vectors.float(), non_blocking=pinned)
        done = torch.cuda.Event() if pinned else None
        if done is not None:  # on this device's stream (a replica's thread may not have it as
            done.record(torch.cuda.current_stream(device))  # its current device)
        in_flight.append((out, done, host))  # `host` lives until its copy is done
        if len(in_flight) > 1:
            yield _finished(in_flight.popleft())
    while in_flight:
        yield _finished(in_flight.popleft())


def _finished(item: tuple[torch.Tensor, Any, Any]) -> np.ndarray:
    out, done, _ = item
    if done is not None:
        done.synchronize()
    return out.numpy()


def stage_batch(images: np.ndarray | torch.Tensor, compute: Compute) -> np.ndarray | torch.Tensor:
    """A decoded batch as the device wants it: in page-locked memory for a CUDA device (a
    non-blocking copy needs it), as it is for the CPU or when it is on the device already.
    Called in the loader thread."""
    if isinstance(images, np.ndarray) and compute.device.type == "cuda":
        return torch.from_numpy(images).pin_memory()
    return images


def decode_batch(
    blobs: Sequence[bytes], names: Sequence[str], pool: ThreadPoolExecutor, compute: Compute
) -> np.ndarray | torch.Tensor:
    """Same-size encoded images -> one (N, H, W, 3) uint8 batch: decoded by nvJPEG on the GPU
    when `compute.decode_on_device` (the loader's stream is synchronised, so the batch is
    ready when handed over), else on the CPU pool (and pinned for a GPU). A batch the GPU
    cannot decode (raw pixels, a PNG, a corrupt file) takes the CPU path, which names the
    culprit."""
    if compute.decode_on_device:
        decoded = decode_jpegs(blobs, compute.device)
        batch = stack_same_size(decoded) if decoded is not None else None
        if batch is not None:
            synchronize_loader(compute.device)
            return batch
    return stage_batch(decode_uint8_batch(blobs, names, pool), compute)


@contextmanager
def loader_stream(compute: Compute) -> Iterator[None]:
    """A CUDA stream of its own for a loader thread that decodes on the GPU (its work overlaps
    the forwards on the default stream); nothing otherwise."""
    if not (compute.decode_on_device and compute.device.type == "cuda"):
        yield
        return
    with torch.cuda.stream(torch.cuda.Stream(compute.device)):
        yield


def synchronize_loader(device: torch.device) -> None:
    """Wait (in the loader thread) until its stream's decoding is done on `device`."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def loader_workers(compute: Compute) -> int:
    """Decode threads: 2 beside CPU forwards (which want the cores), every core beside a GPU
    (which is fed by them); `runtime.threads` caps both."""
    import os

    return decode_pool_size(2 if compute.device.type == "cpu" else (os.cpu_count() or 2))


AUTO_BATCH_CPU = 64  # `batch_size=auto` on the CPU: the measured default of the CPU path
AUTO_BATCH_GPU_MAX = 512  # on a GPU: the largest power of two up to this whose forward fits
_found_batch_sizes: dict[str, int] = {}


def forward_batch_size(
    setting: Any, backbone: Backbone, features: FeatureReducer, compute: Compute
) -> int:
    """`embed.batch_size` / `predict.batch_size`: a number as it is; `auto` is 64 on the CPU
    and, on a GPU, the largest power of two up to AUTO_BATCH_GPU_MAX whose forward fits in the
    device's memory (probed with a blank batch, halving on out-of-memory), found once per
    process for each backbone, feature reducer, device and precision."""
    if setting != "auto":
        return int(setting)
    if compute.device.type != "cuda":
        return AUTO_BATCH_CPU
    key = content_key(
        backbone.identity(), features.params(), str(compute.device), compute.precision
    )
    if key not in _found_batch_sizes:
        size = backbone.input_spec.size
        batch = AUTO_BATCH_GPU_MAX
        while batch > 1:
            try:
                with compute.autocast():
                    pixels = torch.zeros(batch, 3, size, size, device=compute.device)
                    embed_pixels(backbone, features, pixels)
                break
            except torch.cuda.OutOfMemoryError:
                batch //= 2
            finally:
                torch.cuda.empty_cache()
        _found_batch_sizes[key] = batch
        log.info(
            "batch_size=auto: %d images per forward on %s (%s)",
            batch,
            compute.device,
            compute.precision,
        )
    return _found_batch_sizes[key]


def embed_key(
    prepared_key: str, backbone: Backbone, features: FeatureReducer, compute: Compute = CPU
) -> str:
    extra = [compute.cache_params()] if compute.cache_params() else []
    return content_key("embed-v1", prepared_key, backbone.identity(), features.params(), *extra)


class LiveBackbone:
    """For picklable shard tasks: the live `backbone` (already on `compute.device`) is used
    in-process and left out of the pickle; a Spark worker builds its own once from
    `backbone_args` (and reuses it) and moves it to the GPU Spark assigned to the task."""

    backbone_args: dict[str, Any]
    backbone: Backbone | None
    compute: Compute

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "backbone": None}

    def __call__(
        self, shard_no: int, rows: pd.DataFrame, progress: Callable[[int], Any] | None
    ) -> tuple[pa.Table, dict[str, Any]]:
        """A shard task: the shard loaded in the background by the subclass's `load`, then
        embedded by its `run` (the local engine calls them apart to overlap shards)."""
        return self.run(self.load(shard_no, rows), progress)  # type: ignore[attr-defined]

    def live_backbone(self) -> Backbone:
        if self.backbone is not None:
            return self.backbone
        self.compute = self.compute.on(executor_device(self.compute))
        self.backbone = backbone_in_process(self.backbone_args).to(self.compute.device)
        return self.backbone

    def replicas(self) -> list[LiveBackbone]:
        """One task per device of `compute` (the first is this one): a multi-GPU run embeds
        with a copy of the backbone on each device."""
        if len(self.compute.devices) == 1:
            return [self]
        copies = [replace(self, compute=self.compute.on(self.compute.devices[0]))]
        for device in self.compute.devices[1:]:
            moved = copy.deepcopy(self.backbone).to(device) if self.backbone else None
            copies.append(replace(self, backbone=moved, compute=self.compute.on(device)))
        return copies


def executor_device(compute: Compute) -> str:
    """The device of a task running on a Spark executor: the GPU Spark assigned to the task
    (`spark.task.resource.gpu.amount`, `TaskContext.resources()["gpu"]`), else the driver's
    choice when this machine has it; the CPU when the run is on the CPU."""
    if compute.device.type != "cuda":
        return str(compute.device)
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
    except ImportError:
        context = None
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses:
        return f"cuda:{gpus.addresses[0]}"
    if not torch.cuda.is_available():
        raise RuntimeError(
            "runtime.device asks for a GPU but this Spark executor has none: give executors "
            "GPUs (spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount) or set "
            "runtime.device=cpu"
        )
    return str(compute.device)


@dataclass
class EmbedShardTask(LiveBackbone):
    """Embed one prepared shard. Picklable: on Spark only the backbone's build arguments and
    the feature reducer travel; each worker process builds the backbone once and reuses it.
    `load` starts reading and decoding a shard in the background, so the local engine loads
    the next shard while this one is on the device."""

    input_dir: str
    backbone_args: dict[str, Any]
    features: FeatureReducer
    batch_size: int
    backbone: Backbone | None = field(default=None, repr=False)  # the live one, in-process
    compute: Compute = CPU

    def load(self, shard_no: int, rows: pd.DataFrame) -> Iterator[Any]:
        """The shard's table without its images, then its decoded batches, produced by a
        background thread (and a decode pool) a few batches ahead."""
        self.live_backbone()  # built (on Spark) on this thread, before the loader starts
        return prefetch(self._read(shard_no), depth=3)

    def _read(self, shard_no: int) -> Iterator[Any]:
        table = pq.read_table(Path(self.input_dir) / shard_name(shard_no))
        yield table.drop_columns(["image"])
        names = table.column("image_name").to_pylist()
        blobs = table.column("image").to_pylist()
        with (
            ThreadPoolExecutor(loader_workers(self.compute), "vitlab-decode") as pool,
            loader_stream(self.compute),
        ):
            for n, b in zip(chunks(names, self.batch_size), chunks(blobs, self.batch_size)):
                yield decode_batch(b, n, pool, self.compute)

    def run(
        self, loaded: Iterator[Any], progress: Callable[[int], Any] | None
    ) -> tuple[pa.Table, dict[str, Any]]:
        backbone = self.live_backbone()
        table = next(loaded)
        vectors = []
        for batch_vectors in embed_batches(backbone, self.features, loaded, self.compute):
            vectors.append(batch_vectors)
            if progress:
                progress(len(batch_vectors))
        if not vectors:  # every image of the shard was skipped by prepare
            vectors.append(np.zeros((0, feature_dim(backbone, self.features)), np.float32))
        column = embeddings_to_arrow(np.concatenate(vectors))
        return table.append_column("embedding", column), {}


def feature_dim(backbone: Backbone, features: FeatureReducer) -> int:
    size = backbone.input_spec.size
    device = next(backbone.parameters()).device
    pixels = torch.zeros(1, 3, size, size, device=device)
    return int(embed_pixels(backbone, features, pixels).shape[1])


def embed_prepared(
    prepared: ShardedStage,
    backbone: Backbone,
    features: FeatureReducer,
    cache_dir: str | Path,
    batch_size: int | str = 64,
    engine: Any = None,
    compute: Compute = CPU,
) -> ShardedStage:
    """Embedding shards for prepared shards (cached); `engine` defaults to the local one. The
    backbone is on `compute.device` (in-process; a Spark executor places its own)."""
    engine = engine or LocalEngine()
    key = embed_key(prepared.key, backbone, features, compute)
    batch_size = forward_batch_size(batch_size, backbone, features, compute)
    params = {
        "prepared": prepared.key,
        "backbone": backbone.identity(),
        "features": features.params(),
        **compute.cache_params(),
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
            compute=compute,
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
