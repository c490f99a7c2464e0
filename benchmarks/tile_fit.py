"""How a non-square box reaches the backbone's square input (`predict.tile_fit`): per-plot F1 of
center_crop (the default), resize and pad, for full-image and grid-argmax inference, side by side.

Generates a synthetic PlantCLEF dataset whose quadrats are far from square (width and height
drawn independently from `--quadrat-size`, so aspect ratios reach 1:2 and 2:1), trains the
quickstart model once on it (`train.py`, tiny random-init ViT + linear head), then runs
`infer.py ckpt_path=<best> inference=<strategy> predict.tile_fit=<fit>` for every pair, offline
in a temp root (benchmarks/_runs.py), and prints a Markdown table per score, plus the per-plot
F1 of the quadrats whose long side is >= 4/3 of the short one (the real quadrats' shape).

Run (from the repo root; ~3 min per seed on 2 CPU cores):
    python benchmarks/tile_fit.py                     # seed 1
    python benchmarks/tile_fit.py --seeds 1 2 3 --quadrats 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _runs import REPO, run_entry, train_summary

sys.path.insert(0, str(REPO / "src"))

from PIL import Image  # noqa: E402

from vitlab.data.plantclef import plot_id_of, read_submission  # noqa: E402
from vitlab.data.synthetic.plantclef import (  # noqa: E402
    GROUND_TRUTH_FILE,
    TEST_IMAGES_DIR,
    PlantClefSyntheticSpec,
    generate_plantclef,
)
from vitlab.metrics.plantclef import per_plot_f1  # noqa: E402

FITS = ("center_crop", "resize", "pad")
STRATEGIES = ("full_image", "grid_argmax")
SCORES = ("macro_f1_per_plot", "macro_f1_per_species", "micro_f1")
WIDE = 4 / 3  # long side / short side from which a quadrat counts as clearly non-square
WIDE_SCORE = "macro_f1_per_plot, quadrats >= 4:3"


def dataset_overrides(data: Path) -> list[str]:
    return [f"dataset.root={data}", "dataset.synthetic=null"]


def run_seed(root: Path, seed: int, quadrats: int, size: tuple[int, int]) -> dict:
    """Scores by (strategy, fit) on one generated dataset, plus its quadrats' aspect ratios."""
    data = root / f"data_seed{seed}"
    spec = PlantClefSyntheticSpec(seed=seed, n_quadrats=quadrats, quadrat_size=size)
    generate_plantclef(data, spec)
    aspect = {}
    for path in sorted((data / TEST_IMAGES_DIR).iterdir()):
        with Image.open(path) as img:
            aspect[plot_id_of(path)] = max(img.size) / min(img.size)
    aspects = sorted(aspect.values())
    wide = [plot for plot, a in aspect.items() if a >= WIDE]
    truth = read_submission(data / GROUND_TRUTH_FILE)
    print(
        f"seed {seed}: {len(aspects)} quadrats, long/short side {min(aspects):.2f}-"
        f"{max(aspects):.2f} (median {aspects[len(aspects) // 2]:.2f}), {len(wide)} >= 4:3",
        flush=True,
    )
    train = train_summary(root, f"train_seed{seed}", *dataset_overrides(data))
    best = train["best_checkpoint"]
    scores = {}
    for strategy in STRATEGIES:
        for fit in FITS:
            name = f"infer_seed{seed}_{strategy}_{fit}"
            run_entry(
                "infer.py",
                root,
                f"hydra.run.dir={root}/{name}",
                f"ckpt_path={best}",
                f"inference={strategy}",
                f"predict.tile_fit={fit}",
                *dataset_overrides(data),
            )
            summary = json.loads((root / name / "summary.json").read_text())
            per_plot = per_plot_f1(truth, read_submission(root / name / "submission.csv"))
            scores[strategy, fit] = {
                **summary["scores"],
                WIDE_SCORE: sum(per_plot[p] for p in wide) / max(1, len(wide)),
            }
            shown = {k: round(v, 4) for k, v in scores[strategy, fit].items()}
            print(f"  {strategy:12s} {fit:12s} {shown}", flush=True)
    return {"scores": scores, "aspects": aspects}


def table(results: list[dict], score: str) -> str:
    lines = [
        f"{score} (mean over {len(results)} seed(s))",
        "| tile_fit | " + " | ".join(STRATEGIES) + " |",
        "|---|" + "---:|" * len(STRATEGIES),
    ]
    for fit in FITS:
        cells = []
        for strategy in STRATEGIES:
            values = [r["scores"][strategy, fit][score] for r in results]
            cells.append(f"{sum(values) / len(values):.3f}")
        lines.append(f"| {fit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--quadrats", type=int, default=40)
    parser.add_argument("--quadrat-size", type=int, nargs=2, default=[480, 960])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vitlab-tile-fit-") as tmp:
        root = (args.work_dir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        size = (args.quadrat_size[0], args.quadrat_size[1])
        results = [run_seed(root, seed, args.quadrats, size) for seed in args.seeds]
    print()
    for score in (*SCORES, WIDE_SCORE):
        print(table(results, score) + "\n")
    if len(results) > 1:
        print("per seed, macro_f1_per_plot:")
        for seed, result in zip(args.seeds, results):
            cells = ", ".join(
                f"{s}/{f} {result['scores'][s, f]['macro_f1_per_plot']:.3f}"
                for s in STRATEGIES
                for f in FITS
            )
            print(f"  seed {seed}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
