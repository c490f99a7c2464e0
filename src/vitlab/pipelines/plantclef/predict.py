"""Predict: test quadrats at original resolution -> plot-level species lists -> submission.

Each quadrat is cut into the strategy's boxes; every box is fitted to the backbone's square input
(`tile_fit`: centre-cropped like the training images, resized whole, or padded to a square);
the boxes of several quadrats go through the model in batched forwards, while the next quadrats
are decoded in a background thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from vitlab.data.images import CorruptImageError, center_crop_resize, decode_image, to_uint8_array
from vitlab.data.loading import chunks, prefetch
from vitlab.data.plantclef import plot_id_of
from vitlab.devices import CPU, Compute
from vitlab.errors import ConfigError
from vitlab.models.backbones import Backbone, preprocess_batch
from vitlab.progress import progress
from vitlab.stages.embed import FeatureReducer, embed_pixels

log = logging.getLogger(__name__)
# How a (non-square) box becomes the backbone's square input (`predict.tile_fit`):
# center_crop: the largest centred square (what the training images got; the teams' eval
#   transforms crop too), resize: the whole box squeezed to a square, pad: the whole box resized
#   to fit and padded to a square with the backbone's mean colour (zero after normalisation).
TILE_FITS = ("center_crop", "resize", "pad")


class Strategy(Protocol):
    name: str

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]: ...
    def box_params(self) -> dict[str, object]: ...
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
    multilabel: bool = False  # a sigmoid per species (multi-label loss), else a softmax

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        vectors = embed_pixels(self.backbone, self.features, pixels)
        device = next(self.head.parameters(), vectors).device  # the head may stay on the CPU
        return head_probabilities(self.head(vectors.float().to(device)), self.multilabel)


def head_probabilities(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """A sigmoid per species (a head trained with a multi-label loss) or a softmax."""
    logits = logits.float()
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)


@dataclass
class BackboneClassifierPredictor:
    """The fine-tuned timm model's own classifier (the "pretrained classifier" baseline)."""

    backbone: Backbone
    species_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.species_ids:
            if self.backbone.class_ids is None:
                checkpoint = getattr(self.backbone, "checkpoint_path", None)
                beside = f" (none beside {checkpoint})" if checkpoint else ""
                raise ConfigError(
                    "predictor=backbone_classifier needs the species id of each classifier "
                    f"output: a class_mapping.txt{beside}; set backbone.class_mapping=<file> "
                    "(line i = species id of class i)"
                )
            self.species_ids = list(self.backbone.class_ids)

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.backbone.classify(pixels).float(), dim=-1)


@dataclass
class QuadratTiles:
    plot_id: str
    # (n_tiles, S, S, 3) uint8 (a tensor on the GPU when it cut them), None when unreadable
    tiles: np.ndarray | torch.Tensor | None
    error: str | None = None


def fit_tile(
    img: Image.Image, size: int, how: str = "center_crop", fill: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """One box -> a size x size image, as `how` (one of TILE_FITS) says."""
    if how == "center_crop":
        return center_crop_resize(img, size, crop=True)
    if how == "resize":
        return center_crop_resize(img, size, crop=False)
    if how == "pad":
        width, height = img.size
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), fill)
        resized = img.resize(inner, Image.Resampling.BICUBIC) if inner != img.size else img
        canvas.paste(resized, ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    raise ConfigError(f"predict.tile_fit={how!r} is not one of {list(TILE_FITS)}")


def check_tile_fit(tile_fit: str) -> None:
    if tile_fit not in TILE_FITS:
        raise ConfigError(f"predict.tile_fit={tile_fit!r} is not one of {list(TILE_FITS)}")


def mean_colour(backbone: Backbone) -> tuple[int, int, int]:
    """The backbone's normalisation mean as an RGB colour (pads normalise to zero)."""
    r, g, b = (round(255 * m) for m in backbone.input_spec.mean)
    return r, g, b


def cut_tiles(
    path: Path,
    strategy: Strategy,
    size: int,
    tile_fit: str = "center_crop",
    fill: tuple[int, int, int] = (0, 0, 0),
) -> QuadratTiles:
    """The strategy's boxes of one quadrat, fitted to size x size. An unreadable quadrat, or
    one too small for the strategy's boxes, comes back without tiles and with the reason."""
    plot_id = plot_id_of(path)
    try:
        img = decode_image(path)
    except CorruptImageError as err:
        return QuadratTiles(plot_id, None, str(err))
    try:
        boxes = strategy.boxes(*img.size)
    except ValueError as err:  # e.g. fewer pixels than grid cells
        return QuadratTiles(plot_id, None, f"{path}: {err}")
    tiles = [to_uint8_array(fit_tile(img.crop(box), size, tile_fit, fill)) for box in boxes]
    return QuadratTiles(plot_id, np.stack(tiles))


def tile_probabilities(predictor: Predictor, tiles: np.ndarray, compute: Compute) -> np.ndarray:
    """(N, S, S, 3) uint8 tiles -> (N, classes) probabilities: the uint8 tiles go to the
    device, are normalised there and forwarded under the run's precision."""
    uint8 = torch.from_numpy(np.ascontiguousarray(tiles)).to(compute.device)
    with compute.autocast():
        probs = predictor.probabilities(preprocess_batch(uint8, predictor.backbone.input_spec))
    return probs.float().cpu().numpy()


@dataclass
class PredictionResult:
    predictions: dict[str, list[int]]
    tile_count: int
    skipped: list[str]  # why each skipped quadrat (unreadable, too small) got no prediction
    tile_fit: str = "center_crop"

    def report(self) -> dict[str, Any]:
        return {
            "plots": len(self.predictions),
            "tiles": self.tile_count,
            "tile_fit": self.tile_fit,
            "skipped_images": len(self.skipped),
            "skipped_examples": self.skipped[:100],
        }


def predict_quadrats(
    image_paths: Sequence[Path],
    strategy: Strategy,
    predictor: Predictor,
    batch_size: int = 64,
    quadrats_per_batch: int = 4,
    tile_fit: str = "center_crop",
    compute: Compute = CPU,
) -> PredictionResult:
    """Plot id -> predicted species ids for every quadrat. A corrupt quadrat, or one too small
    for the strategy's grid, is reported (with its file) and gets an empty prediction (so it
    scores 0 rather than vanishing from the submission). The predictor's backbone is on
    `compute.device`; its forwards run under `compute`'s precision."""
    check_tile_fit(tile_fit)
    size = predictor.backbone.input_spec.size
    fill = mean_colour(predictor.backbone)

    def groups() -> Iterator[list[QuadratTiles]]:
        for group in chunks(list(image_paths), quadrats_per_batch):
            yield [cut_tiles(p, strategy, size, tile_fit, fill) for p in group]

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
                    tile_probabilities(predictor, batch, compute)
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
    return PredictionResult(predictions, tile_count, skipped, tile_fit)
