"""Predict: test quadrats at original resolution -> plot-level species lists -> submission.

Each quadrat is cut into the strategy's boxes; every box is centre-cropped and resized to the
backbone's input like the training images; the boxes of several quadrats go through the model
in batched forwards, while the next quadrats are decoded in a background thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vitlab.data.images import CorruptImageError, center_crop_resize, decode_image, to_uint8_array
from vitlab.data.loading import chunks, prefetch
from vitlab.data.plantclef import plot_id_of
from vitlab.models.backbones import Backbone, preprocess_batch
from vitlab.progress import progress
from vitlab.stages.embed import FeatureReducer, embed_pixels

log = logging.getLogger(__name__)


class Strategy(Protocol):
    name: str

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]: ...
    def aggregate(self, tile_probs: np.ndarray, species_ids: Sequence[int]) -> list[int]: ...


class Predictor(Protocol):
    species_ids: list[int]
    backbone: Backbone

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EmbeddingHeadPredictor:
    """Backbone -> feature reducer -> trained head (the paper's pipeline)."""

    backbone: Backbone
    features: FeatureReducer
    head: torch.nn.Module
    species_ids: list[int]

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        vectors = embed_pixels(self.backbone, self.features, pixels)
        return torch.softmax(self.head(vectors.float()), dim=-1)


@dataclass
class BackboneClassifierPredictor:
    """The fine-tuned timm model's own classifier (the "pretrained classifier" baseline)."""

    backbone: Backbone
    species_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.species_ids:
            if self.backbone.class_ids is None:
                raise ValueError(
                    "predictor=backbone_classifier needs the backbone's "
                    "class_mapping.txt (backbone.class_mapping)"
                )
            self.species_ids = list(self.backbone.class_ids)

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.backbone.classify(pixels).float(), dim=-1)


@dataclass
class QuadratTiles:
    plot_id: str
    tiles: np.ndarray | None  # (n_tiles, S, S, 3) uint8, None when the image is corrupt
    error: str | None = None


def cut_tiles(path: Path, strategy: Strategy, size: int, center_crop: bool) -> QuadratTiles:
    plot_id = plot_id_of(path)
    try:
        img = decode_image(path)
    except CorruptImageError as err:
        return QuadratTiles(plot_id, None, str(err))
    tiles = [
        to_uint8_array(center_crop_resize(img.crop(box), size, crop=center_crop))
        for box in strategy.boxes(*img.size)
    ]
    return QuadratTiles(plot_id, np.stack(tiles))


@dataclass
class PredictionResult:
    predictions: dict[str, list[int]]
    tile_count: int
    skipped: list[str]  # error messages of quadrats that could not be read

    def report(self) -> dict[str, Any]:
        return {
            "plots": len(self.predictions),
            "tiles": self.tile_count,
            "skipped_images": len(self.skipped),
            "skipped_examples": self.skipped[:100],
        }


def predict_quadrats(
    image_paths: Sequence[Path],
    strategy: Strategy,
    predictor: Predictor,
    batch_size: int = 64,
    quadrats_per_batch: int = 4,
    center_crop: bool = True,
) -> PredictionResult:
    """Plot id -> predicted species ids for every quadrat. A corrupt quadrat is reported and
    gets an empty prediction (so it scores 0 rather than vanishing from the submission)."""
    size = predictor.backbone.input_spec.size

    def groups() -> Iterator[list[QuadratTiles]]:
        for group in chunks(list(image_paths), quadrats_per_batch):
            yield [cut_tiles(p, strategy, size, center_crop) for p in group]

    predictions: dict[str, list[int]] = {}
    skipped: list[str] = []
    tile_count = 0
    bar = progress(len(image_paths), f"predict ({strategy.name})", unit="plot")
    for group in prefetch(groups()):
        readable = [q for q in group if q.tiles is not None]
        for q in group:
            if q.tiles is None:
                log.warning("predict: skipped %s", q.error)
                skipped.append(q.error or q.plot_id)
                predictions[q.plot_id] = []
        if readable:
            tiles = np.concatenate([q.tiles for q in readable])
            probs = np.concatenate(
                [
                    predictor.probabilities(
                        preprocess_batch(batch, predictor.backbone.input_spec)
                    ).numpy()
                    for batch in chunks(tiles, batch_size)
                ]
            )
            offset = 0
            for q in readable:
                n = len(q.tiles)
                predictions[q.plot_id] = strategy.aggregate(
                    probs[offset : offset + n], predictor.species_ids
                )
                offset += n
            tile_count += len(tiles)
        bar.update(len(group))
    bar.close()
    return PredictionResult(predictions, tile_count, skipped)
