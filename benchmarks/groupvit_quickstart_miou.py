"""Does training help? The GroupViT quickstart's zero-shot mIoU after training vs the same model
untrained (identical initial weights: same seed, same construction order as train.py).

Each variant trains `experiment=quickstart_groupvit` (+ its overrides) with train.py and
evaluates `infer.py experiment=segment_synthetic_voc` on the synthetic VOC-layout val set.

    PYTHONPATH=src python benchmarks/groupvit_quickstart_miou.py \
        [--variant 'ge=groupvit.losses.entropy.group=0.5;trainer.max_epochs=40'] [--skip-default]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import run_entry, train_summary  # noqa: E402

from vitlab.models.groupvit.checkpoints import save_groupvit  # noqa: E402
from vitlab.models.groupvit.model import GroupViT, tiny_spec  # noqa: E402


def segmentation(root: Path, name: str, checkpoint: Path) -> dict:
    run_entry(
        "infer.py",
        root,
        "experiment=segment_synthetic_voc",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={root}/{name}",
    )
    return json.loads((root / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name=override[,override...] trained in addition to the default",
    )
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = [] if args.skip_default else [("quickstart", [])]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants.append((name, [o for o in overrides.split(";") if o]))
    root = Path(tempfile.mkdtemp(prefix="groupvit_miou_"))
    pl.seed_everything(args.seed)  # as train_groupvit does right before building the model
    untrained = save_groupvit(GroupViT(tiny_spec()), root / "untrained.pt")
    rows = [("untrained", segmentation(root, "seg_untrained", untrained), None)]
    for name, overrides in variants:
        start = time.perf_counter()
        summary = train_summary(
            root, f"train_{name}", "experiment=quickstart_groupvit", f"seed={args.seed}", *overrides
        )
        minutes = (time.perf_counter() - start) / 60
        rows.append(
            (
                name,
                segmentation(root, f"seg_{name}", summary["groupvit_checkpoint"]),
                (minutes, summary["fit_metrics"].get("val/loss")),
            )
        )
    print(
        f"\n{'model':22s} {'mIoU':>6s} {'bg IoU':>7s} {'fg mIoU':>8s} {'train min':>9s} "
        f"{'val loss':>8s}"
    )
    results = {}
    for name, seg, train in rows:
        present = {k: v["iou"] for k, v in seg["per_class"].items() if v["iou"] is not None}
        fg = [v for k, v in present.items() if k != "background"]
        fg_miou = sum(fg) / len(fg) if fg else float("nan")
        minutes, val_loss = train or (float("nan"), float("nan"))
        print(
            f"{name:22s} {seg['miou']:6.3f} {present.get('background', 0):7.3f} "
            f"{fg_miou:8.3f} {minutes:9.1f} {val_loss:8.3f}"
        )
        results[name] = {
            "miou": seg["miou"],
            "per_class": present,
            "train_minutes": minutes,
            "val_loss": val_loss,
        }
    print(json.dumps(results))
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
