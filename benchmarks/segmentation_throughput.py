"""Images/s of the zero-shot segmentation evaluation at 448 px, released GroupViT (random weights).

What is timed is what `infer.py pipeline=segmentation` does per image: resize to short side 448,
sliding window (crop 448, stride 224), per crop A1@A2 group maps + group-class affinity +
background rule, averaging, resize back, argmax, confusion-matrix update. Images are 640x480
(COCO/VOC-like aspect: 2 crops each) decoded from JPEG. Also reported: the model forward alone
on the same crops, so the ratio shows what the non-model work costs.

    PYTHONPATH=src python benchmarks/segmentation_throughput.py [--images 8] [--classes 21]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import format_share, report_load, timed_with_noise  # noqa: E402

from vitlab.data.voc import VOC_CLASSES  # noqa: E402
from vitlab.inference.segmentation import (  # noqa: E402
    SegmentationSettings,
    class_text_embeddings,
    crop_boxes,
    resize_short_side,
    segment_image,
    to_normalised_tensor,
)
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator  # noqa: E402
from vitlab.models.groupvit.model import GroupViT, released_spec  # noqa: E402


def _jpeg_images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--crops-per-batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GroupViT(released_spec()).eval()
    settings = SegmentationSettings(crops_per_batch=args.crops_per_batch)
    text = class_text_embeddings(model, VOC_CLASSES[1:])
    jpegs = _jpeg_images(args.images)
    truth = np.zeros((480, 640), dtype=np.int64)
    report_load("before")

    def evaluation() -> int:
        accumulator = ConfusionMatrixAccumulator(21)
        for data in jpegs:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            accumulator.update(segment_image(model, image, text, settings), truth)
        return len(jpegs)

    resized = to_normalised_tensor(resize_short_side(Image.new("RGB", (640, 480)), 448))
    boxes = crop_boxes(resized.shape[1], resized.shape[2], settings.crop, settings.stride)
    crops = torch.stack([resized[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])

    def forward_only() -> int:
        with torch.no_grad():
            for _ in jpegs:
                model.encode_image(crops)
        return len(jpegs)

    evaluation()  # warm-up
    rows = []
    for repeat in range(args.repeats):
        for name, fn in (("evaluation", evaluation), ("forward only", forward_only)):
            n, seconds, share = timed_with_noise(fn)
            rows.append(
                {"what": name, "repeat": repeat, "images_per_s": n / seconds, "others_cpu": share}
            )
            print(
                f"{name:13s} repeat {repeat}: {n / seconds:6.3f} images/s "
                f"({len(boxes)} crops of 448 per image; others' CPU {format_share(share)})"
            )
    best = {
        w: max(r["images_per_s"] for r in rows if r["what"] == w)
        for w in ("evaluation", "forward only")
    }
    ratio = best["evaluation"] / best["forward only"]
    print(
        f"best: evaluation {best['evaluation']:.3f} img/s, forward only "
        f"{best['forward only']:.3f} img/s, ratio {ratio:.2f}; threads {torch.get_num_threads()}"
    )
    print(json.dumps({"best": best, "ratio": ratio, "crops_per_image": len(boxes), "rows": rows}))


if __name__ == "__main__":
    main()
