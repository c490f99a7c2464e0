"""The thesis's GroupViT analyses: what grouping alone, and alignment alone, are worth.

Every analysis looks at an image in ONE crop: the whole image resized so its short side is
`short_side` (the model interpolates its position embedding to any grid), unlike the zero-shot
evaluation's sliding window. The patch grid is floor(side / patch); the group maps are resized
bilinearly (align_corners False) from that grid straight to the label map's size, so a strip
narrower than one patch at the right/bottom border is stretched over (as a crop is in the
reference). `compare` on checkpoints runs the real evaluation (sliding window) instead.

Definitions (labels are the metric's class indices: `read_label_map(..., reduce=True)`):

- Group maps: soft A1 @ A2 (patch -> final group) resized to the label map; the hard group of a
  pixel is the argmax over groups (as the zero-shot evaluation's one-hot map).
- (a) kNN, visual grouping alone. A segment's feature is its projected final-stage token,
  L2-normalised; its soft label is the histogram of ground-truth classes over its pixels (ignore
  label left out), normalised; segments without a labelled pixel are not banked. The bank keeps
  at most `cap` segments per class (class = argmax of the soft label), a seeded uniform sample
  (reservoir) of that class's segments. A query segment's class distribution is the mean soft
  label of its k most cosine-similar bank segments; its argmax is painted on its pixels; mIoU
  over the dataset (mmseg convention, `ConfusionMatrixAccumulator`).
- (b) Alignment alone. Pixel-class affinity = one-hot groups x `group_class_scores` (the
  zero-shot scores: softmax(scale * cos) times the top-k-masked softmax; top_k 0 = all
  classes). For each ground-truth region (all pixels of one class in the image) the affinities
  are averaged and the whole region takes the argmax. Two variants:
    * without background: ground-truth background pixels are ignored and only the foreground
      classes compete (mIoU over the foreground classes);
    * with background: the background region is predicted too, its score being the
      evaluation's own background channel, averaged like any class: `rule` (default) = 1 on
      pixels whose best foreground score is < min(bg_threshold, best group score of the image),
      else 0 (`inference.segmentation.add_background`), so a region becomes background when the
      fraction of its pixels the rule calls background beats every class's mean affinity;
      `complement` = 1 - best foreground score of the pixel.
  For a dataset without a background class (ADE20K) only the "without background" variant
  exists (all classes compete) and "with_background" is null.
- (c) Entropy, per patch: over groups = entropy of the patch's soft A1 @ A2 distribution
  (GE's integrand); over labels = entropy of T_aff = Attn . softmax(scale * segments . text^T)
  over the dataset's prompt classes (LE's integrand, all classes, no top-k). Natural log; the
  maxima are log G and log K. Means are over patches of an image, then over images.
- (d) Compare: difference = IoU(B) - IoU(A) per class (None when either is undefined). On
  checkpoints, each is scored by `vitlab.inference.segmentation.evaluate_zero_shot`, the very
  loop of `infer.py pipeline=segmentation`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vitlab.data.segmentation import (
    DEFAULT_BG_THRESHOLD,
    SegmentationDatasetSpec,
    SegmentationSample,
    background_threshold,
)
from vitlab.inference.segmentation import (
    add_background,
    group_class_scores,
    group_pixel_maps,
    labelled_images,
    resize_short_side,
    to_normalised_tensor,
)
from vitlab.losses.entropy import entropy
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator
from vitlab.models.groupvit.model import GroupViT, patch_group_attention

BACKGROUND_SCORES = ("rule", "complement")


class AnalysisError(ValueError):
    """Bad input to an analysis (missing file, malformed summary, empty bank, ...)."""


# ----------------------------------------------------------------------------- model side


@dataclass
class ImageGrouping:
    """One image through GroupViT in a single crop (everything on the CPU, float32)."""

    pixels: Tensor  # [3, h, w] the normalised resized input
    group_maps: Tensor  # [G, H, W] soft A1 @ A2 resized to the label map size
    patch_attention: Tensor  # [N, G] soft A1 @ A2 per patch
    grid: tuple[int, int]  # patch grid (rows, cols) of the input
    segments: Tensor  # [G, P] projected final segment tokens, L2-normalised
    pooled: Tensor  # [P] projected image embedding, L2-normalised
    scale: float  # exp(logit_scale), clamped as the model's spec says

    @property
    def group_index(self) -> Tensor:
        """[H, W] hard group of each pixel (argmax over groups)."""
        return self.group_maps.argmax(dim=0)


@torch.no_grad()
def encode_grouping(
    model: GroupViT, image: Image.Image, short_side: int, size: tuple[int, int] | None = None
) -> ImageGrouping:
    """Run `image` (resized to `short_side`) through the image side of `model`; group maps at
    `size` (H, W), the original image size by default."""
    resized = to_normalised_tensor(resize_short_side(image, short_side))
    device = next(model.parameters()).device
    encoding = model.encode_image(resized[None].to(device))
    size = size or (image.size[1], image.size[0])
    maps = group_pixel_maps(encoding.soft_maps, encoding.grid, size)[0]
    attention = patch_group_attention(encoding.soft_maps)[0]
    segments = F.normalize(model.project_segments(encoding).float(), dim=-1)[0]
    pooled = F.normalize(model.project_image(encoding).float(), dim=-1)[0]
    return ImageGrouping(
        pixels=resized,
        group_maps=maps.float().cpu(),
        patch_attention=attention.float().cpu(),
        grid=tuple(encoding.grid),
        segments=segments.cpu(),
        pooled=pooled.cpu(),
        scale=float(model.scale()),
    )


# ----------------------------------------------------------------------------- data side


def _as_long(x: Any) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).long()


def _metric_block(accumulator: ConfusionMatrixAccumulator, names: Sequence[str]) -> dict:
    scores = accumulator.summary(list(names))
    return {k: scores[k] for k in ("miou", "iou", "pixel_accuracy", "per_class")}


# ----------------------------------------------------------------------------- (a) kNN


def segment_soft_labels(
    group_index: Any, truth: Any, n_groups: int, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Soft label of each segment: ([G, C] class histogram of its labelled pixels, normalised
    (rows of unlabelled segments are 0), [G] labelled pixel counts)."""
    groups, labels = _as_long(group_index).reshape(-1), _as_long(truth).reshape(-1)
    if groups.shape != labels.shape:
        raise ValueError(
            f"group map {tuple(_as_long(group_index).shape)} and label map "
            f"{tuple(_as_long(truth).shape)} differ in size"
        )
    keep = labels != ignore_index
    groups, labels = groups[keep], labels[keep]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"label values outside [0, {num_classes}) and not {ignore_index}")
    counts = torch.bincount(groups * num_classes + labels, minlength=n_groups * num_classes)
    counts = counts.reshape(n_groups, num_classes).float()
    pixels = counts.sum(dim=1)
    return counts / pixels.clamp_min(1.0)[:, None], pixels.long()


class FeatureBank:
    """Segment features with soft labels, at most `cap` per class (class = argmax of the soft
    label), each class's kept set a uniform sample of what was added (seeded reservoir)."""

    def __init__(self, num_classes: int, cap: int = 1000, seed: int = 0) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.num_classes = num_classes
        self.cap = cap
        self._rng = np.random.default_rng(seed)
        self._kept: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(num_classes)]
        self.seen = np.zeros(num_classes, dtype=np.int64)

    def add(self, features: Tensor, soft_labels: Tensor) -> None:
        """Offer [M, P] features with [M, C] soft labels (rows summing to 1)."""
        if features.shape[0] != soft_labels.shape[0] or soft_labels.shape[1] != self.num_classes:
            raise ValueError(
                f"features {tuple(features.shape)} / soft labels {tuple(soft_labels.shape)} do "
                f"not match a bank of {self.num_classes} classes"
            )
        for feature, label in zip(features.float(), soft_labels.float()):
            c = int(label.argmax())
            self.seen[c] += 1
            kept = self._kept[c]
            if len(kept) < self.cap:
                kept.append((feature, label))
            else:
                j = int(self._rng.integers(self.seen[c]))
                if j < self.cap:
                    kept[j] = (feature, label)

    def __len__(self) -> int:
        return sum(len(k) for k in self._kept)

    def per_class(self) -> list[int]:
        return [len(k) for k in self._kept]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """([N, P] features, [N, C] soft labels), grouped by class."""
        items = [item for kept in self._kept for item in kept]
        if not items:
            raise AnalysisError("the kNN feature bank is empty (no labelled segment was banked)")
        return torch.stack([f for f, _ in items]), torch.stack([s for _, s in items])


def knn_class_distribution(
    query: Tensor, bank_features: Tensor, bank_labels: Tensor, k: int = 10
) -> Tensor:
    """[M, C] mean soft label of each query's k most cosine-similar bank entries."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    similarity = F.normalize(query.float(), dim=-1) @ F.normalize(bank_features.float(), dim=-1).T
    nearest = similarity.topk(min(k, bank_features.shape[0]), dim=-1).indices  # [M, k]
    return bank_labels[nearest].mean(dim=1)


def paint_segments(group_index: Any, segment_classes: Any) -> np.ndarray:
    """[H, W] label map: each pixel takes its group's class."""
    return _as_long(segment_classes)[_as_long(group_index)].numpy()


def bank_image(
    bank: FeatureBank, features: Tensor, group_index: Any, truth: Any, ignore_index: int = 255
) -> None:
    """Offer one image's [G, P] segment features with their soft labels (segments without a
    labelled pixel are left out)."""
    soft, pixels = segment_soft_labels(
        group_index, truth, features.shape[0], bank.num_classes, ignore_index
    )
    labelled = pixels > 0
    bank.add(features[labelled], soft[labelled])


def knn_predict(
    features: Tensor, group_index: Any, bank_features: Tensor, bank_labels: Tensor, k: int
) -> np.ndarray:
    """Label map predicted by kNN for one image's segments."""
    classes = knn_class_distribution(features, bank_features, bank_labels, k).argmax(dim=-1)
    return paint_segments(group_index, classes)


def run_knn(
    model: GroupViT,
    spec: SegmentationDatasetSpec,
    bank_samples: Sequence[SegmentationSample],
    query_samples: Sequence[SegmentationSample],
    *,
    k: int = 10,
    cap: int = 1000,
    short_side: int = 448,
    seed: int = 0,
) -> dict[str, Any]:
    start = time.perf_counter()
    bank = FeatureBank(spec.num_classes, cap, seed)
    skipped: list[str] = []
    n_bank_images = 0
    for _, image, truth in labelled_images(bank_samples, spec, "knn bank", skipped):
        grouping = encode_grouping(model, image, short_side, truth.shape)
        bank_image(bank, grouping.segments, grouping.group_index, truth, spec.ignore_index)
        n_bank_images += 1
    bank_features, bank_labels = bank.tensors()
    accumulator = ConfusionMatrixAccumulator(spec.num_classes, spec.ignore_index)
    for _, image, truth in labelled_images(query_samples, spec, "knn query", skipped):
        grouping = encode_grouping(model, image, short_side, truth.shape)
        pred = knn_predict(grouping.segments, grouping.group_index, bank_features, bank_labels, k)
        accumulator.update(pred, truth)
    if accumulator.n_updates == 0:
        raise AnalysisError("no query image could be read")
    result = _metric_block(accumulator, spec.class_names)
    result.update(
        k=k,
        cap=cap,
        n_bank=len(bank),
        n_bank_per_class=dict(zip(spec.class_names, bank.per_class())),
        n_bank_images=n_bank_images,
        n_images=accumulator.n_updates,
        skipped=skipped,
        seconds=round(time.perf_counter() - start, 2),
    )
    return result


# ----------------------------------------------------------------------------- (b) alignment


def region_mean_scores(
    pixel_scores: Tensor, truth: Any, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """[T, K] mean of [K, H, W] `pixel_scores` over each ground-truth region (the pixels of
    truth class t, t < num_classes); rows of classes absent from `truth` are nan."""
    labels = _as_long(truth).reshape(-1)
    scores = pixel_scores.reshape(pixel_scores.shape[0], -1).float()
    keep = labels != ignore_index
    labels, scores = labels[keep], scores[:, keep]
    sums = torch.zeros(num_classes, scores.shape[0]).index_add_(0, labels, scores.T)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return sums / counts[:, None].where(counts[:, None] > 0, torch.tensor(float("nan")))


def group_region_mean_scores(
    group_index: Any, group_scores: Tensor, truth: Any, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """`region_mean_scores` of the pixel scores one-hot groups x [G, K] `group_scores`, from
    the region x group pixel histogram (never builds the [K, H, W] map)."""
    n_groups = group_scores.shape[0]
    groups, labels = _as_long(group_index).reshape(-1), _as_long(truth).reshape(-1)
    keep = labels != ignore_index
    histogram = torch.bincount(
        labels[keep] * n_groups + groups[keep], minlength=num_classes * n_groups
    ).reshape(num_classes, n_groups)
    counts = histogram.sum(dim=1, keepdim=True).double()
    means = histogram.double() @ group_scores.double()
    return (means / counts.where(counts > 0, torch.tensor(float("nan"), dtype=torch.float64))).to(
        group_scores.dtype
    )


def paint_regions(truth: Any, region_scores: Tensor, ignore_index: int = 255) -> np.ndarray:
    """[H, W] prediction: every pixel of truth class t takes argmax of `region_scores[t]`;
    ignored pixels get 0 (the metric does not count them)."""
    labels = _as_long(truth)
    choice = torch.nan_to_num(region_scores, nan=-1.0).argmax(dim=-1)  # [T]
    ignored = labels == ignore_index
    return torch.where(ignored, 0, choice[labels.clamp(0, len(choice) - 1)]).numpy()


def background_group_scores(
    group_scores: Tensor, mode: str = "rule", bg_threshold: float = DEFAULT_BG_THRESHOLD
) -> Tensor:
    """[G] background score of each group from its [G, C_fg] foreground scores (see module
    docstring): `rule` is the evaluation's background channel, `complement` 1 - best score."""
    if mode == "rule":
        as_pixels = group_scores.T[None, :, None, :]  # the G groups as a 1 x G "image"
        return add_background(as_pixels, group_scores[None], bg_threshold)[0, 0, 0]
    if mode == "complement":
        return 1.0 - group_scores.max(dim=-1).values
    raise ValueError(f"background score {mode!r} is not one of {BACKGROUND_SCORES}")


def foreground_truth(truth: np.ndarray, ignore_index: int) -> np.ndarray:
    """Label 0 (background) -> ignore, k -> k-1: the foreground-only label map."""
    out = truth.astype(np.int64) - 1
    out[(truth == 0) | (truth == ignore_index)] = ignore_index
    return out


def run_alignment(
    model: GroupViT,
    spec: SegmentationDatasetSpec,
    samples: Sequence[SegmentationSample],
    text: Tensor,
    *,
    short_side: int = 448,
    top_k: int = 0,
    background: str = "rule",
    bg_threshold: float | None = None,
) -> dict[str, Any]:
    """`text` [C_fg, P]: L2-normalised embeddings of `spec.prompt_names`."""
    if background not in BACKGROUND_SCORES:
        raise ValueError(f"background score {background!r} is not one of {BACKGROUND_SCORES}")
    start = time.perf_counter()
    threshold = background_threshold(spec, bg_threshold)
    ignore = spec.ignore_index
    fg_names = spec.prompt_names
    without = ConfusionMatrixAccumulator(len(fg_names), ignore)
    with_bg = ConfusionMatrixAccumulator(spec.num_classes, ignore) if spec.has_background else None
    skipped: list[str] = []
    text = text.float().cpu()
    for _, image, truth in labelled_images(samples, spec, "alignment", skipped):
        grouping = encode_grouping(model, image, short_side, truth.shape)
        scores = group_class_scores(
            grouping.segments[None], grouping.pooled[None], text, grouping.scale, top_k
        )[0]  # [G, C_fg]
        index = grouping.group_index
        fg_truth = foreground_truth(truth, ignore) if spec.has_background else truth
        regions = group_region_mean_scores(index, scores, fg_truth, len(fg_names), ignore)
        without.update(paint_regions(fg_truth, regions, ignore), fg_truth)
        if with_bg is not None:
            bg = background_group_scores(scores, background, threshold)
            full = torch.cat([bg[:, None], scores], dim=1)
            regions = group_region_mean_scores(index, full, truth, spec.num_classes, ignore)
            with_bg.update(paint_regions(truth, regions, ignore), truth)
    if without.n_updates == 0:
        raise AnalysisError("no image could be read")
    return {
        "with_background": None if with_bg is None else _metric_block(with_bg, spec.class_names),
        "without_background": _metric_block(without, fg_names),
        "top_k": top_k,
        "background_score": background if spec.has_background else None,
        "bg_threshold": threshold if spec.has_background and background == "rule" else None,
        "n_images": without.n_updates,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------- (c) entropy


def entropy_per_patch(
    patch_attention: Tensor, segments: Tensor, text: Tensor, scale: float | Tensor
) -> tuple[Tensor, Tensor]:
    """([N] entropy over groups of each patch's [N, G] soft attention, [N] entropy over the K
    labels of T_aff = attention . softmax(scale * segments [G, P] . text [K, P]^T))."""
    over_groups = entropy(patch_attention.float(), dim=-1)
    label_probs = (scale * segments.float() @ text.float().T).softmax(dim=-1)  # [G, K]
    over_labels = entropy(patch_attention.float() @ label_probs, dim=-1)
    return over_groups, over_labels


def run_entropy(
    model: GroupViT,
    spec: SegmentationDatasetSpec,
    samples: Sequence[SegmentationSample],
    text: Tensor,
    out_dir: Path,
    *,
    short_side: int = 448,
) -> dict[str, Any]:
    """Per image: a figure (image | entropy over groups | over labels) in `out_dir/entropy/`;
    returns the mean entropies (nats, and divided by their maxima log G / log K)."""
    from vitlab.reports import entropy_maps_png

    start = time.perf_counter()
    text = text.float().cpu()
    n_labels = text.shape[0]
    per_image, skipped, n_groups = [], [], None
    for sample, image, _ in labelled_images(samples, spec, "entropy", skipped):
        grouping = encode_grouping(model, image, short_side)
        n_groups = grouping.patch_attention.shape[1]
        ge, le = entropy_per_patch(
            grouping.patch_attention, grouping.segments, text, grouping.scale
        )
        name = sample.sample_id.replace("/", "_")
        figure = entropy_maps_png(
            grouping.pixels[None],
            ge[None],
            le[None],
            grouping.grid,
            out_dir / "entropy" / f"{name}.png",
            n_groups=n_groups,
            n_labels=n_labels,
            max_images=1,
        )
        per_image.append(
            {
                "sample_id": sample.sample_id,
                "group_entropy": float(ge.mean()),
                "label_entropy": float(le.mean()),
                "figure": str(figure),
            }
        )
    if not per_image:
        raise AnalysisError("no image could be read")
    max_groups, max_labels = math.log(max(n_groups, 2)), math.log(max(n_labels, 2))
    mean_ge = float(np.mean([r["group_entropy"] for r in per_image]))
    mean_le = float(np.mean([r["label_entropy"] for r in per_image]))
    return {
        "mean_group_entropy": mean_ge,
        "mean_label_entropy": mean_le,
        "max_group_entropy": max_groups,
        "max_label_entropy": max_labels,
        "mean_group_entropy_normalised": mean_ge / max_groups,
        "mean_label_entropy_normalised": mean_le / max_labels,
        "n_groups": n_groups,
        "n_labels": n_labels,
        "n_images": len(per_image),
        "per_image": per_image,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------- (d) compare


def read_summary(path: str | Path) -> dict[str, Any]:
    """An evaluation `summary.json` (keys miou, iou, per_class); AnalysisError naming the file
    when it is missing, not JSON or has neither per_class nor iou."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"summary not found: {path}")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: not a JSON summary ({err})") from err
    if not isinstance(summary, dict) or not (
        isinstance(summary.get("per_class"), dict) or isinstance(summary.get("iou"), list)
    ):
        raise AnalysisError(
            f"{path}: no 'per_class' or 'iou' entry (expected the summary.json written by "
            "`infer.py pipeline=segmentation`)"
        )
    return summary


def summary_class_iou(summary: dict[str, Any]) -> dict[str, float | None]:
    """class name -> IoU (None when undefined) of a summary, in its class order."""
    per_class = summary.get("per_class")
    if isinstance(per_class, dict):
        return {str(name): _finite(v.get("iou")) for name, v in per_class.items()}
    return {str(i): _finite(v) for i, v in enumerate(summary["iou"])}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def compare_summaries(
    a: dict[str, Any], b: dict[str, Any], label_a: str = "a", label_b: str = "b"
) -> dict[str, Any]:
    """Per-class IoU(B) - IoU(A), classes matched by name (A's order); both summaries must
    have the same classes."""
    iou_a, iou_b = summary_class_iou(a), summary_class_iou(b)
    if set(iou_a) != set(iou_b):
        only_a, only_b = sorted(set(iou_a) - set(iou_b)), sorted(set(iou_b) - set(iou_a))
        raise AnalysisError(
            f"the summaries have different classes ({label_a} only: {only_a[:5]}, "
            f"{label_b} only: {only_b[:5]}): were they evaluated on the same dataset?"
        )
    per_class = {
        name: {"iou_a": iou_a[name], "iou_b": iou_b[name], "difference": None} for name in iou_a
    }
    for row in per_class.values():
        row["difference"] = _difference(row["iou_a"], row["iou_b"])
    diffs = [r["difference"] for r in per_class.values() if r["difference"] is not None]
    miou_a, miou_b = _finite(a.get("miou")), _finite(b.get("miou"))
    return {
        "label_a": label_a,
        "label_b": label_b,
        "miou_a": miou_a,
        "miou_b": miou_b,
        "miou_difference": _difference(miou_a, miou_b),
        "mean_class_difference": float(np.mean(diffs)) if diffs else None,
        "n_improved": sum(d > 0 for d in diffs),
        "n_worse": sum(d < 0 for d in diffs),
        "n_unchanged": sum(d == 0 for d in diffs),
        "per_class": per_class,
    }
