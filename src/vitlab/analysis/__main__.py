"""The thesis's GroupViT analyses, one command each (definitions: `vitlab.analysis.groupvit`):

    python -m vitlab.analysis knn       --ckpt C --dataset pascal_voc --root R --out DIR
                                        [--bank-split train|half] [--k 10] [--cap 1000]
    python -m vitlab.analysis alignment --ckpt C --dataset pascal_voc --root R --out DIR
                                        [--top-k 0] [--background rule|complement]
    python -m vitlab.analysis entropy   --ckpt C --dataset pascal_voc --root R --out DIR [--n 8]
    python -m vitlab.analysis compare   --summary-a A/summary.json --summary-b B/summary.json
                                        --out DIR
    python -m vitlab.analysis compare   --ckpt-a A --ckpt-b B --dataset D --root R --out DIR

`--ckpt` is anything `load_groupvit` reads (vitlab .pt/.ckpt, NVlabs .pth, transformers dir or
hub id). knn / alignment / entropy look at each image in one crop: the whole image with its short
side resized to --short-side. Each tool writes <tool>.json (+ PNGs) under --out and prints the
same JSON on one line. Exit code 2 with a message naming the culprit on a missing file or
folder, an unknown dataset, a malformed summary or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.analysis.groupvit import (
    BACKGROUND_SCORES,
    AnalysisError,
    compare_summaries,
    read_summary,
    run_alignment,
    run_entropy,
    run_knn,
)
from vitlab.data.segmentation import DATASETS, SegmentationDatasetSpec, dataset_samples
from vitlab.devices import resolve_device
from vitlab.errors import DatasetFormatError
from vitlab.models.groupvit.checkpoints import (
    CHECKPOINT_KINDS,
    CheckpointError,
    resolve_checkpoint_source,
)
from vitlab.models.groupvit.model import (
    DEFAULT_LOGIT_SCALE_MAX,
    LOGIT_SCALE_MAX_DEFAULT,
    resolve_logit_scale_max,
)
from vitlab.models.groupvit.text import EVAL_TEMPLATE

TOOLS = ("knn", "alignment", "entropy", "compare")


# ----------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _scale_max(text: str) -> float | None:
    """--logit-scale-max: a number > 0, `none`/`null` (no clamp) or `default` (the model's)."""
    word = text.lower()
    if word in ("none", "null"):
        return None
    try:
        value = word if word == LOGIT_SCALE_MAX_DEFAULT else float(text)
        return resolve_logit_scale_max(value, "--logit-scale-max")
    except ValueError as err:  # ConfigError is one
        raise argparse.ArgumentTypeError(str(err)) from err


def _add_model(parser: argparse.ArgumentParser, *names: str, required: bool = True) -> None:
    for name in names:
        parser.add_argument(
            name,
            required=required,
            help="GroupViT checkpoint: vitlab .pt/.ckpt, NVlabs .pth, transformers dir or hub id",
        )
    parser.add_argument("--checkpoint-kind", default="auto", choices=CHECKPOINT_KINDS)
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="fully unpickle a file holding objects the safe loader refuses (runs its code)",
    )
    parser.add_argument(
        "--logit-scale-max",
        type=_scale_max,
        default=DEFAULT_LOGIT_SCALE_MAX,
        help=f"clamp of exp(logit_scale) (default {DEFAULT_LOGIT_SCALE_MAX}, the reference's; "
        "'none' = no clamp)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")


def _add_data(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--dataset", required=required, help=f"one of {', '.join(sorted(DATASETS))}"
    )
    parser.add_argument("--root", required=required, help="the dataset's folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=_positive_int, default=None, help="first N images")
    parser.add_argument(
        "--short-side", type=_positive_int, default=448, help="images resized to this short side"
    )
    parser.add_argument(
        "--template",
        action="append",
        default=None,
        help=f"prompt template (repeatable, averaged; default {EVAL_TEMPLATE!r})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitlab.analysis",
        description="GroupViT analyses of the thesis (grouping alone, alignment alone, "
        "entropy maps, per-class comparison).",
    )
    sub = parser.add_subparsers(dest="tool", required=True)

    knn = sub.add_parser("knn", help="visual grouping alone: kNN over segment features")
    _add_model(knn, "--ckpt")
    _add_data(knn)
    knn.add_argument(
        "--bank-split",
        default="train",
        help="split whose segments form the bank (default train); 'half', or a split that "
        "cannot be read or equals --split: the first half of --split's images form the bank "
        "and the second half are the queries",
    )
    knn.add_argument("--bank-limit", type=_positive_int, default=None, help="first N bank images")
    knn.add_argument("--k", type=_positive_int, default=10, help="neighbours (10)")
    knn.add_argument("--cap", type=_positive_int, default=1000, help="bank segments per class")
    knn.add_argument("--seed", type=int, default=0, help="seed of the per-class bank sample")
    knn.add_argument("--out", required=True, help="output folder")

    align = sub.add_parser("alignment", help="vision-text alignment alone: GT-region argmax")
    _add_model(align, "--ckpt")
    _add_data(align)
    align.add_argument(
        "--top-k",
        type=_non_negative_int,
        default=0,
        help="classes kept per image by the pooled embedding (0 = all, the default)",
    )
    align.add_argument(
        "--background",
        default="rule",
        choices=BACKGROUND_SCORES,
        help="background score of the 'with background' variant: the evaluation's background "
        "rule channel (default) or 1 - best foreground score",
    )
    align.add_argument(
        "--bg-threshold", type=_unit_float, default=None, help="default: the dataset's"
    )
    align.add_argument("--out", required=True, help="output folder")

    ent = sub.add_parser("entropy", help="entropy maps over groups and over labels")
    _add_model(ent, "--ckpt")
    _add_data(ent)
    ent.add_argument("--n", type=_positive_int, default=8, help="first N images (8)")
    ent.add_argument("--out", required=True, help="output folder")

    cmp_ = sub.add_parser(
        "compare",
        help="per-class IoU difference (B - A) of two summaries or two checkpoints",
        description="Either --summary-a/--summary-b (summary.json of `infer.py "
        "pipeline=segmentation`) or --ckpt-a/--ckpt-b with the dataset arguments (evaluated here "
        "with the zero-shot evaluation: sliding window, background rule).",
    )
    cmp_.add_argument("--summary-a", help="summary.json of A")
    cmp_.add_argument("--summary-b", help="summary.json of B")
    _add_model(cmp_, "--ckpt-a", "--ckpt-b", required=False)
    _add_data(cmp_, required=False)
    cmp_.add_argument("--crop", type=_positive_int, default=448, help="sliding-window crop")
    cmp_.add_argument("--stride", type=_positive_int, default=224, help="sliding-window stride")
    cmp_.add_argument("--top-k", type=_non_negative_int, default=5, help="(5; 0 = all)")
    cmp_.add_argument(
        "--bg-threshold", type=_unit_float, default=None, help="default: the dataset's"
    )
    cmp_.add_argument("--crops-per-batch", type=_positive_int, default=4)
    cmp_.add_argument("--label-a", default=None, help="name of A in the chart")
    cmp_.add_argument("--label-b", default=None, help="name of B in the chart")
    cmp_.add_argument("--out", required=True, help="output folder")
    return parser


# ----------------------------------------------------------------------------- helpers


def _spec(name: str) -> SegmentationDatasetSpec:
    if name not in DATASETS:
        raise AnalysisError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _load_model(source: str, args: argparse.Namespace, flag: str):
    from vitlab.models.groupvit.checkpoints import load_groupvit

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise AnalysisError(f"--device: {err}") from err
    try:
        source = resolve_checkpoint_source(source, args.checkpoint_kind)
    except CheckpointError as err:
        raise AnalysisError(f"{flag}: {err}") from err
    overrides = {"logit_scale_max": args.logit_scale_max}
    model = load_groupvit(
        source, args.checkpoint_kind, overrides, args.trust_checkpoint, "--trust-checkpoint"
    )
    return model.to(device).eval()


def _text(model, spec: SegmentationDatasetSpec, args: argparse.Namespace) -> torch.Tensor:
    from vitlab.inference.segmentation import class_text_embeddings

    templates = args.template or [EVAL_TEMPLATE]
    return class_text_embeddings(model, spec.prompt_names, templates)


def _jsonable(value: Any) -> Any:
    """nan/inf -> None, numpy scalars -> Python, paths -> str, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write(out: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write `out/<name>.json` atomically (never a truncated file); returns the JSON-ready
    summary."""
    summary = _jsonable(summary)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return summary


def _iou_array(block: dict[str, Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in block["iou"]], dtype=float)


def _iou_chart(block: dict[str, Any], names, path: Path, title: str) -> str:
    from vitlab.reports import per_class_iou_png

    miou = block.get("miou")
    label = "nan" if miou is None else f"{miou:.3f}"
    return str(per_class_iou_png(names, _iou_array(block), path, f"{title}: mIoU {label}"))


def _context(args: argparse.Namespace, spec: SegmentationDatasetSpec, ckpt: str) -> dict:
    return {
        "tool": args.tool,
        "checkpoint": ckpt,
        "dataset": spec.name,
        "root": args.root,
        "split": args.split,
        "short_side": args.short_side,
        "crop": "single (whole image at the short side)",
        "out": args.out,
    }


# ----------------------------------------------------------------------------- tools


def _knn(args: argparse.Namespace) -> dict[str, Any]:
    spec = _spec(args.dataset)
    queries = dataset_samples(spec.name, args.root, args.split, args.limit)
    bank, source = None, None
    if args.bank_split not in ("half", args.split):
        try:
            bank = dataset_samples(spec.name, args.root, args.bank_split, args.bank_limit)
            source = f"split {args.bank_split}"
        except DatasetFormatError as err:
            print(
                f"warning: bank split unusable ({err}); using half of {args.split}", file=sys.stderr
            )
    if bank is None:
        if len(queries) < 2:
            raise AnalysisError(
                f"{spec.name} {args.split}: {len(queries)} image(s), need >= 2 to split into "
                "bank and queries"
            )
        half = len(queries) // 2
        bank, queries = queries[:half], queries[half:]
        source = f"first half of {args.split} ({half} images; queries: the other {len(queries)})"
    model = _load_model(args.ckpt, args, "--ckpt")
    result = run_knn(
        model,
        spec,
        bank,
        queries,
        k=args.k,
        cap=args.cap,
        short_side=args.short_side,
        seed=args.seed,
    )
    out = Path(args.out)
    summary = {**_context(args, spec, args.ckpt), "bank_source": source, **result}
    summary["figure"] = _iou_chart(result, spec.class_names, out / "knn_iou.png", "kNN")
    return _write(out, "knn", summary)


def _alignment(args: argparse.Namespace) -> dict[str, Any]:
    spec = _spec(args.dataset)
    samples = dataset_samples(spec.name, args.root, args.split, args.limit)
    model = _load_model(args.ckpt, args, "--ckpt")
    result = run_alignment(
        model,
        spec,
        samples,
        _text(model, spec, args),
        short_side=args.short_side,
        top_k=args.top_k,
        background=args.background,
        bg_threshold=args.bg_threshold,
    )
    out = Path(args.out)
    summary = {**_context(args, spec, args.ckpt), **result}
    figures = {}
    if result["with_background"] is not None:
        figures["with_background"] = _iou_chart(
            result["with_background"],
            spec.class_names,
            out / "alignment_iou_with_background.png",
            "alignment, with background",
        )
    figures["without_background"] = _iou_chart(
        result["without_background"],
        spec.prompt_names,
        out / "alignment_iou_without_background.png",
        "alignment, without background",
    )
    summary["figures"] = figures
    return _write(out, "alignment", summary)


def _entropy(args: argparse.Namespace) -> dict[str, Any]:
    spec = _spec(args.dataset)
    n = min(args.n, args.limit) if args.limit else args.n
    samples = dataset_samples(spec.name, args.root, args.split, n)
    model = _load_model(args.ckpt, args, "--ckpt")
    out = Path(args.out)
    result = run_entropy(
        model, spec, samples, _text(model, spec, args), out, short_side=args.short_side
    )
    return _write(out, "entropy", {**_context(args, spec, args.ckpt), **result})


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    summaries = args.summary_a is not None or args.summary_b is not None
    checkpoints = args.ckpt_a is not None or args.ckpt_b is not None
    if summaries == checkpoints:
        raise AnalysisError(
            "compare needs either --summary-a and --summary-b, or --ckpt-a and --ckpt-b "
            "(with --dataset and --root)"
        )
    out = Path(args.out)
    if summaries:
        if args.summary_a is None or args.summary_b is None:
            raise AnalysisError("compare needs both --summary-a and --summary-b")
        a, b = read_summary(args.summary_a), read_summary(args.summary_b)
        label_a = args.label_a or Path(args.summary_a).resolve().parent.name or "A"
        label_b = args.label_b or Path(args.summary_b).resolve().parent.name or "B"
        sources = {"summary_a": args.summary_a, "summary_b": args.summary_b}
    else:
        if args.ckpt_a is None or args.ckpt_b is None:
            raise AnalysisError("compare needs both --ckpt-a and --ckpt-b")
        if args.dataset is None or args.root is None:
            raise AnalysisError("compare with checkpoints needs --dataset and --root")
        a, b = _evaluate_checkpoints(args, out)
        label_a = args.label_a or Path(args.ckpt_a).stem
        label_b = args.label_b or Path(args.ckpt_b).stem
        sources = {"ckpt_a": args.ckpt_a, "ckpt_b": args.ckpt_b, "dataset": args.dataset}
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    result = compare_summaries(a, b, label_a, label_b)
    from vitlab.reports import iou_difference_png

    names = list(result["per_class"])
    rows = result["per_class"].values()
    iou_a = np.array([np.nan if r["iou_a"] is None else r["iou_a"] for r in rows], dtype=float)
    iou_b = np.array([np.nan if r["iou_b"] is None else r["iou_b"] for r in rows], dtype=float)
    figure = iou_difference_png(names, iou_a, iou_b, out / "iou_difference.png", label_a, label_b)
    summary = {"tool": "compare", **sources, **result, "figure": str(figure), "out": args.out}
    return _write(out, "compare", summary)


def _evaluate_checkpoints(args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    from vitlab.inference.segmentation import SegmentationSettings, evaluate_zero_shot

    spec = _spec(args.dataset)
    samples = dataset_samples(spec.name, args.root, args.split, args.limit)
    settings = SegmentationSettings.for_dataset(
        spec,
        short_side=args.short_side,
        crop=args.crop,
        stride=args.stride,
        top_k=args.top_k,
        crops_per_batch=args.crops_per_batch,
        bg_threshold=args.bg_threshold,
    )
    # both loaded before either is evaluated: a bad --ckpt-b fails at once
    models = [
        _load_model(args.ckpt_a, args, "--ckpt-a"),
        _load_model(args.ckpt_b, args, "--ckpt-b"),
    ]
    results = []
    for flag, source, model in zip(("--ckpt-a", "--ckpt-b"), (args.ckpt_a, args.ckpt_b), models):
        text = _text(model, spec, args)
        summary = evaluate_zero_shot(
            model, spec, samples, text, settings, desc=f"segment {flag[2:]}"
        )
        summary.update(checkpoint=source, settings=settings.__dict__)
        results.append(_write(out, f"summary_{flag[-1]}", summary))
    return results[0], results[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tool = {"knn": _knn, "alignment": _alignment, "entropy": _entropy, "compare": _compare}
    try:
        summary = tool[args.tool](args)
    except (AnalysisError, DatasetFormatError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
