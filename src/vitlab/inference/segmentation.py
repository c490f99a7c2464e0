"""Zero-shot semantic segmentation with GroupViT, as the reference evaluates it.

Per crop: the soft assignment maps of both stages are chained (A1 @ A2, patch -> final group),
resized bilinearly to the crop and made one-hot by argmax over groups; each group gets class
scores softmax(scale * cos(group, class text)), restricted to the top-k classes of the pooled
image embedding (softmax over the kept classes, times the unmasked softmax); a pixel takes its
group's scores; background where the best score < min(bg_threshold, the best group score).
Crops of a sliding window are averaged, resized to the image, argmax.

`evaluate_zero_shot` is THE evaluation loop over a dataset (mIoU, per-class IoU): both
`infer.py pipeline=segmentation` and `python -m vitlab.analysis compare` run it; what a caller
does with each image besides scoring it (overlays, prediction PNGs) goes in its `on_sample` hook.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vitlab.data.loading import prefetch
from vitlab.data.segmentation import (
    DEFAULT_BG_THRESHOLD,
    SegmentationDatasetSpec,
    SegmentationSample,
    background_threshold,
    load_image,
    read_label_map,
)
from vitlab.errors import DatasetFormatError
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator
from vitlab.models.groupvit.model import GroupViT, patch_group_attention
from vitlab.models.groupvit.text import EVAL_TEMPLATE, ClipTokenizer
from vitlab.progress import progress

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegmentationSettings:
    short_side: int = 448  # test images are resized so their short side is this
    crop: int = 448  # sliding-window crop
    stride: int = 224
    bg_threshold: float = DEFAULT_BG_THRESHOLD  # build with `for_dataset`: the dataset's
    top_k: int = 5  # classes kept per crop by the pooled image embedding (0 = all)
    has_background: bool = True  # label 0 is background (the background rule applies)
    crops_per_batch: int = 4

    def __post_init__(self) -> None:
        if min(self.short_side, self.crop, self.stride, self.crops_per_batch) <= 0:
            raise ValueError("short_side, crop, stride and crops_per_batch must be positive")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 keeps every class)")

    @classmethod
    def for_dataset(
        cls,
        spec: SegmentationDatasetSpec,
        *,
        short_side: int,
        crop: int,
        stride: int,
        top_k: int,
        crops_per_batch: int,
        bg_threshold: float | None = None,
    ) -> SegmentationSettings:
        """The settings of a run on `spec`'s dataset (the pipeline's and the analysis CLI's):
        its background rule, and its `bg_threshold` unless `bg_threshold` overrides it."""
        return cls(
            short_side=int(short_side),
            crop=int(crop),
            stride=int(stride),
            bg_threshold=background_threshold(spec, bg_threshold),
            top_k=int(top_k),
            has_background=spec.has_background,
            crops_per_batch=int(crops_per_batch),
        )


# ----------------------------------------------------------------------------- text side


@torch.no_grad()
def class_text_embeddings(
    model: GroupViT,
    class_names: Sequence[str],
    templates: Sequence[str] = (EVAL_TEMPLATE,),
    tokenizer: ClipTokenizer | None = None,
) -> Tensor:
    """[C, P] L2-normalised class embeddings, averaged over prompt templates."""
    tokenizer = tokenizer or ClipTokenizer()
    device = next(model.parameters()).device
    per_template = []
    for template in templates:
        tokens = tokenizer([template.format(name) for name in class_names])
        tokens = tokens[:, : model.spec.context_length].to(device)
        per_template.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)


# ----------------------------------------------------------------------------- pure math


def group_pixel_maps(soft_maps: Sequence[Tensor], grid: tuple[int, int], size: tuple[int, int]):
    """Patch -> final-group attention (A1 @ A2) as [B, G, H, W], resized bilinearly."""
    attention = patch_group_attention(soft_maps)  # [B, N, G]
    b, _, g = attention.shape
    maps = attention.transpose(1, 2).reshape(b, g, grid[0], grid[1])
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def one_hot_groups(maps: Tensor) -> Tensor:
    """[B, G, H, W] -> one-hot over groups (each pixel belongs to its argmax group)."""
    return F.one_hot(maps.argmax(dim=1), maps.shape[1]).permute(0, 3, 1, 2).to(maps.dtype)


def group_class_scores(
    groups: Tensor, pooled: Tensor, text: Tensor, scale: Tensor | float, top_k: int
) -> Tensor:
    """[B, G, C] class scores of each group; groups/pooled/text are L2-normalised.

    Only the `top_k` classes of the pooled image embedding stay candidates: softmax over them,
    multiplied by the softmax over all classes (the reference's rule)."""
    logits = scale * groups @ text.t()
    unmasked = logits.softmax(dim=-1)
    k = text.shape[0] if top_k <= 0 else min(top_k, text.shape[0])
    image_probs = (scale * pooled @ text.t()).softmax(dim=-1)  # [B, C]
    keep = torch.zeros_like(image_probs, dtype=torch.bool)
    keep.scatter_(1, image_probs.topk(k, dim=-1).indices, True)
    masked = logits.masked_fill(~keep[:, None, :], float("-inf")).softmax(dim=-1)
    return masked * unmasked


def pixel_class_scores(onehot: Tensor, scores: Tensor) -> Tensor:
    """[B, G, H, W] one-hot groups x [B, G, C] group scores -> [B, C, H, W]."""
    return torch.einsum("bghw,bgc->bchw", onehot, scores)


def add_background(pixel_scores: Tensor, scores: Tensor, bg_threshold: float) -> Tensor:
    """Prepend a background channel: 1 where the best foreground score is below
    min(bg_threshold, best group score of the crop), else 0. [B, C, H, W] -> [B, C+1, H, W]."""
    best_group = scores.flatten(1).max(dim=1).values  # [B]
    threshold = torch.clamp(best_group, max=bg_threshold)[:, None, None]
    background = (pixel_scores.max(dim=1).values < threshold).to(pixel_scores.dtype)
    return torch.cat([background[:, None], pixel_scores], dim=1)


def crop_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg sliding-window boxes (y1, y2, x1, x2): the last row/column is shifted to end at
    the border; an image smaller than the crop is one box, the whole image."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def sliding_window_average(
    image: Tensor, crop: int, stride: int, crop_logits, crops_per_batch: int = 4
) -> Tensor:
    """Average `crop_logits([N, 3, h, w]) -> [N, K, h, w]` over overlapping crops of a
    [3, H, W] image -> [K, H, W]. Crops of equal size are batched."""
    _, height, width = image.shape
    boxes = crop_boxes(height, width, crop, stride)
    total, count = None, torch.zeros(1, height, width, device=image.device)
    for start in range(0, len(boxes), crops_per_batch):
        chunk = boxes[start : start + crops_per_batch]
        crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = crop_logits(crops)
        if total is None:
            total = torch.zeros(logits.shape[1], height, width, device=image.device)
        for (y1, y2, x1, x2), crop_out in zip(chunk, logits):
            total[:, y1:y2, x1:x2] += crop_out
            count[:, y1:y2, x1:x2] += 1
    return total / count


# ----------------------------------------------------------------------------- model side


@torch.no_grad()
def crop_class_logits(
    model: GroupViT, crops: Tensor, text: Tensor, settings: SegmentationSettings
) -> Tensor:
    """[N, 3, h, w] normalised crops -> [N, C(+1 background), h, w] per-pixel scores."""
    encoding = model.encode_image(crops)
    maps = group_pixel_maps(encoding.soft_maps, encoding.grid, crops.shape[-2:])
    groups = F.normalize(model.project_segments(encoding).float(), dim=-1)
    pooled = F.normalize(model.project_image(encoding).float(), dim=-1)
    scores = group_class_scores(groups, pooled, text, model.scale(), settings.top_k)
    pixels = pixel_class_scores(one_hot_groups(maps.float()), scores)
    if settings.has_background:
        return add_background(pixels, scores, settings.bg_threshold)
    return pixels


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    return image.resize(size, Image.BILINEAR)


def to_normalised_tensor(image: Image.Image, device: torch.device | str = "cpu") -> Tensor:
    """RGB image -> normalised [3, H, W] float tensor on `device`: the uint8 pixels cross to
    the device (a quarter of the bytes of float32) and are normalised there."""
    uint8 = torch.from_numpy(np.array(image.convert("RGB"))).to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=uint8.device)
    std = torch.tensor(IMAGENET_STD, device=uint8.device)
    return ((uint8.float() / 255.0 - mean) / std).permute(2, 0, 1).contiguous()


@dataclass
class _Canvas:
    """One image's sliding-window sums while its crops are in flight."""

    key: Any
    size: tuple[int, int]  # (H0, W0) of the original image
    pending: int  # crops not yet added
    total: Tensor | None = None  # [K, H, W] at the resized size
    count: Tensor | None = None  # [1, H, W]


def segment_batched(
    model: GroupViT,
    images: Iterable[tuple[Any, Image.Image]],
    text: Tensor,
    settings: SegmentationSettings,
) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, label map [H0, W0]) for each (key, image), in order. The crops of consecutive
    images share batches of `crops_per_batch` (crops of one shape per batch), their scores
    are summed on the model's device, and the host waits once per image (its label map), never
    per crop."""
    device = next(model.parameters()).device
    crops: list[tuple[_Canvas, tuple[int, int, int, int], Tensor]] = []
    canvases: deque[_Canvas] = deque()

    def flush() -> None:
        logits = crop_class_logits(model, torch.stack([c for _, _, c in crops]), text, settings)
        for (canvas, (y1, y2, x1, x2), _), crop_out in zip(crops, logits):
            if canvas.total is None:
                canvas.total = torch.zeros(
                    (logits.shape[1], *canvas.count.shape[1:]), device=device
                )
            canvas.total[:, y1:y2, x1:x2] += crop_out
            canvas.count[:, y1:y2, x1:x2] += 1
            canvas.pending -= 1
        crops.clear()

    def finished() -> Iterator[tuple[Any, np.ndarray]]:
        while canvases and canvases[0].pending == 0:
            canvas = canvases.popleft()
            averaged = canvas.total / canvas.count
            scores = F.interpolate(
                averaged[None], canvas.size, mode="bilinear", align_corners=False
            )
            yield canvas.key, scores[0].argmax(dim=0).cpu().numpy()

    for key, image in images:
        resized = to_normalised_tensor(resize_short_side(image, settings.short_side), device)
        _, height, width = resized.shape
        boxes = crop_boxes(height, width, settings.crop, settings.stride)
        canvas = _Canvas(key, (image.size[1], image.size[0]), len(boxes))
        canvas.count = torch.zeros(1, height, width, device=device)
        canvases.append(canvas)
        for box in boxes:
            y1, y2, x1, x2 = box
            crop = resized[:, y1:y2, x1:x2]
            if crops and crops[0][2].shape != crop.shape:
                flush()
            crops.append((canvas, box, crop))
            if len(crops) == settings.crops_per_batch:
                flush()
        yield from finished()
    if crops:
        flush()
    yield from finished()


@torch.no_grad()
def segment_image(
    model: GroupViT, image: Image.Image, text: Tensor, settings: SegmentationSettings
) -> np.ndarray:
    """Label map [H0, W0] (0 = background when the dataset has one)."""
    return next(segment_batched(model, [(None, image)], text, settings))[1]


# ----------------------------------------------------------------------------- dataset loop

SampleHook = Callable[[SegmentationSample, Image.Image, np.ndarray, np.ndarray], None]
"""`on_sample(sample, image, prediction, truth)` after an image is scored: RGB image, [H, W]
prediction in the metric's label space, RAW [H, W] label map (reduce_zero_label not applied)."""

MAX_SKIPPED_LISTED = 50  # unreadable images named in a summary (all are counted)


def labelled_images(
    samples: Sequence[SegmentationSample],
    spec: SegmentationDatasetSpec,
    desc: str,
    skipped: list[str],
    reduce: bool = True,
) -> Iterator[tuple[SegmentationSample, Image.Image, np.ndarray]]:
    """(sample, RGB image, label map) with a progress bar; undecodable images are skipped and
    named in `skipped`. `reduce=True` gives metric class indices (reduce_zero_label applied).
    A label map whose size differs from its image is a DatasetFormatError naming the file."""
    with progress(len(samples), desc) as bar:
        for sample in samples:
            try:
                image = load_image(sample.image_path)
            except DatasetFormatError as err:
                skipped.append(f"{sample.sample_id}: {err}")
                bar.update(1)
                continue
            truth = read_label_map(sample.label_path, spec, reduce=reduce)
            if truth.shape != (image.size[1], image.size[0]):
                raise DatasetFormatError(
                    f"{sample.label_path}: label map {truth.shape[::-1]} (WxH) does not match "
                    f"image {image.size}"
                )
            yield sample, image, truth
            bar.update(1)


@torch.no_grad()
def evaluate_zero_shot(
    model: GroupViT,
    spec: SegmentationDatasetSpec,
    samples: Sequence[SegmentationSample],
    text: Tensor,
    settings: SegmentationSettings,
    *,
    on_sample: SampleHook | None = None,
    desc: str | None = None,
) -> dict[str, Any]:
    """Zero-shot segmentation of `samples` (sliding window, background rule) scored by a
    streaming confusion matrix (mmseg convention, the dataset's reduce_zero_label).

    `text`: [C, P] embeddings of `spec.prompt_names` (`class_text_embeddings`). Undecodable
    images are skipped and counted; when none can be read: DatasetFormatError. Returns the
    metric's summary (miou, iou, pixel_accuracy, per_class) with dataset, n_images,
    skipped_images, skipped (the first MAX_SKIPPED_LISTED), images_per_second and, for a
    dataset with a background, all_background (miou and per-class IoU of predicting background
    everywhere: the trivial reference a model must beat)."""
    accumulator = ConfusionMatrixAccumulator(**spec.metric_kwargs())
    # the trivial reference: background predicted everywhere (datasets with a background)
    all_background = ConfusionMatrixAccumulator(**spec.metric_kwargs())
    skipped: list[str] = []
    start = time.perf_counter()
    images = prefetch(
        labelled_images(samples, spec, desc or f"segment {spec.name}", skipped, reduce=False),
        depth=8,
    )
    keyed = (((sample, image, truth), image) for sample, image, truth in images)
    for (sample, image, truth), prediction in segment_batched(model, keyed, text, settings):
        accumulator.update(prediction, truth)
        if spec.has_background:
            all_background.update(np.zeros_like(prediction), truth)
        if on_sample is not None:
            on_sample(sample, image, prediction, truth)
    seconds = time.perf_counter() - start
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), skipped[:5])
    if accumulator.n_updates == 0:
        raise DatasetFormatError(
            f"{spec.name}: none of the {len(samples)} image(s) could be read"
            + (f" (e.g. {skipped[0]})" if skipped else "")
        )
    result = accumulator.summary(list(spec.class_names))
    result.update(
        dataset=spec.name,
        n_images=accumulator.n_updates,
        skipped_images=len(skipped),
        skipped=skipped[:MAX_SKIPPED_LISTED],
        images_per_second=round(accumulator.n_updates / seconds, 3) if seconds > 0 else None,
    )
    if spec.has_background:
        trivial = all_background.summary(list(spec.class_names))
        result["all_background"] = {
            "miou": trivial["miou"],
            "per_class": {k: v["iou"] for k, v in trivial["per_class"].items()},
        }
    return result
