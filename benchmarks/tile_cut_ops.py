"""The GPU tile loader's cost per quadrat: torch ops (each a kernel launch on a GPU, issued by
the loader thread while the main thread issues the forwards) and milliseconds, for the boxes
of a 3x3 grid fitted one box at a time (session 21's first GPU loader) vs in one batched call
per group of quadrats (`data.device_images.cut_tiles`, now).

    PYTHONPATH=src python benchmarks/tile_cut_ops.py [--device cuda] [--quadrats 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab.data import device_images
from vitlab.inference.plantclef import GridArgmax


def one_box_at_a_time(images, boxes, size, how, fill):
    return [
        torch.stack(
            [device_images.fit_tiles([img[:, t:b, l:r]], size, how, fill)[0] for l, t, r, b in own]  # noqa: E741
        ).permute(0, 2, 3, 1)
        for img, own in zip(images, boxes)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quadrats", type=int, default=8, help="per group (one nvJPEG call)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = [
        torch.randint(0, 256, (3, 768, 1024), dtype=torch.uint8, device=device)
    ] * args.quadrats
    boxes = [GridArgmax(3).boxes(1024, 768)] * args.quadrats
    fill = (124, 116, 104)
    ways = {"one box at a time": one_box_at_a_time, "batched": device_images.cut_tiles}
    print(
        f"{args.quadrats} quadrats 1024x768, 3x3 grid, tiles {args.size} px, {device}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    for name, cut in ways.items():
        cut(images, boxes, args.size, "center_crop", fill)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cut(images, boxes, args.size, "center_crop", fill)
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            cut(images, boxes, args.size, "center_crop", fill)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        per = statistics.median(seconds) / args.quadrats * 1000
        print(
            f"  {name:18s} aten ops per quadrat {ops / args.quadrats:6.1f}   "
            f"{per:7.2f} ms per quadrat (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
