"""Score: a submission against the test ground truth, with per-plot and per-species views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from vitlab.atomic import atomic_output
from vitlab.metrics.plantclef import per_plot_f1, per_species_f1, plantclef_scores


def per_plot_rows(
    truth: Mapping[str, Sequence[int]], predictions: Mapping[str, Sequence[int]]
) -> list[list[object]]:
    """Rows (plot_id, truth, prediction, F1) for a table of predictions vs truth."""
    f1 = per_plot_f1(truth, predictions)
    return [
        [p, str(list(truth[p])), str(list(predictions.get(p, []))), round(f1[p], 4)]
        for p in sorted(truth)
    ]


def plot_per_species_f1(
    truth: Mapping[str, Sequence[int]], predictions: Mapping[str, Sequence[int]], path: Path
) -> Path:
    """Bar chart of the per-species F1 terms (sorted), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = sorted(per_species_f1(truth, predictions).items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(scores)), 4))
    ax.bar(range(len(scores)), [s for _, s in scores], color="tab:green")
    ax.set_xticks(range(len(scores)), [str(k) for k, _ in scores], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    overall = plantclef_scores(truth, predictions)["macro_f1_per_species"]
    ax.set_title(f"per-species F1 (macro {overall:.3f})")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
