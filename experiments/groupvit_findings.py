"""The thesis's qualitative findings on the synthetic GroupViT quickstart, as one markdown table.

Each row trains `experiment=quickstart_groupvit` (+ the row's overrides) through the training
pipeline (`vitlab.pipelines.groupvit.train_groupvit`, what `train.py` runs) and scores the
exported `groupvit.pt` with the zero-shot evaluation `infer.py experiment=segment_synthetic_voc`
runs (`evaluate_zero_shot`, same settings) on the held-out synthetic VOC-layout val set, plus the
patch-over-group entropy (GE's integrand, `python -m vitlab.analysis entropy`'s
`mean_group_entropy`: mean over val images and patches, nats; max ln G). In one process, so
start-up is paid once. Rows:

- contrastive only (`groupvit.losses.multi_label=0`)
- + multi-label, plain (`groupvit.losses.non_noisy=false`)
- + multi-label, non-noisy (the quickstart default)
- + GE (`groupvit.losses.entropy.group=W`, W as in `groupvit_entropy_group`: 1.0)
- the last two with `groupvit.model.spec.assign_init_std=0.2` (assignment q/k init away from
  the near-zero saddle where the soft assignment stays uniform)
- fine-tune only the grouping block (`groupvit.trainable=[grouping_block_1]`) vs everything,
  from the seed's non-noisy (quickstart) checkpoint, `--finetune-epochs` more epochs

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/groupvit_findings.py \
        --seeds 0 1 2 --epochs 40 --finetune-epochs 10 [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBJECTS = ("cat", "car", "bird", "boat", "sheep")
GE_WEIGHT = 1.0  # configs/experiment/groupvit_entropy_group.yaml
ASSIGN_INIT_STD = 0.2

ROWS: list[tuple[str, str, list[str]]] = [
    # (key, label, overrides)
    ("contrastive", "contrastive only (multi-label off)", ["groupvit.losses.multi_label=0"]),
    ("plain", "+ multi-label (plain)", ["groupvit.losses.non_noisy=false"]),
    ("non_noisy", "+ multi-label, non-noisy (quickstart default)", []),
    (
        "ge",
        f"+ multi-label, non-noisy + GE {GE_WEIGHT}",
        [f"groupvit.losses.entropy.group={GE_WEIGHT}"],
    ),
    # the same two with the assignment's q/k initialised away from the near-zero saddle
    # (groupvit.model.spec.assign_init_std; the reference's 0.02 leaves the soft assignment
    # uniform, so GE has nothing to act on)
    (
        "init",
        f"+ multi-label, non-noisy, assign_init_std {ASSIGN_INIT_STD}",
        [f"+groupvit.model.spec.assign_init_std={ASSIGN_INIT_STD}"],
    ),
    (
        "ge_init",
        f"+ multi-label, non-noisy + GE {GE_WEIGHT}, assign_init_std {ASSIGN_INIT_STD}",
        [
            f"groupvit.losses.entropy.group={GE_WEIGHT}",
            f"+groupvit.model.spec.assign_init_std={ASSIGN_INIT_STD}",
        ],
    ),
]
FINETUNE_ROWS: list[tuple[str, str, list[str]]] = [
    ("ft_grouping", "fine-tune grouping block only", ["groupvit.trainable=[grouping_block_1]"]),
    ("ft_everything", "fine-tune everything", ["groupvit.trainable=[everything]"]),
]


def compose(overrides: list[str], out: Path, data_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose(
            "train",
            overrides=[
                "experiment=quickstart_groupvit",
                f"hydra.run.dir={out}",
                f"paths.output_dir={out}",
                f"paths.data_dir={data_dir}",
                "logger=csv",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    return cfg


def evaluate(checkpoint: Path, voc_root: Path) -> dict:
    """Zero-shot mIoU (segment_synthetic_voc's settings) and the patch-over-group entropy."""
    import numpy as np
    import torch

    from vitlab.analysis.groupvit import encode_grouping, entropy_per_patch
    from vitlab.data.segmentation import dataset_samples, segmentation_spec
    from vitlab.inference.segmentation import (
        SegmentationSettings,
        class_text_embeddings,
        evaluate_zero_shot,
        labelled_images,
    )
    from vitlab.models.groupvit.checkpoints import load_groupvit

    spec = segmentation_spec("synthetic_voc")
    model = load_groupvit(checkpoint).eval()
    samples = dataset_samples("synthetic_voc", voc_root, "val")
    text = class_text_embeddings(model, spec.prompt_names)
    settings = SegmentationSettings(
        short_side=64, crop=64, stride=32, bg_threshold=spec.bg_threshold, crops_per_batch=8
    )
    logging.disable(logging.INFO)
    try:
        result = evaluate_zero_shot(model, spec, samples, text, settings)
        entropies, skipped = [], []
        with torch.no_grad():
            for _, image, _ in labelled_images(samples, spec, "entropy", skipped):
                grouping = encode_grouping(model, image, 64)
                ge, _ = entropy_per_patch(
                    grouping.patch_attention, grouping.segments, text, grouping.scale
                )
                entropies.append(float(ge.mean()))
                n_groups = grouping.patch_attention.shape[1]
    finally:
        logging.disable(logging.NOTSET)
    per_class = {k: v["iou"] for k, v in result["per_class"].items() if v["pixels"]}
    return {
        "miou": result["miou"],
        "per_class": per_class,
        "all_background": result["all_background"]["miou"],
        "group_entropy": float(np.mean(entropies)),
        "max_group_entropy": math.log(n_groups),
    }


def train_row(overrides: list[str], out: Path, data_dir: Path) -> tuple[Path, float, str]:
    from vitlab.pipelines.groupvit import train_groupvit

    cfg = compose(overrides, out, data_dir)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    train_groupvit(cfg)
    minutes = (time.perf_counter() - start) / 60
    return out / "groupvit.pt", minutes, f"{load:.1f}->{os.getloadavg()[0]:.1f}"


def mean_sd(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def print_table(results: dict[str, list[dict]], labels: dict[str, str]) -> None:
    head = "| row | mIoU | GE (nats) | " + " | ".join(OBJECTS) + " | train min | load |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key, runs in results.items():
        if not runs:
            continue
        cells = [mean_sd([r["miou"] for r in runs]), mean_sd([r["group_entropy"] for r in runs], 2)]
        cells += [mean_sd([r["per_class"].get(c, 0.0) for r in runs], 2) for c in OBJECTS]
        cells.append(f"{statistics.fmean(r['minutes'] for r in runs):.2f}")
        cells.append(", ".join(r["load"] for r in runs))
        print(f"| {labels[key]} | " + " | ".join(cells) + " |")
    any_run = next(r for runs in results.values() for r in runs)
    print(
        f"\nall-background mIoU {any_run['all_background']:.3f}; patch-over-group entropy "
        f"maximum ln G = {any_run['max_group_entropy']:.2f} nats; mean ± sd over seeds"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="runtime.threads of each run")
    parser.add_argument("--rows", nargs="*", help="keys of the rows to run (default: all)")
    parser.add_argument("--out", type=Path, help="run folder (default: a new temp folder)")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="groupvit_findings_"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    common = [f"trainer.max_epochs={args.epochs}", f"runtime.threads={args.threads}"]
    wanted = set(args.rows or [k for k, _, _ in ROWS + FINETUNE_ROWS])
    labels = {k: label for k, label, _ in ROWS + FINETUNE_ROWS}
    labels["ft_grouping"] += f" ({args.finetune_epochs} ep from the quickstart ckpt)"
    labels["ft_everything"] += f" ({args.finetune_epochs} ep from the quickstart ckpt)"
    results: dict[str, list[dict]] = {k: [] for k in labels if k in wanted}
    records = out / "findings.jsonl"
    for seed in args.seeds:
        for key, _, overrides in ROWS:
            needed = key in wanted or (
                key == "non_noisy" and wanted & {"ft_grouping", "ft_everything"}
            )
            if not needed:
                continue
            run = out / f"{key}_s{seed}"
            ckpt, minutes, load = train_row([*common, f"seed={seed}", *overrides], run, data_dir)
            voc = Path(compose([], run, data_dir).dataset.root) / "VOCdevkit" / "VOC2012"
            record = {"row": key, "seed": seed, "minutes": minutes, "load": load}
            record.update(evaluate(ckpt, voc))
            with records.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if key in results:
                results[key].append(record)
            print(json.dumps({k: record[k] for k in ("row", "seed", "miou", "group_entropy")}))
        base = out / f"non_noisy_s{seed}" / "groupvit.pt"
        for key, _, overrides in FINETUNE_ROWS:
            if key not in wanted:
                continue
            run = out / f"{key}_s{seed}"
            ft = [
                f"trainer.max_epochs={args.finetune_epochs}",
                f"runtime.threads={args.threads}",
                f"seed={seed}",
                f"groupvit.model.source={base}",
                "groupvit.save_untrained=false",
                *overrides,
            ]
            ckpt, minutes, load = train_row(ft, run, data_dir)
            voc = Path(compose([], run, data_dir).dataset.root) / "VOCdevkit" / "VOC2012"
            record = {"row": key, "seed": seed, "minutes": minutes, "load": load}
            record.update(evaluate(ckpt, voc))
            with records.open("a") as f:
                f.write(json.dumps(record) + "\n")
            results[key].append(record)
            print(json.dumps({k: record[k] for k in ("row", "seed", "miou", "group_entropy")}))
    print()
    print_table(results, labels)
    print(f"\nruns and findings.jsonl in {out}")


if __name__ == "__main__":
    main()
