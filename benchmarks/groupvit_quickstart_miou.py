"""Does training help? The GroupViT quickstart's zero-shot mIoU on the held-out synthetic
VOC-layout val set after training, side by side with the same model untrained (identical
initial weights: train.py saves them as groupvit_untrained.pt) and with predicting background
everywhere, per-class IoU, training minutes and the load average; optionally the thesis's two
diagnostics (`python -m vitlab.analysis knn|alignment`) saying whether grouping or vision-text
alignment limits the result, and the curve of mIoU vs training budget (epochs).

Each variant trains `experiment=quickstart_groupvit` (+ its overrides) with train.py and
evaluates `infer.py experiment=segment_synthetic_voc` on the synthetic VOC-layout val set.

    PYTHONPATH=src python benchmarks/groupvit_quickstart_miou.py \
        [--variant 'ge=groupvit.losses.entropy.group=0.5;trainer.max_epochs=40'] [--skip-default]
        [--budgets 5 10 20] [--seeds 0 1 2] [--analyses] [--threads 1]
    # the table of finished runs (what `make quickstart-groupvit` prints):
    PYTHONPATH=src python benchmarks/groupvit_quickstart_miou.py \
        --table outputs/quickstart_groupvit_segmentation outputs/quickstart_groupvit_untrained
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import run_entry, train_summary  # noqa: E402

# runtime overrides every train.py / infer.py run gets (--threads: runtime.threads=N)
RUNTIME: list[str] = []


def segmentation(root: Path, name: str, checkpoint: Path) -> dict:
    run_entry(
        "infer.py",
        root,
        *RUNTIME,
        "experiment=segment_synthetic_voc",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={root}/{name}",
    )
    return json.loads((root / name / "summary.json").read_text())


def analyses(root: Path, name: str, checkpoint: Path) -> dict:
    """The thesis's diagnostics: grouping alone (kNN) and text alignment alone."""
    voc = root / "data" / "synthetic" / "coco_captions_seed0" / "VOCdevkit" / "VOC2012"
    out = {}
    for tool in ("knn", "alignment"):
        cmd = [
            sys.executable,
            "-m",
            "vitlab.analysis",
            tool,
            "--ckpt",
            str(checkpoint),
            "--dataset",
            "synthetic_voc",
            "--root",
            str(voc),
            "--short-side",
            "64",
            "--out",
            str(root / f"analysis_{name}_{tool}"),
        ]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[tool] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "knn": out["knn"]["miou"],
        "alignment_no_bg": out["alignment"]["without_background"]["miou"],
        "image_top1": image_level_top1(root, checkpoint),
    }


def image_level_top1(root: Path, checkpoint: Path) -> float:
    """Share of val images whose best-scoring class (pooled image embedding vs the 20 VOC
    prompts) is in the image: alignment at the image level, which is what training optimises."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from vitlab.data.segmentation import dataset_samples, read_label_map, segmentation_spec
    from vitlab.inference.segmentation import (
        class_text_embeddings,
        resize_short_side,
        to_normalised_tensor,
    )
    from vitlab.models.groupvit.checkpoints import load_groupvit

    voc = root / "data" / "synthetic" / "coco_captions_seed0" / "VOCdevkit" / "VOC2012"
    spec = segmentation_spec("synthetic_voc")
    model = load_groupvit(checkpoint).eval()
    text = class_text_embeddings(model, spec.prompt_names)
    hits, samples = 0, dataset_samples("synthetic_voc", voc, "val")
    for sample in samples:
        image = to_normalised_tensor(resize_short_side(Image.open(sample.image_path), 64))
        with torch.no_grad():
            pooled = F.normalize(model.project_image(model.encode_image(image[None])), dim=-1)
        present = set(np.unique(read_label_map(sample.label_path, spec)).tolist())
        hits += int((pooled @ text.t()).argmax()) + 1 in present
    return hits / len(samples)


OBJECTS = ("cat", "car", "bird", "boat", "sheep")
TARGET_MIOU, TARGET_MARGIN, TARGET_CLASS_IOU = 0.35, 0.15, 0.1


def row(name: str, miou: float | None, per_class: dict, extra: dict | None = None) -> dict:
    return {"name": name, "miou": miou, "per_class": per_class, **(extra or {})}


def seg_rows(trained: dict, untrained: dict, train: dict | None = None) -> list[dict]:
    """trained / untrained / all-background rows from two segmentation summaries."""
    ious = {k: v["iou"] for k, v in trained["per_class"].items() if v["pixels"]}
    untrained_ious = {k: v["iou"] for k, v in untrained["per_class"].items() if v["pixels"]}
    background = trained["all_background"]
    background_ious = {k: background["per_class"][k] for k in ious}
    speed = {"images_per_second": trained.get("images_per_second")}
    return [
        row("trained", trained["miou"], ious, {**speed, **(train or {})}),
        row("untrained", untrained["miou"], untrained_ious),
        row("all background", background["miou"], background_ious),
    ]


def print_table(rows: list[dict]) -> None:
    head = f"{'model':24s} {'mIoU':>6s} {'bg':>6s} " + " ".join(f"{c:>6s}" for c in OBJECTS)
    print("\n" + head + f" {'train min':>9s} {'img/s':>6s}  load avg (1/5/15 min)")
    for r in rows:
        cells = [r["per_class"].get(c) for c in ("background", *OBJECTS)]
        text = " ".join("   n/a" if v is None else f"{v:6.3f}" for v in cells)
        minutes = r.get("train_minutes")
        speed = r.get("images_per_second")
        load = r.get("load")
        print(
            f"{r['name']:24s} {r['miou']:6.3f} {text} "
            f"{'' if minutes is None else f'{minutes:9.2f}':>9s} "
            f"{'' if speed is None else f'{speed:6.1f}':>6s}  {load or ''}"
        )


def acceptance(rows: list[dict]) -> list[str]:
    """The issue's figures: trained mIoU >= 0.35 and >= 0.15 above untrained and all-background,
    every object class IoU > 0.1. Returns what is missed (empty: met)."""
    trained, untrained, background = rows[0], rows[1], rows[2]
    missed = []
    if trained["miou"] < TARGET_MIOU:
        missed.append(f"mIoU {trained['miou']:.3f} < {TARGET_MIOU}")
    for other in (untrained, background):
        if trained["miou"] - other["miou"] < TARGET_MARGIN:
            missed.append(f"only {trained['miou'] - other['miou']:+.3f} over {other['name']}")
    for name in OBJECTS:
        iou = trained["per_class"].get(name)
        if iou is None or iou <= TARGET_CLASS_IOU:
            shown = "n/a" if iou is None else f"{iou:.3f}"
            missed.append(f"{name} IoU {shown} <= {TARGET_CLASS_IOU}")
    return missed


def load_text() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def train_and_segment(root: Path, name: str, seed: int, overrides: list[str]) -> list[dict]:
    load_before = load_text()
    start = time.perf_counter()
    summary = train_summary(
        root,
        f"train_{name}",
        *RUNTIME,
        "experiment=quickstart_groupvit",
        f"seed={seed}",
        *overrides,
    )
    minutes = (time.perf_counter() - start) / 60
    trained = segmentation(root, f"seg_{name}", Path(summary["groupvit_checkpoint"]))
    untrained_ckpt = Path(summary["groupvit_untrained_checkpoint"])
    untrained = segmentation(root, f"seg_{name}_untrained", untrained_ckpt)
    train = {
        "train_minutes": minutes,
        "load": f"{load_before} -> {load_text()}",
        "checkpoint": summary["groupvit_checkpoint"],
        "untrained_checkpoint": str(untrained_ckpt),
    }
    rows = seg_rows(trained, untrained, train)
    rows[0]["name"] = f"trained {name} s{seed}"
    return rows


def mean_sd(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f}±{sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name=override[;override...] trained in addition to the default",
    )
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="*",
        default=[],
        help="also train the default recipe for these trainer.max_epochs (mIoU vs budget)",
    )
    parser.add_argument("--analyses", action="store_true", help="kNN / alignment / image top-1")
    parser.add_argument(
        "--threads", type=int, help="runtime.threads of every run (default: the config's)"
    )
    parser.add_argument(
        "--table",
        nargs=2,
        metavar=("TRAINED_SEG_DIR", "UNTRAINED_SEG_DIR"),
        help="only print the table of two finished infer.py runs",
    )
    args = parser.parse_args()
    if args.table:
        trained, untrained = (
            json.loads((Path(d) / "summary.json").read_text()) for d in args.table
        )
        rows = seg_rows(trained, untrained)
        print_table(rows)
        missed = acceptance(rows)
        print("targets met" if not missed else "targets missed: " + "; ".join(missed))
        return
    if args.threads:
        RUNTIME.append(f"runtime.threads={args.threads}")
    variants = [] if args.skip_default else [("quickstart", [])]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants.append((name, [o for o in overrides.split(";") if o]))
    variants += [(f"epochs{e}", [f"trainer.max_epochs={e}"]) for e in args.budgets]
    root = Path(tempfile.mkdtemp(prefix="groupvit_miou_"))
    results: dict[str, list[list[dict]]] = {}
    for name, overrides in variants:
        for seed in args.seeds:
            rows = train_and_segment(root, name, seed, overrides)
            results.setdefault(name, []).append(rows)
            print_table(rows)
            missed = acceptance(rows)
            print("targets met" if not missed else "targets missed: " + "; ".join(missed))
            if args.analyses:
                for r in rows[:2]:
                    ckpt = Path(r.get("checkpoint") or rows[0]["untrained_checkpoint"])
                    tag = r["name"].replace(" ", "_")
                    r.update(analyses(root, tag, ckpt))
                    print(
                        f"{r['name']}: kNN mIoU {r['knn']:.3f}, alignment mIoU "
                        f"{r['alignment_no_bg']:.3f}, image top-1 {r['image_top1']:.3f}"
                    )
    if len(args.seeds) > 1 or args.budgets:
        print(f"\n{'variant':16s} {'trained':>13s} {'untrained':>13s} {'all bg':>13s} {'min':>6s}")
        for name, runs in results.items():
            trained = mean_sd([r[0]["miou"] for r in runs])
            untrained = mean_sd([r[1]["miou"] for r in runs])
            background = mean_sd([r[2]["miou"] for r in runs])
            minutes = statistics.fmean(r[0]["train_minutes"] for r in runs)
            print(f"{name:16s} {trained:>13s} {untrained:>13s} {background:>13s} {minutes:6.2f}")
    print(json.dumps({k: [r for run in v for r in run] for k, v in results.items()}))
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
