"""Run a set of recipes and write a Markdown results table next to the papers' numbers.

    python experiments/run_recipes.py --synthetic                 # this machine: synthetic data
    python experiments/run_recipes.py --root-plantclef /data/PC24 --root-fungiclef /data/DF \\
        --recipes plantclef_finetuned_cls fungiclef_final -- backbone.checkpoint_path=...

With --synthetic every recipe runs on the generated datasets with the tiny random ViT (the
pipeline is checked, not the papers' effect sizes); otherwise the recipes run as written on the
given roots. Each row: the recipe, our figure, the paper's figure for that row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# recipe -> (paper figure, the metric it is, where our number is in summary.json)
PAPER = {
    "plantclef_finetuned_cls": ("20.77 (public)", "macro F1 per plot x100", "scores"),
    "plantclef_full_image": ("8.47 (public)", "macro F1 per plot x100", "scores"),
    "plantclef_dinov2_cls": ("2.06 (public)", "macro F1 per plot x100", "scores"),
    "plantclef_dinov2_dct": ("0.28 (public)", "macro F1 per plot x100", "scores"),
    "fungiclef_final": ("0.345 (private)", "Track 3", "scores"),
    "fungiclef_baseline": ("-", "Track 3", "scores"),
    "fungiclef_metadata": ("-", "Track 3", "scores"),
}
SYNTHETIC = {
    "plantclef": [
        "dataset=plantclef_synthetic",
        "backbone=tiny_vit",
        "trainer.max_epochs=40",
        "head.batch_size=64",
        "dataset.min_images_per_species=10",
    ],
    "fungiclef": [
        "dataset=fungiclef_synthetic",
        "backbone=tiny_vit",
        "prepare.image_size=128",
        "head.model.hidden=512",
        "optimizer.lr=1e-3",
        "head.batch_size=64",
        "trainer.max_epochs=40",
        "report.embedding_map=none",
    ],
}


def our_figure(recipe: str, summary: dict) -> str:
    scores = summary.get("scores", {})
    if recipe.startswith("plantclef"):
        return f"{100 * scores['macro_f1_per_plot']:.2f}" if scores else "n/a"
    return f"{scores['track3']:.4f}" if scores else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(PAPER))
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--root-plantclef", default=None)
    parser.add_argument("--root-fungiclef", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results.md")  # noqa: E501
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
            "VITLAB_ROOT": os.environ.get("VITLAB_ROOT", tmp),
        }
        for recipe in args.recipes:
            family = recipe.split("_")[0]
            extra = list(SYNTHETIC[family]) if args.synthetic else []
            root = args.root_plantclef if family == "plantclef" else args.root_fungiclef
            if not args.synthetic:
                extra.append(f"dataset.root={root}")
            if args.synthetic and "pretrained_classifier" in recipe:
                continue  # needs the PlantNet checkpoint
            run_dir = Path(tmp) / recipe
            cmd = [
                sys.executable,
                str(REPO / "train.py"),
                f"experiment={recipe}",
                *extra,
                "logger=csv",
                f"hydra.run.dir={run_dir}",
                *args.overrides,
            ]
            done = subprocess.run(
                cmd, cwd=env["VITLAB_ROOT"], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                rows.append(
                    (
                        recipe,
                        f"failed: {done.stderr.strip().splitlines()[-1:]}",
                        *PAPER.get(recipe, ("-", "-"))[:2],
                    )
                )
                continue
            summary = json.loads((run_dir / "summary.json").read_text())
            paper, metric, _ = PAPER.get(recipe, ("-", "-", ""))
            rows.append((recipe, our_figure(recipe, summary), paper, metric))
    kind = "synthetic data, tiny random ViT" if args.synthetic else "as configured"
    lines = [f"# Results ({kind})", "", "| recipe | ours | paper | metric |", "|---|---|---|---|"]
    lines += [f"| {r} | {o} | {p} | {m} |" for r, o, p, m in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
