"""PlantCLEF 2024 multi-label scores, as fractions in [0, 1].

- macro F1 per plot: mean over plots of 2|Y∩Ŷ|/(|Y|+|Ŷ|); a plot missing from the submission
  counts as an empty prediction and so scores 0 (the organisers' convention).
- macro F1 per species: mean per-species F1 over every species in truth ∪ prediction.
- micro F1: from global TP/FP/FN counts; micro precision and recall from the same counts (not
  official scores: they show whether a method predicts more species or fewer, right ones).
A submission naming plots that are not in the truth is an error: it is the wrong file; so is an
empty ground truth (every score would be 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from vitlab.errors import DatasetFormatError

PlotLabels = Mapping[str, Iterable[int]]


def _aligned(truth: PlotLabels, submission: PlotLabels) -> list[tuple[set[int], set[int]]]:
    if not truth:
        raise DatasetFormatError("the ground truth lists no plot: there is nothing to score")
    extra = sorted(set(submission) - set(truth))
    if extra:
        raise DatasetFormatError(
            f"submission has {len(extra)} plot(s) not in the ground truth, e.g. {extra[:3]}"
        )
    return [(set(truth[p]), set(submission.get(p, ()))) for p in sorted(truth)]


def f1_per_plot(truth: PlotLabels, submission: PlotLabels) -> float:
    pairs = _aligned(truth, submission)
    if not pairs:
        return 0.0
    scores = [2 * len(t & p) / (len(t) + len(p)) if t & p else 0.0 for t, p in pairs]
    return sum(scores) / len(scores)


def f1_per_species(truth: PlotLabels, submission: PlotLabels) -> float:
    scores = per_species_f1(truth, submission)
    return sum(scores.values()) / len(scores) if scores else 0.0


def _micro_counts(truth: PlotLabels, submission: PlotLabels) -> tuple[int, int, int]:
    tp = fp = fn = 0
    for t, p in _aligned(truth, submission):
        tp += len(t & p)
        fp += len(p - t)
        fn += len(t - p)
    return tp, fp, fn


def micro_f1(truth: PlotLabels, submission: PlotLabels) -> float:
    tp, fp, fn = _micro_counts(truth, submission)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def micro_precision_recall(truth: PlotLabels, submission: PlotLabels) -> dict[str, float]:
    tp, fp, fn = _micro_counts(truth, submission)
    return {
        "micro_precision": tp / (tp + fp) if tp else 0.0,
        "micro_recall": tp / (tp + fn) if tp else 0.0,
    }


def plantclef_scores(truth: PlotLabels, submission: PlotLabels) -> dict[str, float]:
    return {
        "macro_f1_per_plot": f1_per_plot(truth, submission),
        "macro_f1_per_species": f1_per_species(truth, submission),
        "micro_f1": micro_f1(truth, submission),
        **micro_precision_recall(truth, submission),
    }


def per_plot_f1(truth: PlotLabels, submission: PlotLabels) -> dict[str, float]:
    """F1 of each plot, for tables and plots."""
    out = {}
    for plot_id in sorted(truth):
        t, p = set(truth[plot_id]), set(submission.get(plot_id, ()))
        out[plot_id] = 2 * len(t & p) / (len(t) + len(p)) if t & p else 0.0
    return out


def per_species_f1(truth: PlotLabels, submission: PlotLabels) -> dict[int, float]:
    """F1 of each species in truth ∪ prediction (the terms of the per-species macro F1)."""
    tp: Counter[int] = Counter()
    fp: Counter[int] = Counter()
    fn: Counter[int] = Counter()
    for t, p in _aligned(truth, submission):
        tp.update(t & p)
        fp.update(p - t)
        fn.update(t - p)
    species = sorted(set(tp) | set(fp) | set(fn))
    return {s: (2 * tp[s] / (2 * tp[s] + fp[s] + fn[s]) if tp[s] else 0.0) for s in species}
