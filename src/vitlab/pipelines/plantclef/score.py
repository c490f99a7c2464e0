"""Score: a submission against the test ground truth, with per-plot and per-species views."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from vitlab.metrics.plantclef import per_plot_f1, per_species_f1, plantclef_scores
from vitlab.reports import f1_distribution_png


def per_plot_rows(
    truth: Mapping[str, Sequence[int]], predictions: Mapping[str, Sequence[int]]
) -> list[list[object]]:
    """Rows (plot_id, truth, prediction, F1) for a table of predictions vs truth."""
    f1 = per_plot_f1(truth, predictions)
    return [
        [p, str(list(truth[p])), str(list(predictions.get(p, []))), round(f1[p], 4)]
        for p in sorted(truth)
    ]


def per_species_f1_support(
    truth: Mapping[str, Sequence[int]], predictions: Mapping[str, Sequence[int]]
) -> dict[int, tuple[float, int]]:
    """species -> (F1, number of truth plots holding it), over truth ∪ prediction."""
    support = Counter(s for labels in truth.values() for s in set(labels))
    return {s: (f1, support[s]) for s, f1 in per_species_f1(truth, predictions).items()}


def plot_per_species_f1(
    truth: Mapping[str, Sequence[int]],
    predictions: Mapping[str, Sequence[int]],
    path: Path,
    names: Mapping[int, str] | None = None,
    k: int = 15,
) -> Path:
    """The per-species F1 terms as one fixed-size PNG at any number of species: their
    histogram and the best and worst `k` species (named when `names` maps id -> name)."""
    overall = plantclef_scores(truth, predictions)["macro_f1_per_species"]
    scores = per_species_f1_support(truth, predictions)
    # 3 significant digits: at thousands of species a weak model's macro F1 is < 0.001, and
    # "0.000" would read as no species ever right
    title = f"per-species F1 over {len(scores)} species (macro {overall:.3g})"
    return f1_distribution_png(scores, path, names, k=k, what="species", title=title)
