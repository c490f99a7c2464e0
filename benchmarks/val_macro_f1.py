"""Validation macro F1 at PlantCLEF scale: the per-epoch cost of each way of computing it.

One validation epoch = `--rows` rows in batches of `--batch` over `--classes` classes (truth
long-tailed, half the predictions right, the rest spread over all classes). Variants, each from
the per-batch predicted indices to the epoch's macro F1 (the project's convention: sklearn's macro
over truth ∪ prediction):
  before       the per-class Python loop vitlab used until issue 15 (3 masks per class)
  sklearn      sklearn.metrics.f1_score(average='macro') on the concatenated arrays
  torchmetrics MulticlassF1Score(average='macro') updated per batch (a C x C bincount each)
  MacroF1      vitlab.metrics.classification.MacroF1 updated per batch (three C-bincounts)
All variants must agree (checked). Repeats are paired: each repeat runs every variant, in a
rotated order; the report gives each variant's median with min-max spread, the median of the
per-repeat ratio before/MacroF1 with its spread, os.getloadavg() before and after, and the share
of the machine's CPU used by other processes during the runs.

Run: PYTHONPATH=src python benchmarks/val_macro_f1.py [--classes 7806 --rows 20000 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import format_share, timed_with_noise  # noqa: E402

from vitlab.metrics.classification import MacroF1  # noqa: E402


def before_macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """vitlab.metrics.classification.macro_f1 as it was at cc36a99 (verbatim)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    labels = np.union1d(truth, pred)
    if labels.size == 0:
        return 0.0
    scores = []
    for label in labels:
        tp = np.sum((truth == label) & (pred == label))
        fp = np.sum((truth != label) & (pred == label))
        fn = np.sum((truth == label) & (pred != label))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def make_epoch(classes: int, rows: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1) ** 0.8  # long tail, like PlantCLEF's species
    truth = rng.choice(classes, size=rows, p=weights / weights.sum())
    pred = np.where(rng.random(rows) < 0.5, truth, rng.integers(0, classes, rows))
    t, p = torch.as_tensor(truth), torch.as_tensor(pred)
    return list(zip(p.split(batch), t.split(batch), strict=True))


def variants(classes: int):
    from sklearn.metrics import f1_score
    from torchmetrics.classification import MulticlassF1Score

    def gathered(batches):  # what the old LightningModule did: keep every batch, then concat
        pred = torch.cat([p for p, _ in batches]).numpy()
        truth = torch.cat([t for _, t in batches]).numpy()
        return truth, pred

    def before(batches):
        return before_macro_f1(*gathered(batches))

    def sklearn(batches):
        truth, pred = gathered(batches)
        labels = np.union1d(truth, pred)
        return f1_score(truth, pred, labels=labels, average="macro", zero_division=0)

    def per_batch(metric):
        def run(batches):
            metric.reset()
            for p, t in batches:
                metric.update(p, t)
            return float(metric.compute())

        return run

    tm = MulticlassF1Score(classes, average="macro", validate_args=False)
    return {
        "before": before,
        "sklearn": sklearn,
        "torchmetrics": per_batch(tm),
        "MacroF1": per_batch(MacroF1(classes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=7806)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="variants not to run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the figure does not depend on what else is running

    batches = make_epoch(args.classes, args.rows, args.batch)
    runs = {k: v for k, v in variants(args.classes).items() if k not in args.skip}
    names = list(runs)
    load_before = os.getloadavg()
    print(
        f"{args.classes} classes, {args.rows} rows in batches of {args.batch}, "
        f"{args.repeats} paired repeats; torch threads 1; load {load_before[0]:.2f} "
        f"on {os.cpu_count()} cores",
        flush=True,
    )
    values: dict[str, float] = {}
    times: dict[str, list[float]] = {k: [] for k in names}
    shares: list[float] = []
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            value, seconds, share = timed_with_noise(lambda n=name: runs[n](batches))
            times[name].append(seconds)
            if share is not None:
                shares.append(share)
            values.setdefault(name, value)
            if abs(values[name] - value) > 1e-9:
                raise SystemExit(f"{name}: not deterministic ({values[name]} vs {value})")
    reference = values.get("sklearn", next(iter(values.values())))
    for name, value in values.items():
        if abs(value - reference) > 1e-6:
            raise SystemExit(f"{name} gives macro F1 {value}, sklearn {reference}")
    load_after = os.getloadavg()

    print(f"macro F1 (all variants agree): {reference:.6f}")
    print(f"{'variant':<13} {'median s':>9} {'min-max s':>17}")
    for name in names:
        t = times[name]
        print(f"{name:<13} {statistics.median(t):9.4f} {min(t):8.4f}-{max(t):8.4f}")
    if "MacroF1" in times:
        for other in names:
            if other == "MacroF1":
                continue
            ratios = [a / b for a, b in zip(times[other], times["MacroF1"], strict=True)]
            print(
                f"{other}/MacroF1 per repeat: median {statistics.median(ratios):.1f}x "
                f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x)"
            )
    share = statistics.median(shares) if shares else None
    print(
        f"loadavg before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}; others' CPU share during runs (median) "
        f"{format_share(share)}"
    )


if __name__ == "__main__":
    main()
