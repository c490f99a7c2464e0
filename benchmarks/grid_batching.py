"""Grid inference throughput: batched tile forwards vs one tile per forward.

Runs `predict_quadrats` with GridArgmax(3) on synthetic PlantCLEF quadrats, with an
EmbeddingHeadPredictor (random-init tiny ViT + CLS token + random LinearHead), twice:
batched (batch_size=64, quadrats_per_batch=4: the 36 tiles of 4 quadrats per forward) and
unbatched (batch_size=1, quadrats_per_batch=1). Tiles/s includes decoding the quadrats and cutting
the tiles (done in the predict stage's background thread); decoding and cutting alone (no model)
is timed too, as the ceiling the loader sets. Both settings are measured in the same
process, interleaved over N repeats, after a warm-up; each setting's best repeat is reported.
`--vitb` adds the random-init ViT-B/14 (224 px) on a few quadrats.

Run (from the repo root):
    PYTHONPATH=src python benchmarks/grid_batching.py
    PYTHONPATH=src python benchmarks/grid_batching.py --quadrats 32 --repeats 3 --vitb
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _machine import (
    add_noise_arguments,
    format_share,
    report_load,
    set_quiet_wait,
    timed_with_noise,
)

from vitlab.data.plantclef import list_test_images
from vitlab.data.synthetic.plantclef import (
    TEST_IMAGES_DIR,
    PlantClefSyntheticSpec,
    generate_plantclef,
)
from vitlab.inference.plantclef import GridArgmax
from vitlab.models.backbones import Backbone, create_backbone
from vitlab.models.features import ClsToken
from vitlab.models.heads import LinearHead
from vitlab.pipelines.plantclef.predict import EmbeddingHeadPredictor, cut_tiles, predict_quadrats

N_SPECIES = 12
SETTINGS = {"batched": (64, 4), "one tile per forward": (1, 1)}  # (batch_size, quadrats_per_batch)
CUT_ONLY = "decode + cut only"


@dataclass(frozen=True)
class ModelSetup:
    label: str
    name: str
    model_kwargs: dict[str, Any]
    input_size: int


TINY = ModelSetup(
    "tiny ViT (128 px, depth 4)", "vit_tiny_patch16_224", {"img_size": 128, "depth": 4}, 128
)
VITB = ModelSetup("ViT-B/14 (224 px)", "vit_base_patch14_dinov2.lvd142m", {"img_size": 224}, 224)


def make_quadrats(root: Path, n_quadrats: int, seed: int) -> tuple[list[Path], list[int]]:
    """Synthetic quadrats (few training images: only the test quadrats are used)."""
    spec = PlantClefSyntheticSpec(
        seed=seed,
        n_species=N_SPECIES,
        n_rare_species=0,
        max_images_per_species=2,
        min_images_per_species=2,
        n_quadrats=n_quadrats,
    )
    generate_plantclef(root, spec)
    return list_test_images(root / TEST_IMAGES_DIR), list(range(N_SPECIES))


def build_predictor(setup: ModelSetup, species_ids: list[int]) -> EmbeddingHeadPredictor:
    backbone: Backbone = create_backbone(
        kind="timm",
        name=setup.name,
        pretrained=False,
        model_kwargs=setup.model_kwargs,
        input_size=setup.input_size,
    )
    torch.manual_seed(0)
    head = LinearHead(backbone.embed_dim, len(species_ids), log_softmax=True).eval()
    return EmbeddingHeadPredictor(backbone, ClsToken(), head, species_ids)


def tiles_per_second(
    paths: list[Path], predictor: EmbeddingHeadPredictor, batch_size: int, quadrats: int
) -> tuple[float, int, float | None]:
    """(tiles/s, tiles, share of the machine's CPU other processes used meanwhile)"""
    result, seconds, others = timed_with_noise(
        lambda: predict_quadrats(
            paths, GridArgmax(3), predictor, batch_size=batch_size, quadrats_per_batch=quadrats
        )
    )
    if result.skipped:
        raise RuntimeError(f"unreadable quadrats: {result.skipped}")
    return result.tile_count / seconds, result.tile_count, others


def cut_only_rate(paths: list[Path], size: int) -> tuple[float, int, float | None]:
    """tiles/s of decoding the quadrats and cutting the tiles alone (no model, one thread):
    what the predict stage's loader thread has to keep up with."""

    def cut_all() -> int:
        quadrats = [cut_tiles(p, GridArgmax(3), size, "center_crop") for p in paths]
        return sum(len(q.tiles) for q in quadrats if q.tiles is not None)

    tiles, seconds, others = timed_with_noise(cut_all)
    return tiles / seconds, tiles, others


def benchmark(
    setup: ModelSetup, paths: list[Path], species_ids: list[int], repeats: int
) -> dict[str, tuple[float, float | None]]:
    """Best tiles/s of each setting, with the others' CPU share during that run."""
    predictor = build_predictor(setup, species_ids)
    print(f"[{setup.label}] warm-up on {min(4, len(paths))} quadrats ...", flush=True)
    for batch_size, quadrats in SETTINGS.values():
        predict_quadrats(paths[:4], GridArgmax(3), predictor, batch_size, quadrats)
    names = [*SETTINGS, CUT_ONLY]
    rates: dict[str, list[tuple[float, float | None]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            if name == CUT_ONLY:
                rate, tiles, others = cut_only_rate(paths, setup.input_size)
            else:
                rate, tiles, others = tiles_per_second(paths, predictor, *SETTINGS[name])
            rates[name].append((rate, others))
            print(
                f"[{setup.label}] repeat {r + 1}/{repeats} {name}: {rate:.1f} tiles/s "
                f"({tiles} tiles, others' CPU {format_share(others)})",
                flush=True,
            )
    return {name: max(values, key=lambda x: x[0]) for name, values in rates.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quadrats", type=int, default=16, help="quadrats for the tiny ViT")
    parser.add_argument("--repeats", type=int, default=3, help="best of N interleaved repeats")
    parser.add_argument("--vitb", action="store_true", help="also benchmark ViT-B/14")
    parser.add_argument("--vitb-quadrats", type=int, default=4, help="quadrats for ViT-B/14")
    parser.add_argument("--vitb-repeats", type=int, default=1, help="repeats for ViT-B/14")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: temp dir, deleted")
    add_noise_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_quiet_wait(args.quiet_wait)
    logging.basicConfig(level=logging.WARNING)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vitlab-grid-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work dir {work}")
    report_load("start")
    rows: list[tuple[str, int, dict[str, tuple[float, float | None]]]] = []
    try:
        n_max = max(args.quadrats, args.vitb_quadrats if args.vitb else 0)
        print(f"generating {n_max} synthetic quadrats ...", flush=True)
        paths, species_ids = make_quadrats(work / "data", n_max, args.seed)
        rows.append(
            (
                TINY.label,
                args.quadrats,
                benchmark(TINY, paths[: args.quadrats], species_ids, args.repeats),
            )
        )
        if args.vitb:
            paths_b = paths[: args.vitb_quadrats]
            rows.append(
                (
                    VITB.label,
                    args.vitb_quadrats,
                    benchmark(VITB, paths_b, species_ids, args.vitb_repeats),
                )
            )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    names = list(SETTINGS)
    print("\nGridArgmax(3): 9 tiles per quadrat; tiles/s include quadrat decode + tile cutting\n")
    print(
        f"| model | quadrats | {names[0]} (64 / 4 quadrats) tiles/s | "
        f"{names[1]} (1 / 1) tiles/s | ratio batched / one-tile | "
        "decode + cut only tiles/s (no model) | others' CPU (batched / one-tile / cut) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, n, rates in rows:
        (batched, b_noise), (single, s_noise) = rates[names[0]], rates[names[1]]
        cut, c_noise = rates[CUT_ONLY]
        noise = " / ".join(format_share(x) for x in (b_noise, s_noise, c_noise))
        print(
            f"| {label} | {n} | {batched:.1f} | {single:.1f} | {batched / single:.2f}x | "
            f"{cut:.1f} | {noise} |"
        )
    print(
        "\nbest of the interleaved repeats for each setting; others' CPU = share of the machine's "
        "CPU time used by other processes during that run (should be ~0% for clean figures)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
