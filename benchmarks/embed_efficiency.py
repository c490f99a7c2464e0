"""Embed-stage efficiency: end-to-end images/s of `embed_prepared` divided by model-only images/s.

End to end = read prepared Parquet shards + decode JPEGs + preprocess + backbone forward + write
embedding shards, on a cache miss (a fresh cache dir per repeat; the prepare stage is done before
any timing). Model only = `embed_pixels(backbone, features, pixels)` on pre-made normalised
tensors of the same batch sizes and resolution, under `torch.inference_mode`. Both are measured in
the same process, after one warm-up forward, interleaved over N repeats; each side's best repeat
(least disturbed by other load on the machine) is reported; the target is ratio >= 0.85.

With `--profile` (on by default when the tiny ViT misses the target) one more instrumented
end-to-end run splits the time by component (parquet read, decode, preprocess, forward, write,
progress bar, waiting for data) and measures the CPU cost of each component in isolation.

Run (from the repo root):
    PYTHONPATH=src python benchmarks/embed_efficiency.py
    PYTHONPATH=src python benchmarks/embed_efficiency.py --models tiny --tiny-images 2048 --profile
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

import vitlab.stages.embed as embed_mod
from vitlab.data.loading import decode_uint8_batch
from vitlab.data.shards import ShardedStage
from vitlab.data.synthetic.plantclef import (
    METADATA_FILE,
    TRAIN_IMAGES_DIR,
    PlantClefSyntheticSpec,
    generate_plantclef,
)
from vitlab.models.backbones import Backbone, create_backbone, preprocess_batch
from vitlab.models.features import ClsToken
from vitlab.stages.embed import embed_pixels, embed_prepared
from vitlab.stages.prepare import PrepareParams, prepare_training_images

TARGET_RATIO = 0.85
N_SPECIES = 16  # synthetic species; images are spread evenly over them


@dataclass(frozen=True)
class ModelSetup:
    label: str
    name: str
    model_kwargs: dict[str, Any]
    input_size: int


MODELS = {
    "tiny": ModelSetup(
        "tiny ViT (vit_tiny_patch16_224, depth 4)",
        "vit_tiny_patch16_224",
        {"img_size": 128, "depth": 4},
        128,
    ),
    "vitb": ModelSetup(
        "ViT-B/14 (vit_base_patch14_dinov2)",
        "vit_base_patch14_dinov2.lvd142m",
        {"img_size": 224},
        224,
    ),
}


@dataclass
class Measurement:
    model: str
    batch_size: int
    images: int
    model_only: list[float]  # img/s per repeat
    end_to_end: list[float]

    @property
    def ratio(self) -> float:
        return max(self.end_to_end) / max(self.model_only)


def build_backbone(setup: ModelSetup) -> Backbone:
    return create_backbone(
        kind="timm",
        name=setup.name,
        pretrained=False,
        model_kwargs=setup.model_kwargs,
        input_size=setup.input_size,
    )


def make_dataset(root: Path, n_images: int, seed: int) -> Path:
    """Synthetic PlantCLEF with about n_images training images (rounded up to N_SPECIES)."""
    per_species = max(1, math.ceil(n_images / N_SPECIES))
    spec = PlantClefSyntheticSpec(
        seed=seed,
        n_species=N_SPECIES,
        n_rare_species=0,
        max_images_per_species=per_species,
        min_images_per_species=per_species,
        n_quadrats=1,
    )
    return generate_plantclef(root, spec)


def prepare(data_root: Path, cache_dir: Path, params: PrepareParams) -> ShardedStage:
    return prepare_training_images(
        data_root / METADATA_FILE, data_root / TRAIN_IMAGES_DIR, cache_dir, params
    )


def batch_sizes(n_images: int, batch_size: int) -> list[int]:
    full, rest = divmod(n_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def model_only_rate(backbone: Backbone, n_images: int, batch_size: int) -> float:
    """img/s of the forward + feature reduction alone, same batch composition as the stage."""
    size = backbone.input_spec.size
    generator = torch.Generator().manual_seed(0)
    pixels = {
        b: torch.randn(b, 3, size, size, generator=generator)
        for b in set(batch_sizes(n_images, batch_size))
    }
    features = ClsToken()
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batch_sizes(n_images, batch_size):
            embed_pixels(backbone, features, pixels[b])
    return n_images / (time.perf_counter() - start)


def end_to_end_rate(
    prepared: ShardedStage, backbone: Backbone, batch_size: int, cache_dir: Path
) -> float:
    """img/s of `embed_prepared` on a cache miss (cache_dir must be fresh)."""
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    start = time.perf_counter()
    stage = embed_prepared(prepared, backbone, ClsToken(), cache_dir, batch_size)
    elapsed = time.perf_counter() - start
    rows = stage.manifest["report"]["rows"]
    shutil.rmtree(cache_dir)
    return rows / elapsed


def warm_up(backbone: Backbone, batch_size: int) -> None:
    size = backbone.input_spec.size
    embed_pixels(backbone, ClsToken(), torch.randn(batch_size, 3, size, size))


def measure(
    key: str,
    n_images: int,
    batch_size: int,
    repeats: int,
    work: Path,
    params: PrepareParams,
    seed: int,
) -> tuple[Measurement, ShardedStage, Backbone]:
    setup = MODELS[key]
    print(f"[{key}] generating ~{n_images} images and preparing them ...", flush=True)
    data_root = make_dataset(work / f"data-{key}", n_images, seed)
    prepared = prepare(data_root, work / f"prepare-cache-{key}", params)
    n_prepared = prepared.manifest["report"]["images_written"]
    backbone = build_backbone(setup)
    print(f"[{key}] warm-up forward (batch {batch_size}) ...", flush=True)
    warm_up(backbone, batch_size)
    result = Measurement(setup.label, batch_size, n_prepared, [], [])
    for r in range(repeats):
        # alternate the order so slow drift of the machine does not favour one side
        if r % 2 == 0:
            result.model_only.append(model_only_rate(backbone, n_prepared, batch_size))
            result.end_to_end.append(
                end_to_end_rate(prepared, backbone, batch_size, work / f"embed-cache-{key}")
            )
        else:
            result.end_to_end.append(
                end_to_end_rate(prepared, backbone, batch_size, work / f"embed-cache-{key}")
            )
            result.model_only.append(model_only_rate(backbone, n_prepared, batch_size))
        print(
            f"[{key}] repeat {r + 1}/{repeats}: model-only {result.model_only[-1]:.1f} img/s, "
            f"end-to-end {result.end_to_end[-1]:.1f} img/s",
            flush=True,
        )
    return result, prepared, backbone


# ---------------------------------------------------------------------------------------------
# Profile of one end-to-end run: wrap the functions `embed_prepared` calls with timers.


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed

    def wrap_iterator(self, name: str, items: Iterator[Any]) -> Iterator[Any]:
        """Time spent inside next() of an iterator (for generators: producing each item)."""
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.add(name, time.perf_counter() - start)
            yield item


class TimedBar:
    """Progress bar proxy whose update() is timed."""

    def __init__(self, bar: Any, timers: Timers) -> None:
        self.bar, self.timers = bar, timers

    def update(self, n: int = 1) -> None:
        start = time.perf_counter()
        self.bar.update(n)
        self.timers.add("main: progress bar update", time.perf_counter() - start)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    """Temporarily replace what `vitlab.stages.embed` calls with timed versions."""
    saved_embed = {
        n: getattr(embed_mod, n)
        for n in (
            "embed_pixels",
            "preprocess_batch",
            "decode_uint8_batch",
            "prefetch",
            "progress",
            "_decoded_batches",
        )
    }
    saved_read, saved_write = pq.read_table, ShardedStage.write_shard

    def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
        return timers.wrap_iterator(
            "main: waiting for decoded batch", saved_embed["prefetch"](items, depth)
        )

    def decoded_batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
        return timers.wrap_iterator(
            "loader: whole producer (read+to_pylist+decode)",
            saved_embed["_decoded_batches"](*args, **kwargs),
        )

    embed_mod.embed_pixels = timers.wrap(
        "main: forward (embed_pixels)", saved_embed["embed_pixels"]
    )
    embed_mod.preprocess_batch = timers.wrap(
        "main: preprocess_batch", saved_embed["preprocess_batch"]
    )
    embed_mod.decode_uint8_batch = timers.wrap(
        "loader: decode_uint8_batch (2-thread pool)", saved_embed["decode_uint8_batch"]
    )
    embed_mod.prefetch = prefetch
    embed_mod._decoded_batches = decoded_batches
    embed_mod.progress = lambda *a, **k: TimedBar(saved_embed["progress"](*a, **k), timers)
    pq.read_table = timers.wrap("loader: parquet read_table", saved_read)
    ShardedStage.write_shard = timers.wrap(
        "main: write_shard (parquet write + manifest)", saved_write
    )
    try:
        yield
    finally:
        for name, fn in saved_embed.items():
            setattr(embed_mod, name, fn)
        pq.read_table, ShardedStage.write_shard = saved_read, saved_write


def isolated_costs(prepared: ShardedStage, backbone: Backbone, batch_size: int) -> dict[str, float]:
    """CPU ms per image of each component run alone, one after the other (no overlap)."""
    costs: dict[str, float] = {}
    start = time.perf_counter()
    tables = [pq.read_table(p) for p in prepared.shard_paths()]
    n = sum(t.num_rows for t in tables)
    costs["parquet read_table"] = time.perf_counter() - start
    start = time.perf_counter()
    columns = [(t.column("image_name").to_pylist(), t.column("image").to_pylist()) for t in tables]
    costs["column to_pylist"] = time.perf_counter() - start
    batches = []
    start = time.perf_counter()
    for names, blobs in columns:
        for i in range(0, len(blobs), batch_size):
            batches.append(decode_uint8_batch(blobs[i : i + batch_size], names[i : i + batch_size]))
    costs["JPEG decode (1 thread)"] = time.perf_counter() - start
    start = time.perf_counter()
    pixels = [preprocess_batch(b, backbone.input_spec) for b in batches]
    costs["preprocess_batch"] = time.perf_counter() - start
    start = time.perf_counter()
    vectors = [embed_pixels(backbone, ClsToken(), p) for p in pixels]
    costs["forward (embed_pixels)"] = time.perf_counter() - start
    start = time.perf_counter()
    embeddings = torch.cat(vectors).float().numpy()
    offset = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, table in enumerate(tables):
            rows = embeddings[offset : offset + table.num_rows]
            offset += table.num_rows
            out = table.drop_columns(["image"])
            out = out.append_column("embedding", embed_mod.embeddings_to_arrow(rows))
            pq.write_table(out, Path(tmp) / f"part-{i}.parquet")
    costs["build + write embedding shard"] = time.perf_counter() - start
    return {k: 1000 * v / n for k, v in costs.items()}


def instrumented_run(
    prepared: ShardedStage, backbone: Backbone, batch_size: int, cache_dir: Path
) -> tuple[Timers, float, int]:
    timers = Timers()
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    with instrumented(timers):
        start = time.perf_counter()
        stage = embed_prepared(prepared, backbone, ClsToken(), cache_dir, batch_size)
        wall = time.perf_counter() - start
    shutil.rmtree(cache_dir)
    return timers, wall, stage.manifest["report"]["rows"]


def profile(
    prepared: ShardedStage,
    backbone: Backbone,
    batch_size: int,
    work: Path,
    model_only_ips: float,
    repeats: int,
) -> None:
    runs = [
        instrumented_run(prepared, backbone, batch_size, work / "embed-cache-profile")
        for _ in range(repeats)
    ]
    timers, wall, n = min(runs, key=lambda run: run[1])
    print(
        f"\n### Profile: fastest of {repeats} instrumented end-to-end runs ({n} images, "
        f"batch {batch_size}, {torch.get_num_threads()} torch threads)\n"
    )
    print(
        f"wall time {wall:.3f} s = {n / wall:.1f} img/s; model-only {model_only_ips:.1f} img/s "
        f"would take {n / model_only_ips:.3f} s\n"
    )
    print("| component | calls | total s | ms/img | % of wall |")
    print("|---|---:|---:|---:|---:|")
    main_total = 0.0
    for name in sorted(timers.seconds, key=lambda k: (not k.startswith("main"), k)):
        seconds = timers.seconds[name]
        if name.startswith("main"):
            main_total += seconds
        print(
            f"| {name} | {timers.calls[name]} | {seconds:.3f} | {1000 * seconds / n:.3f} | "
            f"{100 * seconds / wall:.1f} |"
        )
    other = wall - main_total
    print(
        f"| main: other (setup, concat, finish, manifest) | - | {other:.3f} | "
        f"{1000 * other / n:.3f} | {100 * other / wall:.1f} |"
    )
    forward = timers.seconds["main: forward (embed_pixels)"]
    print(
        f"\nforward inside the stage: {n / forward:.1f} img/s vs {model_only_ips:.1f} img/s "
        f"alone -> {100 * (1 - n / forward / model_only_ips):.1f}% slower from CPU contention "
        "with the loader threads (main: rows overlap nothing; loader: rows run in background "
        "threads, concurrently with main)"
    )
    print("\n### Isolated CPU cost per image (components run alone, sequentially)\n")
    print("| component | ms/img |")
    print("|---|---:|")
    for name, ms in isolated_costs(prepared, backbone, batch_size).items():
        print(f"| {name} | {ms:.3f} |")


def print_table(rows: list[Measurement]) -> None:
    print(
        "\n| model | batch size | images | model-only img/s | end-to-end img/s | ratio | "
        f"target >= {TARGET_RATIO} |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for m in rows:
        mo, e2e = max(m.model_only), max(m.end_to_end)
        verdict = "ok" if m.ratio >= TARGET_RATIO else "BELOW"
        print(
            f"| {m.model} | {m.batch_size} | {m.images} | {mo:.1f} | {e2e:.1f} | "
            f"{m.ratio:.3f} | {verdict} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "vitb"])
    parser.add_argument("--tiny-images", type=int, default=1024, help="images for the tiny ViT")
    parser.add_argument("--vitb-images", type=int, default=128, help="images for ViT-B/14")
    parser.add_argument("--batch-size", type=int, default=64, help="embed.batch_size")
    parser.add_argument("--tiny-repeats", type=int, default=3, help="best of N interleaved repeats")
    parser.add_argument("--vitb-repeats", type=int, default=1, help="best of N interleaved repeats")
    parser.add_argument(
        "--prepare-size",
        type=int,
        default=128,
        help="prepare.image_size (train.yaml default: 128 for every backbone)",
    )
    parser.add_argument("--shard-size", type=int, default=2048, help="prepare.shard_size")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the tiny ViT run even when it meets the target",
    )
    parser.add_argument("--no-profile", action="store_true", help="never profile")
    parser.add_argument("--profile-repeats", type=int, default=3, help="fastest of N is shown")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where data and caches go (default: a temp dir, deleted after)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vitlab-embed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    params = PrepareParams(image_size=args.prepare_size, shard_size=args.shard_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work dir {work}")
    report_load("start")
    rows: list[Measurement] = []
    try:
        for key in args.models:
            n_images = args.tiny_images if key == "tiny" else args.vitb_images
            repeats = args.tiny_repeats if key == "tiny" else args.vitb_repeats
            result, prepared, backbone = measure(
                key, n_images, args.batch_size, repeats, work, params, args.seed
            )
            rows.append(result)
            below = result.ratio < TARGET_RATIO
            if key == "tiny" and not args.no_profile and (args.profile or below):
                best = max(result.model_only)
                profile(prepared, backbone, args.batch_size, work, best, args.profile_repeats)
        report_load("end")
        print_table(rows)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report_load(when: str) -> None:
    """Other processes on the machine skew the figures: show the 1-minute load average."""
    load = os.getloadavg()[0]
    note = "" if load < 0.5 else " (machine busy: expect noisy figures)"
    print(f"load average at {when}: {load:.2f} on {os.cpu_count()} cores{note}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
