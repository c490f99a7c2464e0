"""Plot-level inference strategies for PlantCLEF quadrats.

A strategy says which boxes of a quadrat to classify (`boxes`, described by `box_params`: the
cache key of the test tiles' embeddings) and how to turn the per-box class probabilities into
the plot's species list (`aggregate`). Both are pure functions of
their inputs, so they are tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from vitlab.data.images import grid_boxes

Box = tuple[int, int, int, int]


def _check_positive(**values: int) -> None:
    """Each value is a whole number >= 1 (`grid_size=1.5` is refused, not truncated)."""
    for key, value in values.items():
        whole = isinstance(value, Integral) and not isinstance(value, bool)
        if not whole or value < 1:
            raise ValueError(f"inference.{key} must be a whole number >= 1, got {value!r}")


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (stable for ties)."""
    order = np.argsort(-probs, kind="stable")
    return order[: min(k, probs.shape[-1])]


@dataclass(frozen=True)
class FullImageTopK:
    """Classify the whole quadrat once; the top-K species are the prediction."""

    k: int = 5
    name: str = "full_image"

    def __post_init__(self) -> None:
        _check_positive(k=self.k)

    def boxes(self, width: int, height: int) -> list[Box]:
        return [(0, 0, width, height)]

    def box_params(self) -> dict[str, object]:
        return {"boxes": "full_image"}

    def aggregate(self, tile_probs: np.ndarray, species_ids: Sequence[int]) -> list[int]:
        return [int(species_ids[i]) for i in top_k_indices(tile_probs[0], self.k)]


@dataclass(frozen=True)
class GridArgmax:
    """N x N tiles, argmax per tile, union over tiles (ordered by best tile probability)."""

    grid_size: int = 3
    name: str = "grid_argmax"

    def __post_init__(self) -> None:
        _check_positive(grid_size=self.grid_size)

    def boxes(self, width: int, height: int) -> list[Box]:
        return grid_boxes(width, height, self.grid_size)

    def box_params(self) -> dict[str, object]:
        return {"boxes": "grid", "grid_size": self.grid_size}

    def aggregate(self, tile_probs: np.ndarray, species_ids: Sequence[int]) -> list[int]:
        best = tile_probs.argmax(axis=1)
        score = tile_probs.max(axis=1)
        merged = _dedupe_by_score(best, score)
        return [int(species_ids[i]) for i in merged]


@dataclass(frozen=True)
class GridTopK:
    """N x N tiles, top `k_per_tile` per tile of which the first `top_l` are kept; merged,
    sorted by probability, deduplicated (first = best occurrence kept), first `top_l` overall."""

    grid_size: int = 3
    k_per_tile: int = 10
    top_l: int = 5
    name: str = "grid_topk"

    def __post_init__(self) -> None:
        _check_positive(grid_size=self.grid_size, k_per_tile=self.k_per_tile, top_l=self.top_l)

    def boxes(self, width: int, height: int) -> list[Box]:
        return grid_boxes(width, height, self.grid_size)

    def box_params(self) -> dict[str, object]:
        return {"boxes": "grid", "grid_size": self.grid_size}

    def aggregate(self, tile_probs: np.ndarray, species_ids: Sequence[int]) -> list[int]:
        classes, scores = [], []
        for probs in tile_probs:
            kept = top_k_indices(probs, self.k_per_tile)[: self.top_l]
            classes.extend(kept)
            scores.extend(probs[kept])
        merged = _dedupe_by_score(np.asarray(classes), np.asarray(scores))
        return [int(species_ids[i]) for i in merged[: self.top_l]]


def _dedupe_by_score(classes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Classes sorted by score (descending), each kept once at its best score."""
    seen: set[int] = set()
    out = []
    for idx in np.argsort(-scores, kind="stable"):
        cls = int(classes[idx])
        if cls not in seen:
            seen.add(cls)
            out.append(cls)
    return out
