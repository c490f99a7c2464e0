"""Does training help? The GroupViT quickstart's zero-shot mIoU after training vs the same model
untrained (identical initial weights: same seed, same construction order as train.py), with the
thesis's two diagnostics (`python -m vitlab.analysis knn|alignment`) saying whether grouping or
vision-text alignment limits the result.

Each variant trains `experiment=quickstart_groupvit` (+ its overrides) with train.py and
evaluates `infer.py experiment=segment_synthetic_voc` on the synthetic VOC-layout val set.

    PYTHONPATH=src python benchmarks/groupvit_quickstart_miou.py \
        [--variant 'ge=groupvit.losses.entropy.group=0.5;trainer.max_epochs=40'] [--skip-default]
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
    diagnostics = {"untrained": analyses(root, "untrained", untrained)}
    for name, overrides in variants:
        start = time.perf_counter()
        summary = train_summary(
            root, f"train_{name}", "experiment=quickstart_groupvit", f"seed={args.seed}", *overrides
        )
        minutes = (time.perf_counter() - start) / 60
        checkpoint = Path(summary["groupvit_checkpoint"])
        train = (minutes, summary["fit_metrics"].get("val/loss"))
        rows.append((name, segmentation(root, f"seg_{name}", checkpoint), train))
        diagnostics[name] = analyses(root, name, checkpoint)
    print(
        f"\n{'model':22s} {'mIoU':>6s} {'bg IoU':>7s} {'fg mIoU':>8s} {'train min':>9s} "
        f"{'val loss':>8s} {'kNN mIoU':>8s} {'align mIoU':>10s} {'img top1':>8s}"
    )
    results = {}
    for name, seg, train in rows:
        present = {k: v["iou"] for k, v in seg["per_class"].items() if v["iou"] is not None}
        fg = [v for k, v in present.items() if k != "background"]
        fg_miou = sum(fg) / len(fg) if fg else float("nan")
        minutes, val_loss = train or (float("nan"), float("nan"))
        diag = diagnostics[name]
        print(
            f"{name:22s} {seg['miou']:6.3f} {present.get('background', 0):7.3f} "
            f"{fg_miou:8.3f} {minutes:9.1f} {val_loss:8.3f} {diag['knn']:8.3f} "
            f"{diag['alignment_no_bg']:10.3f} {diag['image_top1']:8.3f}"
        )
        results[name] = {
            "miou": seg["miou"],
            "per_class": present,
            "train_minutes": minutes,
            "val_loss": val_loss,
            **diag,
        }
    print(json.dumps(results))
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
