"""The FungiCLEF paper's ablation on the synthetic dataset, plus single folds vs the ensemble.

Runs `train.py experiment=quickstart_fungiclef` with the overrides of each ablation row (tiny
random ViT, so absolute numbers say nothing about DINOv2; the differences say what the pipeline
does) and prints, per row, the ensemble's scores on the held-out DF21 third and on the
synthetic test set; then, for the last row, each fold model vs the ensemble.

Run: python benchmarks/fungiclef_ablation.py [--seeds 0 1]   (from the repo root)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _runs import train_summary

ROWS = [
    ("baseline (CE, image only)", ["loss=ce", "head.model.use_metadata=false"]),
    ("+ class weighting", ["loss=weighted_ce", "head.model.use_metadata=false"]),
    ("+ metadata", ["loss=weighted_ce"]),
    ("+ toxicity target", ["loss=weighted_ce", "aux_targets.poisonous=0.1"]),
    (
        "+ taxonomy targets",
        [
            "loss=weighted_ce",
            "aux_targets.poisonous=0.1",
            "aux_targets.genus=0.1",
            "aux_targets.family=0.1",
        ],
    ),
    (
        "seesaw + 0.1 poison + aux targets (final_aux)",
        [
            "loss=seesaw_poison",
            "aux_targets.poisonous=0.1",
            "aux_targets.genus=0.1",
            "aux_targets.family=0.1",
        ],
    ),
    ("seesaw + 0.1 poison (final)", ["loss=seesaw_poison"]),
]
KEYS = ["track1", "track2", "track3", "macro_f1", "accuracy"]


def run(tmp: Path, name: str, overrides: list[str], seed: int) -> dict:
    return train_summary(
        tmp,
        name,
        "experiment=quickstart_fungiclef",
        "report.embedding_map=none",
        f"seed={seed}",
        f"dataset.synthetic.seed={seed}",
        *overrides,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (label, overrides) in enumerate(ROWS):
                results.setdefault(label, []).append(
                    run(Path(tmp), f"s{seed}-r{i}", overrides, seed)
                )

    def mean(label: str, part: str, model: str, key: str) -> float:
        values = [
            s[part][model][key] if part == "held_out_scores" else s[part][key]
            for s in results[label]
        ]
        return sum(values) / len(values)

    print(f"synthetic FungiCLEF, seeds {args.seeds}: ensemble of 2 folds, mean over seeds")
    print("| row | held-out " + " | held-out ".join(KEYS) + " | test track3 | test acc |")
    print("|---|" + "---|" * (len(KEYS) + 2))
    for label in results:
        cells = [f"{mean(label, 'held_out_scores', 'ensemble', k):.4g}" for k in KEYS]
        cells += [
            f"{mean(label, 'scores', '', 'track3'):.4g}",
            f"{mean(label, 'scores', '', 'accuracy'):.4g}",
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    final = ROWS[-1][0]
    print(f"\nsingle folds vs ensemble ({final}), held-out DF21 third")
    print("| model | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    for model in ("fold1", "fold2", "ensemble"):
        print(
            f"| {model} | "
            + " | ".join(f"{mean(final, 'held_out_scores', model, k):.4g}" for k in KEYS)
            + " |"
        )


if __name__ == "__main__":
    main()
