"""Embed-stage efficiency: end-to-end images/s of `embed_prepared` divided by model-only images/s.

End to end = read prepared Parquet shards + decode JPEGs + preprocess + backbone forward + write
embedding shards, on a cache miss (a fresh cache dir per repeat; the prepare stage is done before
any timing). Model only = `embed_pixels(backbone, features, pixels)` on pre-made normalised
tensors of the same batch sizes and resolution, under `torch.inference_mode`, measured two ways:
one forward at a time on all torch threads, and forwards side by side as the stage runs them
(`vitlab.stages.embed.map_side_by_side`: the threads split over data-parallel forwards). All
three are measured in the same process, after one warm-up forward, interleaved over N repeats;
the headline is the median of the per-repeat ratios, target >= 0.90; the ratio to the side-by-side
model-only (the stage's cost beyond its own way of running the model) is printed beside it.

With `--profile` (on by default when the tiny ViT misses the target) instrumented end-to-end runs
split the time by component (parquet read, decode, preprocess, forward, write, progress bar,
waiting for data) and each component's cost is also measured alone. `--what-if` times the
end-to-end run with candidate fixes patched into `vitlab.stages.embed` (src/ is not changed);
on a shared 2-core machine differences below ~0.05 in ratio are within run-to-run noise.

Run (from the repo root):
    PYTHONPATH=src python benchmarks/embed_efficiency.py
    PYTHONPATH=src python benchmarks/embed_efficiency.py --models tiny --profile --what-if
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from _machine import (
    QUIET_THRESHOLD,
    add_noise_arguments,
    format_share,
    is_quiet,
    report_load,
    set_quiet_wait,
    timed_with_noise,
)

import vitlab.engines.local as local_engine
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
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.embed import embed_pixels, embed_prepared, map_side_by_side
from vitlab.stages.prepare import PrepareParams

TARGET_RATIO = 0.90
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
    model_only: list[tuple[float, float | None]]  # (img/s, others' CPU share) per repeat
    end_to_end: list[tuple[float, float | None]]
    # model only with the stage's forwards side by side (same img/s, share pairs)
    side_by_side: list[tuple[float, float | None]] = field(default_factory=list)

    @property
    def best_model_only(self) -> tuple[float, float | None]:
        return max(self.model_only, key=lambda x: x[0])

    @property
    def best_end_to_end(self) -> tuple[float, float | None]:
        return max(self.end_to_end, key=lambda x: x[0])

    @property
    def best_ratio(self) -> float:
        return self.best_end_to_end[0] / self.best_model_only[0]

    def pair_ratios(self) -> list[float]:
        """end-to-end / model-only of every repeat (the two runs are adjacent in time)."""
        return [e2e / mo for (mo, _), (e2e, _) in zip(self.model_only, self.end_to_end)]

    @property
    def ratio(self) -> float:
        """The headline: median of the per-pair ratios (best-of-N favours the luckier side)."""
        return statistics.median(self.pair_ratios())

    def side_by_side_ratios(self) -> list[float]:
        """end-to-end / model-only with forwards side by side, per repeat."""
        return [e2e / mo for (mo, _), (e2e, _) in zip(self.side_by_side, self.end_to_end)]

    def clean_pair_ratios(self) -> list[float]:
        """end-to-end / model-only of each repeat (the two runs are adjacent in time) where
        other processes left the machine quiet during both runs."""
        return [
            e2e / mo
            for (mo, mo_noise), (e2e, e2e_noise) in zip(self.model_only, self.end_to_end)
            if is_quiet(mo_noise) and is_quiet(e2e_noise)
        ]


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


def model_only_rate(
    backbone: Backbone, n_images: int, batch_size: int, side_by_side: bool = False
) -> tuple[float, float | None]:
    """img/s of the forward + feature reduction alone, same batch composition as the stage,
    and the share of the machine's CPU other processes used meanwhile. `side_by_side`: the
    forwards run the way the embed stage runs them (`map_side_by_side`: the torch threads split
    over data-parallel forwards); otherwise one at a time on all torch threads."""
    size = backbone.input_spec.size
    generator = torch.Generator().manual_seed(0)
    pixels = {
        b: torch.randn(b, 3, size, size, generator=generator)
        for b in set(batch_sizes(n_images, batch_size))
    }
    features = ClsToken()

    def forward(batch: torch.Tensor) -> Any:
        return embed_pixels(backbone, features, batch).numpy()

    def run() -> None:
        forwards = map_side_by_side if side_by_side else map
        for _ in forwards(forward, [pixels[b] for b in batch_sizes(n_images, batch_size)]):
            pass

    _, seconds, others = timed_with_noise(run)
    return n_images / seconds, others


def end_to_end_rate(
    prepared: ShardedStage, backbone: Backbone, batch_size: int, cache_dir: Path
) -> tuple[float, float | None]:
    """img/s of `embed_prepared` on a cache miss (a fresh cache_dir), and the share of the
    machine's CPU other processes used meanwhile."""
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    stage, seconds, others = timed_with_noise(
        lambda: embed_prepared(prepared, backbone, ClsToken(), cache_dir, batch_size)
    )
    rows = stage.manifest["report"]["rows"]
    shutil.rmtree(cache_dir)
    return rows / seconds, others


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
    disk = sum(path.stat().st_size for path in prepared.shard_paths())
    print(
        f"[{key}] prepared shards ({params.encoding}, {params.image_size} px): "
        f"{disk / n_prepared / 1024:.1f} KiB per image",
        flush=True,
    )
    backbone = build_backbone(setup)
    print(f"[{key}] warm-up forward (batch {batch_size}) ...", flush=True)
    warm_up(backbone, batch_size)
    result = Measurement(setup.label, batch_size, n_prepared, [], [])
    runs: list[tuple[list[tuple[float, float | None]], Callable[[], Any]]] = [
        (result.model_only, lambda: model_only_rate(backbone, n_prepared, batch_size)),
        (
            result.end_to_end,
            lambda: end_to_end_rate(prepared, backbone, batch_size, work / f"embed-cache-{key}"),
        ),
        (
            result.side_by_side,
            lambda: model_only_rate(backbone, n_prepared, batch_size, side_by_side=True),
        ),
    ]
    for r in range(repeats):
        # rotate the order so slow drift of the machine does not favour one side
        for into, run in runs[r % 3 :] + runs[: r % 3]:
            into.append(run())
        (mo, mo_noise), (e2e, e2e_noise) = result.model_only[-1], result.end_to_end[-1]
        sbs, sbs_noise = result.side_by_side[-1]
        print(
            f"[{key}] repeat {r + 1}/{repeats}: model-only {mo:.1f} img/s "
            f"(others' CPU {format_share(mo_noise)}), side by side {sbs:.1f} img/s "
            f"({format_share(sbs_noise)}), end-to-end {e2e:.1f} img/s "
            f"({format_share(e2e_noise)})",
            flush=True,
        )
    return result, prepared, backbone


FORWARD_LABEL = "workers: forward (embed_pixels)"

# ---------------------------------------------------------------------------------------------
# Profile of one end-to-end run: wrap the functions `embed_prepared` calls with timers.


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.others: float | None = None  # share of the CPU other processes used meanwhile

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
    """Temporarily replace what the embed stage calls with timed versions. Built for the stage
    as of this writing (EmbedShardTask in vitlab.stages.embed, run by the local engine); names
    that no longer exist are skipped and reported."""
    patches: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)
    missing: list[str] = []

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return
        patches.append((owner, name, original))
        setattr(owner, name, make(original))

    def timed_prefetch(original: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
            producer = timers.wrap_iterator("loader: producer thread, per batch", iter(items))
            return timers.wrap_iterator(
                "main: waiting for decoded batch", original(producer, depth)
            )

        return prefetch

    def timed_progress(original: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a, **k: TimedBar(original(*a, **k), timers)

    patch(embed_mod, "embed_pixels", lambda f: timers.wrap(FORWARD_LABEL, f))
    patch(embed_mod, "preprocess_batch", lambda f: timers.wrap("workers: preprocess_batch", f))
    patch(
        embed_mod,
        "decode_uint8_batch",
        lambda f: timers.wrap("loader: decode_uint8_batch (2-thread pool)", f),
    )
    patch(embed_mod, "prefetch", timed_prefetch)
    patch(local_engine, "progress", timed_progress)
    patch(pq, "read_table", lambda f: timers.wrap("main: parquet read_table", f))
    patch(
        ShardedStage,
        "write_shard",
        lambda f: timers.wrap("main: write_shard (parquet write + manifest)", f),
    )
    if missing:
        print(f"profile: not instrumented (gone from src): {', '.join(missing)}")
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def isolated_costs(prepared: ShardedStage, backbone: Backbone, batch_size: int) -> dict[str, float]:
    """Wall ms per image of each component run alone, batch by batch like the stage, with no
    overlap between components (decode on 1 thread, torch ops on the torch thread pool)."""
    costs: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        costs[name] += time.perf_counter() - start

    features = ClsToken()
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(prepared.shard_paths()):
            with timed("parquet read_table"):
                table = pq.read_table(path)
            with timed("column to_pylist"):
                names = table.column("image_name").to_pylist()
                blobs = table.column("image").to_pylist()
            vectors = []
            for b in range(0, len(blobs), batch_size):
                with timed("JPEG decode (1 thread)"):
                    images = decode_uint8_batch(
                        blobs[b : b + batch_size], names[b : b + batch_size]
                    )
                with timed("preprocess_batch"):
                    pixels = preprocess_batch(images, backbone.input_spec)
                with timed("forward (embed_pixels)"):
                    vectors.append(embed_pixels(backbone, features, pixels))
            with timed("build + write embedding shard"):
                rows = torch.cat(vectors).float().numpy()
                out = table.drop_columns(["image"])
                out = out.append_column("embedding", embed_mod.embeddings_to_arrow(rows))
                pq.write_table(out, Path(tmp) / f"part-{i}.parquet")
            n += table.num_rows
    return {k: 1000 * v / n for k, v in costs.items()}


# ---------------------------------------------------------------------------------------------
# What-if: the same end-to-end run with candidate replacements patched into vitlab.stages.embed
# (nothing in src/ is changed), to size the gain of each suggested fix.


def loader_preprocess(
    decode: Callable[..., Any], spec: Any, preprocess: Callable[..., torch.Tensor] | None = None
) -> Callable[..., torch.Tensor]:
    """decode_uint8_batch that also normalises, so it runs in the prefetch (loader) thread."""
    preprocess = preprocess or preprocess_batch

    def decode_and_preprocess(blobs: Any, names: Any, pool: Any = None) -> torch.Tensor:
        return preprocess(decode(blobs, names, pool), spec)

    return decode_and_preprocess


def already_preprocessed(images: torch.Tensor, spec: Any) -> torch.Tensor:
    return images


@contextmanager
def patched(**replacements: Any) -> Iterator[None]:
    saved = {name: getattr(embed_mod, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(embed_mod, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(embed_mod, name, fn)


def what_if(
    prepared: ShardedStage, backbone: Backbone, batch_size: int, work: Path, repeats: int
) -> None:
    spec = backbone.input_spec
    in_loader = {
        "decode_uint8_batch": loader_preprocess(embed_mod.decode_uint8_batch, spec),
        "preprocess_batch": already_preprocessed,
    }
    variants: dict[str, dict[str, Any]] = {
        "as is": {},
        "one forward at a time on all threads (before)": {
            "forward_workers": lambda threads: (1, threads)
        },
        "decode pool of 1 thread (not 2)": {"decode_pool_size": lambda *_: 1},
        "batch split in 2 parts per forward": {
            "row_slices": lambda rows, parts, _split=embed_mod.row_slices: _split(rows, 2 * parts)
        },
        "preprocess in the loader thread": in_loader,
    }
    n_images = prepared.manifest["report"]["images_written"]
    model_only: list[tuple[float, float | None]] = []
    rates: dict[str, list[tuple[float, float | None]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):  # interleaved with model-only runs, order rotated, best of N
        model_only.append(model_only_rate(backbone, n_images, batch_size))
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with patched(**variants[name]):
                rates[name].append(
                    end_to_end_rate(prepared, backbone, batch_size, work / "embed-cache-whatif")
                )
    best_model, model_noise = max(model_only, key=lambda x: x[0])
    print(f"\n### What-if: end-to-end with candidate fixes patched in (best of {repeats})\n")
    median_model = statistics.median(v for v, _ in model_only)
    print("| variant | best img/s | ratio (best / best) | median img/s | ratio (median / median) |")
    print("|---|---:|---:|---:|---:|")
    model_row = f"{best_model:.1f} | 1.000 | {median_model:.1f} | 1.000"
    label = f"model only, measured alongside (others' CPU {format_share(model_noise)})"
    print(f"| {label} | {model_row} |")
    for name, values in rates.items():
        rate, _ = max(values, key=lambda x: x[0])
        median = statistics.median(v for v, _ in values)
        print(
            f"| {name} | {rate:.1f} | {rate / best_model:.3f} | {median:.1f} | "
            f"{median / median_model:.3f} |"
        )


def instrumented_run(
    prepared: ShardedStage, backbone: Backbone, batch_size: int, cache_dir: Path
) -> tuple[Timers, float, int]:
    timers = Timers()
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    with instrumented(timers):
        stage, wall, others = timed_with_noise(
            lambda: embed_prepared(prepared, backbone, ClsToken(), cache_dir, batch_size)
        )
    shutil.rmtree(cache_dir)
    timers.others = others
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
        f"would take {n / model_only_ips:.3f} s; others' CPU {format_share(timers.others)}\n"
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
        f"| main: waiting for the forwards, setup, concat, finish | - | {other:.3f} | "
        f"{1000 * other / n:.3f} | {100 * other / wall:.1f} |"
    )
    workers, threads_each = embed_mod.forward_workers(torch.get_num_threads())
    busy = timers.seconds[FORWARD_LABEL] / workers
    print(
        f"\nforwards inside the stage: {workers} side by side with {threads_each} torch "
        f"thread(s) each, each busy {busy:.3f} s ({100 * busy / wall:.0f}% of the wall time). "
        "main: rows are sequential on the main thread and add up to the wall time; loader: and "
        "workers: rows run in background threads, concurrently with main (their totals add up "
        "over threads)."
    )
    print("\n### Isolated cost per image (components run alone, sequentially)\n")
    print("| component | ms/img |")
    print("|---|---:|")
    for name, ms in isolated_costs(prepared, backbone, batch_size).items():
        print(f"| {name} | {ms:.3f} |")


def describe_ratios(ratios: list[float]) -> str:
    """median [IQR; range] (n) of paired ratios."""
    pairs = sorted(ratios)
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    return (
        f"{statistics.median(pairs):.3f} [{quartiles[0]:.3f}-{quartiles[2]:.3f}; "
        f"{pairs[0]:.3f}-{pairs[-1]:.3f}] ({len(pairs)})"
    )


def print_table(rows: list[Measurement]) -> None:
    print(
        "\n| model | batch size | images | model-only img/s (median) | model-only side by side "
        "img/s (median) | end-to-end img/s (median) | paired ratio to model-only: median [IQR; "
        f"range] (n) | >= {TARGET_RATIO} | paired ratio to model-only side by side | "
        f">= {TARGET_RATIO} | best / best | median ratio of clean pairs (range, n) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|---:|---|")
    for m in rows:
        verdict = "ok" if m.ratio >= TARGET_RATIO else "BELOW"
        side_by_side = statistics.median(m.side_by_side_ratios())
        side_by_side_verdict = "ok" if side_by_side >= TARGET_RATIO else "BELOW"
        clean = m.clean_pair_ratios()
        clean_text = (
            f"{statistics.median(clean):.3f} ({min(clean):.3f}-{max(clean):.3f}, {len(clean)})"
            if clean
            else "no clean pair"
        )
        mo = statistics.median(v for v, _ in m.model_only)
        sbs = statistics.median(v for v, _ in m.side_by_side)
        e2e = statistics.median(v for v, _ in m.end_to_end)
        print(
            f"| {m.model} | {m.batch_size} | {m.images} | {mo:.1f} | {sbs:.1f} | {e2e:.1f} | "
            f"{describe_ratios(m.pair_ratios())} | {verdict} | "
            f"{describe_ratios(m.side_by_side_ratios())} | {side_by_side_verdict} | "
            f"{m.best_ratio:.3f} | {clean_text} |"
        )
    print(
        "\nPaired ratio: end-to-end / model-only of each repeat, the runs adjacent in time "
        "(so they see about the same machine load); the median of these is the headline figure. "
        "Model-only runs one forward at a time on all torch threads; model-only side by side "
        "splits the threads over data-parallel forwards as the stage does, so the second ratio "
        "is the stage's cost beyond its own way of running the model. "
        "Clean pair: a repeat whose two runs both had others' CPU < "
        f"{QUIET_THRESHOLD:.0%} (others' CPU = share of the machine's CPU time used by other "
        "processes during a run)."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "vitb"])
    parser.add_argument("--tiny-images", type=int, default=1024, help="images for the tiny ViT")
    parser.add_argument("--vitb-images", type=int, default=64, help="images for ViT-B/14")
    parser.add_argument("--batch-size", type=int, default=64, help="embed.batch_size")
    parser.add_argument("--tiny-repeats", type=int, default=8, help="best of N interleaved repeats")
    parser.add_argument("--vitb-repeats", type=int, default=3, help="best of N interleaved repeats")
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
    parser.add_argument(
        "--what-if",
        action="store_true",
        help="also time the tiny ViT's end-to-end run with candidate fixes patched in",
    )
    parser.add_argument("--profile-repeats", type=int, default=3, help="fastest of N is shown")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where data and caches go (default: a temp dir, deleted after)",
    )
    parser.add_argument(
        "--encoding",
        choices=["jpeg", "raw"],
        default="jpeg",
        help="prepare.encoding of the prepared shards (raw: no decode; its disk cost is printed)",
    )
    add_noise_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_quiet_wait(args.quiet_wait)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vitlab-embed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    params = PrepareParams(
        image_size=args.prepare_size, shard_size=args.shard_size, encoding=args.encoding
    )
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
                best = result.best_model_only[0]
                profile(prepared, backbone, args.batch_size, work, best, args.profile_repeats)
            if key == "tiny" and args.what_if:
                what_if(prepared, backbone, args.batch_size, work, args.profile_repeats)
        print_table(rows)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
