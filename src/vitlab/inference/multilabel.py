"""Multi-label aggregation of a quadrat's tiles (beyond the PlantCLEF 2024 paper's argmax).

Each tile gets one probability per species (a sigmoid head: several species may be present, or
none); the tiles' probabilities are pooled into one score per species, and a decision rule
keeps the species whose score reaches a threshold, optionally capped at the best `top_k`.

Pooling (`pooling`): max (a species seen clearly in one tile is there), mean (a species must be
seen across the plot), noisy-OR (1 - prod(1 - p): independent evidence adds up).
Boxes: one or several grids (`grid_sizes: [2, 3, 4]`: multi-scale, every tile pooled together)
and/or the whole quadrat (`full_image`); `grid_sizes: [] full_image: true` is a whole-quadrat
multi-label prediction.
Thresholds (`threshold`): a number, or `auto`: chosen after training on validation data only
(never on test data), saved in the checkpoint, and read from it by infer.py. Pooling over a
plot's boxes raises the scores (max over 9 tiles: 9 chances of a false positive), so `auto`
chooses the threshold on *validation pseudo-plots* pooled by the same rule: each draws a set of
`plot_species` species and `boxes_per_plot` validation images/collages showing only those
species (or bare soil), its truth the union of theirs (`pseudo_plots`, `calibrate`).
`per_species: true` uses a threshold per species (the global one for species with fewer than
MIN_POSITIVES positive pseudo-plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

import numpy as np

from vitlab.data.images import grid_boxes
from vitlab.inference.plantclef import Box, _check_positive

POOLINGS = ("max", "mean", "noisy_or")
MIN_POSITIVES = 3  # validation positives a species needs for a threshold of its own
CANDIDATE_THRESHOLDS = np.round(np.arange(0.02, 0.99, 0.02), 2)


def pool(tile_probs: np.ndarray, how: str) -> np.ndarray:
    """(tiles, classes) probabilities -> (classes,) scores."""
    if how == "max":
        return tile_probs.max(axis=0)
    if how == "mean":
        return tile_probs.mean(axis=0)
    if how == "noisy_or":
        return 1.0 - np.prod(1.0 - np.clip(tile_probs, 0.0, 1.0), axis=0)
    raise ValueError(f"inference.pooling must be one of {list(POOLINGS)}, got {how!r}")


def decide(
    scores: np.ndarray, thresholds: float | np.ndarray, top_k: int | None, min_species: int
) -> list[int]:
    """Class indices whose score reaches its threshold, best first, at most `top_k`; the best
    `min_species` when none does (a vegetation plot is never empty)."""
    order = np.argsort(-scores, kind="stable")
    kept = [int(i) for i in order if scores[i] >= np.broadcast_to(thresholds, scores.shape)[i]]
    if len(kept) < min_species:
        kept = [int(i) for i in order[:min_species]]
    return kept[:top_k] if top_k else kept


def samples_f1(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-row F1 of boolean (rows, classes) sets; 1 where both are empty (PlantCLEF's
    per-plot F1 term)."""
    hits = (truth & predicted).sum(1)
    size = truth.sum(1) + predicted.sum(1)
    return np.where(size == 0, 1.0, 2.0 * hits / np.maximum(size, 1))


def pseudo_plots(
    truth: np.ndarray, boxes: int, plots: int, species: tuple[int, int], seed: int = 0
) -> list[np.ndarray]:
    """Row indices of `plots` pseudo-plots of `boxes` validation rows each: a plot draws
    `species[0]..species[1]` species among those with a positive row, then rows (with
    replacement) whose species all belong to that set (rows of none: bare soil)."""
    rng = np.random.default_rng(seed)
    present = np.flatnonzero(truth.any(0))
    out = []
    for _ in range(plots):
        k = min(len(present), int(rng.integers(species[0], species[1] + 1)))
        allowed = np.zeros(truth.shape[1], bool)
        allowed[rng.choice(present, k, replace=False)] = True
        eligible = np.flatnonzero(~(truth & ~allowed).any(1))
        out.append(rng.choice(eligible, boxes))
    return out


def choose_thresholds(probs: np.ndarray, truth: np.ndarray) -> dict[str, object]:
    """Thresholds that maximise F1 on validation rows (probs and boolean truth, both (rows,
    classes)): the global one by the mean per-row F1 (the per-plot metric), each species' by
    its own F1 (one-vs-rest), falling back to the global one under MIN_POSITIVES positives."""
    truth = truth.astype(bool)
    per_row = [samples_f1(truth, probs >= t).mean() for t in CANDIDATE_THRESHOLDS]
    best = int(np.argmax(per_row))
    global_t = float(CANDIDATE_THRESHOLDS[best])
    per_species = np.full(probs.shape[1], global_t)
    positives = truth.sum(0)
    for c in np.flatnonzero(positives >= MIN_POSITIVES):
        predicted = probs[:, c][None, :] >= CANDIDATE_THRESHOLDS[:, None]  # (thresholds, rows)
        hits = (predicted & truth[:, c]).sum(1)
        f1 = 2.0 * hits / (predicted.sum(1) + positives[c])
        per_species[c] = float(CANDIDATE_THRESHOLDS[int(np.argmax(f1))])
    return {
        "global": global_t,
        "global_val_f1": float(per_row[best]),
        "per_species": [float(t) for t in per_species],
        "rows": int(len(probs)),
    }


@dataclass(frozen=True)
class PooledThreshold:
    """Tiles of one or several grids (and/or the whole quadrat) -> sigmoid probabilities ->
    pooled per species -> threshold (global or per species) -> optional top-K cap."""

    grid_sizes: Sequence[int] = (3,)
    full_image: bool = False
    pooling: str = "max"
    threshold: float | str = "auto"
    per_species: bool = False
    top_k: int | None = None
    min_species: int = 1
    plot_species: Sequence[int] = (3, 6)  # species per validation pseudo-plot (`auto`)
    calibration_plots: int = 1000
    name: str = "pooled_threshold"
    # the thresholds `auto` stands for (from the checkpoint): global, or one per class index
    chosen: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_sizes", tuple(self.grid_sizes or ()))
        object.__setattr__(self, "plot_species", tuple(self.plot_species))
        low, high = (self.plot_species + (0, 0))[:2]
        if len(self.plot_species) != 2 or not 1 <= low <= high:
            raise ValueError(
                f"inference.plot_species must be [low, high], 1 <= low <= high: "
                f"{list(self.plot_species)}"
            )
        _check_positive(calibration_plots=self.calibration_plots)
        _check_positive(**{f"grid_sizes[{i}]": n for i, n in enumerate(self.grid_sizes)})
        if not self.grid_sizes and not self.full_image:
            raise ValueError("inference: no boxes: set grid_sizes (e.g. [3]) or full_image=true")
        if self.pooling not in POOLINGS:
            raise ValueError(f"inference.pooling must be one of {list(POOLINGS)}: {self.pooling!r}")
        auto = self.threshold == "auto"
        number = isinstance(self.threshold, Real) and not isinstance(self.threshold, bool)
        if not auto and not (number and 0 < float(self.threshold) < 1):
            raise ValueError(f"inference.threshold must be auto or in (0, 1): {self.threshold!r}")
        if self.per_species and not auto:
            raise ValueError("inference.per_species=true needs inference.threshold=auto")
        if self.top_k is not None:
            _check_positive(top_k=self.top_k)
        if not isinstance(self.min_species, Integral) or self.min_species < 0:
            raise ValueError(f"inference.min_species must be >= 0: {self.min_species!r}")

    @property
    def needs_thresholds(self) -> bool:
        return self.threshold == "auto"

    @property
    def boxes_per_plot(self) -> int:
        return sum(n * n for n in self.grid_sizes) + int(self.full_image)

    def calibrate(self, probs: np.ndarray, truth: np.ndarray, seed: int = 0) -> dict[str, object]:
        """Thresholds for this rule, chosen on validation pseudo-plots (module docstring) from
        validation rows' probabilities and boolean truth, both (rows, classes)."""
        truth = truth.astype(bool)
        plots = pseudo_plots(
            truth, self.boxes_per_plot, self.calibration_plots, self.plot_species, seed
        )
        pooled = np.stack([pool(probs[rows], self.pooling) for rows in plots])
        union = np.stack([truth[rows].any(0) for rows in plots])
        chosen = choose_thresholds(pooled, union)
        return {**chosen, "pooling": self.pooling, "boxes_per_plot": self.boxes_per_plot}

    def with_thresholds(self, decision: dict[str, object]) -> PooledThreshold:
        """This rule with the thresholds chosen at training time (`calibrate`), which must have
        been chosen for the same pooling over as many boxes."""
        made_for = (decision.get("pooling"), decision.get("boxes_per_plot"))
        if made_for != (self.pooling, self.boxes_per_plot):
            raise ValueError(
                f"the saved thresholds were chosen for pooling={made_for[0]} over "
                f"{made_for[1]} boxes per plot, and this rule pools {self.pooling} over "
                f"{self.boxes_per_plot} (inference.pooling, inference.grid_sizes, "
                "inference.full_image): train with this rule, or set inference.threshold=<number>"
            )
        if self.per_species:
            chosen = tuple(float(t) for t in decision["per_species"])  # type: ignore[union-attr]
        else:
            chosen = (float(decision["global"]),)  # type: ignore[arg-type]
        return replace(self, chosen=chosen)

    def boxes(self, width: int, height: int) -> list[Box]:
        boxes = [box for n in self.grid_sizes for box in grid_boxes(width, height, n)]
        return boxes + ([(0, 0, width, height)] if self.full_image else [])

    def box_params(self) -> dict[str, object]:
        if len(self.grid_sizes) == 1 and not self.full_image:  # the tiles of grid_argmax
            return {"boxes": "grid", "grid_size": self.grid_sizes[0]}
        return {"boxes": "grids", "grid_sizes": list(self.grid_sizes), "full": self.full_image}

    def thresholds(self, num_classes: int) -> float | np.ndarray:
        if not self.needs_thresholds:
            return float(self.threshold)
        if self.chosen is None:
            raise ValueError(
                "inference.threshold=auto: no thresholds chosen on validation data (train with a "
                "multi-label loss and validation images, or set inference.threshold=<number>)"
            )
        if len(self.chosen) == 1:
            return self.chosen[0]
        if len(self.chosen) != num_classes:
            raise ValueError(f"{len(self.chosen)} thresholds for {num_classes} classes")
        return np.asarray(self.chosen)

    def aggregate(self, tile_probs: np.ndarray, species_ids: Sequence[int]) -> list[int]:
        scores = pool(tile_probs, self.pooling)
        kept = decide(scores, self.thresholds(len(scores)), self.top_k, self.min_species)
        return [int(species_ids[i]) for i in kept]
