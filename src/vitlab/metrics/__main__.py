"""Score submission files: `python -m vitlab.metrics plantclef --truth T.csv --submission S.csv`,
or `python -m vitlab.metrics fungiclef --truth T.csv --submission S.csv --poison P.csv`,
or `python -m vitlab.metrics miou --truth DIR --pred DIR --num-classes N` (PNG label maps;
`--split val.txt` or `--ids ...` scores only the listed image ids, as on a VOC folder).

Prints one JSON object. Exit code 2 with a message naming the file and line on malformed input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitlab.data.plantclef import read_ground_truth, read_submission
from vitlab.errors import DatasetFormatError
from vitlab.metrics.fungiclef import (
    fungiclef_scores,
    read_fungiclef_csv,
    read_fungiclef_truth,
    read_poison_list,
)
from vitlab.metrics.plantclef import plantclef_scores
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator
from vitlab.progress import progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitlab.metrics")
    sub = parser.add_subparsers(dest="task", required=True)
    plant = sub.add_parser("plantclef", help="PlantCLEF 2024 F1 scores (fractions in [0,1])")
    plant.add_argument("--truth", required=True)
    plant.add_argument("--submission", required=True)
    fungi = sub.add_parser(
        "fungiclef",
        help="FungiCLEF 2024 tracks 1-4, macro F1, accuracy (F1 and accuracy as fractions)",
    )
    fungi.add_argument(
        "--truth",
        required=True,
        help="CSV observationID,class_id; one row per observation or per image (the first row "
        "of each observation counts, as in the organisers' evaluate.py)",
    )
    fungi.add_argument(
        "--submission", required=True, help="CSV observationID,class_id, each observation once"
    )
    fungi.add_argument("--poison", required=True, help="CSV class_id,poisonous (0/1)")
    seg = sub.add_parser(
        "miou",
        help="semantic segmentation mIoU, mmseg convention (dataset-level I/U, fractions)",
        description="Compare the PNG label maps in --pred with the same-named ones in --truth. "
        "Pixel values are read as class indices (palette or grayscale PNGs, never RGB).",
    )
    seg.add_argument("--truth", required=True, help="directory of ground-truth PNG label maps")
    seg.add_argument("--pred", required=True, help="directory of predicted PNGs, same names")
    seg.add_argument("--num-classes", required=True, type=int)
    seg.add_argument("--ignore", type=int, default=255, help="truth label to ignore (255)")
    seg.add_argument(
        "--reduce-zero-label",
        action="store_true",
        help="ADE20K: truth 0 is ignored and other truth labels shift down by one",
    )
    subset = seg.add_mutually_exclusive_group()
    subset.add_argument(
        "--split",
        metavar="FILE",
        help="score only the image ids listed in FILE, one per line, as VOC's "
        "ImageSets/Segmentation/val.txt (id = file name without .png); other files in "
        "--truth/--pred are ignored",
    )
    subset.add_argument(
        "--ids", nargs="+", metavar="ID", help="score only these image ids (as --split)"
    )
    args = parser.parse_args(argv)
    if args.task == "fungiclef":
        return _fungiclef(args)
    if args.task == "miou":
        return _miou(args)
    try:
        truth = read_ground_truth(args.truth)
        submission = read_submission(args.submission)
        scores = plantclef_scores(truth, submission)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = sorted(set(truth) - set(submission))
    if missing:
        print(
            f"warning: {len(missing)} plot(s) missing from the submission scored 0, "
            f"e.g. {missing[:3]}",
            file=sys.stderr,
        )
    print(json.dumps(scores))
    return 0


def _fungiclef(args: argparse.Namespace) -> int:
    try:
        truth = read_fungiclef_truth(args.truth)
        submission = read_fungiclef_csv(args.submission)
        poisonous = read_poison_list(args.poison)
    except DatasetFormatError as err:  # the message already names file and line
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        scores = fungiclef_scores(truth, submission, poisonous)
    except DatasetFormatError as err:  # coverage mismatch: name the files compared
        print(f"error: {args.submission} vs {args.truth}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores))
    return 0


class _LabelMapError(Exception):
    pass


def _read_label_map(path: Path) -> np.ndarray:
    """Raw pixel indices of a palette / grayscale PNG (no RGB conversion)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16", "1"):
                raise _LabelMapError(
                    f"{path}: mode {img.mode} is not a label map; expected a palette (P) or "
                    "grayscale (L) PNG of class indices"
                )
            return np.asarray(img)
    except (OSError, UnidentifiedImageError) as err:
        raise _LabelMapError(f"{path}: cannot read image: {err}") from err


def _score_pair(
    acc: ConfusionMatrixAccumulator, truth_dir: Path, pred_dir: Path, name: str
) -> str | None:
    """Add one image to `acc`; the error message (naming the file) if it cannot be scored."""
    try:
        truth = _read_label_map(truth_dir / name)
        pred = _read_label_map(pred_dir / name)
    except _LabelMapError as err:
        return str(err)
    if pred.shape != truth.shape:
        return (
            f"{name}: size mismatch, prediction {pred_dir / name} is "
            f"{pred.shape[1]}x{pred.shape[0]} but truth {truth_dir / name} is "
            f"{truth.shape[1]}x{truth.shape[0]} (width x height)"
        )
    try:
        acc.update(pred, truth)
    except ValueError as err:  # out-of-range class: say which file
        return f"{name}: {err}"
    return None


def _folder_names(truth_dir: Path, pred_dir: Path) -> list[str] | None:
    """Every truth PNG, each of which needs a prediction; None (error printed) otherwise."""

    def pngs(folder: Path) -> set[str]:
        return {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"}

    truth_names, pred_names = pngs(truth_dir), pngs(pred_dir)
    if not truth_names:
        print(f"error: no PNG label maps in --truth {truth_dir}", file=sys.stderr)
        return None
    missing = sorted(truth_names - pred_names)
    if missing:
        print(
            f"error: {len(missing)} truth file(s) without a prediction in {pred_dir}, "
            f"e.g. {missing[:3]}; to score a subset (e.g. VOC's val), pass "
            "--split ImageSets/Segmentation/val.txt or --ids",
            file=sys.stderr,
        )
        return None
    extra = sorted(pred_names - truth_names)
    if extra:
        print(
            f"warning: ignoring {len(extra)} prediction(s) without a truth file, e.g. {extra[:3]}",
            file=sys.stderr,
        )
    return sorted(truth_names)


def _listed_names(
    split: str | None, ids: list[str] | None, truth_dir: Path, pred_dir: Path
) -> list[str]:
    """`<id>.png` for each listed id, in list order, after checking every id has a truth and a
    prediction file. Errors name the list's file and line (or the --ids position)."""
    if split is not None:
        path = Path(split)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise _LabelMapError(f"--split {path}: cannot read: {err}") from err
        entries = [(f"{path} line {n}", line.strip()) for n, line in enumerate(lines, 1)]
        entries = [(where, i) for where, i in entries if i]  # blank lines (a trailing one)
        source = f"--split {path}"
    else:
        entries = [(f"--ids item {n}", i.strip()) for n, i in enumerate(ids or [], 1)]
        source = "--ids"
    if not entries:
        raise _LabelMapError(f"{source}: no image ids listed")
    seen: dict[str, str] = {}
    problems: list[str] = []
    for where, image_id in entries:
        # VOC ids are stems; an id given with its extension is the same image
        name = image_id if image_id.lower().endswith(".png") else f"{image_id}.png"
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            problems.append(f"{where}: {image_id!r} is not an image id (a file name in the folder)")
        elif name in seen:
            problems.append(f"{where}: {image_id!r} is listed twice (first at {seen[name]})")
        else:
            seen[name] = where
            for folder, kind in ((truth_dir, "truth"), (pred_dir, "prediction")):
                if not (folder / name).is_file():
                    problems.append(f"{where}: id {image_id!r} has no {kind} file {folder / name}")
    if problems:  # all of them at once (the first five), not one per run
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise _LabelMapError(
            f"{len(problems)} problem(s) with the ids of {source}:\n  {shown}{more}"
        )
    return list(seen)


def _miou(args: argparse.Namespace) -> int:
    truth_dir, pred_dir = Path(args.truth), Path(args.pred)
    for flag, folder in (("--truth", truth_dir), ("--pred", pred_dir)):
        if not folder.is_dir():
            print(f"error: {flag} directory not found: {folder}", file=sys.stderr)
            return 2
    if args.num_classes < 1:
        print(f"error: --num-classes must be >= 1, got {args.num_classes}", file=sys.stderr)
        return 2

    if args.split is not None or args.ids is not None:
        try:
            names = _listed_names(args.split, args.ids, truth_dir, pred_dir)
        except _LabelMapError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        names = _folder_names(truth_dir, pred_dir)
        if names is None:
            return 2

    acc = ConfusionMatrixAccumulator(args.num_classes, args.ignore, args.reduce_zero_label)
    error = None
    with progress(len(names), "miou", disable=len(names) < 20) as bar:
        for name in names:
            error = _score_pair(acc, truth_dir, pred_dir, name)
            if error:
                break
            bar.update()
    if error:  # printed once the bar is closed, so that it gets a line of its own
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = acc.summary()
    out = {
        "miou": summary["miou"],
        "iou": summary["iou"],
        "pixel_accuracy": summary["pixel_accuracy"],
        "n_images": len(names),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
