"""Zero-shot segmentation behind `infer.py pipeline=segmentation`: config in, summary out.

checkpoint (ours, NVlabs `.pth`, transformers dir / hub id) + dataset (VOC, Context, COCO-Object,
ADE20K, synthetic VOC) -> class text embeddings -> `inference.segmentation.evaluate_zero_shot`
(per image: sliding-window zero-shot segmentation -> streaming confusion matrix) -> mIoU,
per-class IoU (CSV, bar chart, W&B table). This module adds only the files: its `SampleOutputs`
hook writes overlays of a fixed sample of images and optional prediction PNGs for
`python -m vitlab.metrics miou`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from vitlab.config import require_positive, require_set
from vitlab.data.segmentation import (
    SegmentationDatasetSpec,
    SegmentationSample,
    read_label_map,
    samples_from_config,
    spec_from_config,
)
from vitlab.data.voc import write_label_png
from vitlab.devices import resolve_device
from vitlab.errors import ConfigError
from vitlab.inference.segmentation import (
    SegmentationSettings,
    class_text_embeddings,
    evaluate_zero_shot,
)
from vitlab.models.groupvit.checkpoints import (
    CHECKPOINT_KINDS,
    CheckpointError,
    load_groupvit,
    resolve_checkpoint_source,
)
from vitlab.models.groupvit.model import (
    LOGIT_SCALE_MAX_DEFAULT,
    GroupViT,
    resolve_logit_scale_max,
)
from vitlab.pipelines.base import Pipeline, RunContext, RunSummary, numeric_metrics, prepare_run
from vitlab.tracking import MaskedImage, RunTracker

log = logging.getLogger(__name__)


def segmentation_settings(
    seg_cfg: DictConfig, spec: SegmentationDatasetSpec
) -> SegmentationSettings:
    try:
        return SegmentationSettings.for_dataset(
            spec,
            short_side=seg_cfg.short_side,
            crop=seg_cfg.crop,
            stride=seg_cfg.stride,
            top_k=seg_cfg.top_k,
            crops_per_batch=crops_per_batch(seg_cfg),
            bg_threshold=seg_cfg.get("bg_threshold"),
        )
    except ValueError as err:
        raise ConfigError(f"segmentation: {err}") from err


# `segmentation.crops_per_batch=auto`: what keeps a GPU busy at 448 px; small on the CPU
AUTO_CROPS_PER_BATCH = {"cuda": 32, "cpu": 4}


def crops_per_batch(seg_cfg: DictConfig) -> int:
    value = seg_cfg.crops_per_batch
    if value == "auto":
        return AUTO_CROPS_PER_BATCH.get(device_of(seg_cfg).type, 4)
    return int(value)


def load_segmentation_model(cfg: DictConfig) -> GroupViT:
    source = cfg.get("ckpt_path")
    if not source:
        raise ConfigError(
            "ckpt_path is required with pipeline=segmentation: a vitlab groupvit.pt / Lightning "
            ".ckpt, an NVlabs .pth, a transformers directory or a hub id (nvidia/groupvit-gcc-yfcc)"
        )
    kind = cfg.segmentation.checkpoint_kind
    if kind not in CHECKPOINT_KINDS:
        raise ConfigError(f"segmentation.checkpoint_kind={kind!r} is not one of {CHECKPOINT_KINDS}")
    overrides = {"logit_scale_max": logit_scale_max(cfg.segmentation)}
    try:
        trust = bool(cfg.segmentation.get("trust_checkpoint", False))
        source = resolve_checkpoint_source(source, kind)
        model = load_groupvit(
            source, kind, overrides, trust=trust, trust_key="segmentation.trust_checkpoint"
        ).eval()
    except CheckpointError as err:
        raise ConfigError(f"ckpt_path: {err}") from err
    return model.to(segmentation_device(cfg))


def logit_scale_max(seg_cfg: DictConfig) -> float | None:
    """`segmentation.logit_scale_max`: `default` (the model's), a number, or null (no clamp)."""
    clamp = seg_cfg.get("logit_scale_max", LOGIT_SCALE_MAX_DEFAULT)
    return resolve_logit_scale_max(clamp, "segmentation.logit_scale_max")


def segmentation_device(cfg: DictConfig) -> torch.device:
    return device_of(cfg.segmentation)


def device_of(seg_cfg: DictConfig) -> torch.device:
    """`segmentation.device`: follows `runtime.device` unless set (the older key)."""
    try:
        return resolve_device(seg_cfg.get("device", "auto"))
    except ValueError as err:
        raise ConfigError(f"segmentation.device: {err}") from err


def validate_segmentation(cfg: DictConfig) -> None:
    require_set(cfg, "dataset.root")
    require_positive(cfg, "segmentation.short_side", "segmentation.crop", "segmentation.stride")
    segmentation_settings(cfg.segmentation, spec_from_config(cfg.dataset))
    logit_scale_max(cfg.segmentation)
    segmentation_device(cfg)


def evaluate_segmentation(cfg: DictConfig) -> RunSummary:
    """GroupViT zero-shot segmentation of a dataset, scored by mIoU (infer.py
    pipeline=segmentation)."""
    prepare_run(cfg)
    validate_segmentation(cfg)
    spec = spec_from_config(cfg.dataset)
    settings = segmentation_settings(cfg.segmentation, spec)
    samples = samples_from_config(cfg.dataset)
    model = load_segmentation_model(cfg)
    with RunContext(
        cfg,
        "segmentation",
        checkpoint=str(cfg.ckpt_path),
        dataset=spec.name,
        settings=settings.__dict__,
    ) as run:
        run_dir, tracker, summary = run.run_dir, run.tracker, run.summary
        with run.stage("text"):
            # background gets no prompt: it is the channel the background rule fills
            text = class_text_embeddings(model, spec.prompt_names, list(cfg.segmentation.templates))
        with run.stage("segment"):
            outputs = SampleOutputs.from_config(cfg.segmentation, samples, spec, run_dir, tracker)
            scores = evaluate_zero_shot(model, spec, samples, text, settings, on_sample=outputs)
            outputs.log_overlays()
            if outputs.prediction_dir is not None:
                scores["predictions_dir"] = str(outputs.prediction_dir)
        summary.update(scores)
        summary["metrics"] = numeric_metrics(scores)
        _report(scores, spec, run_dir, tracker)
    log.info(
        "mIoU %.4f over %d images (%s)",
        summary.get("miou", float("nan")),
        summary.get("n_images", 0),
        spec.name,
    )
    return summary


class SampleOutputs:
    """The pipeline's per-sample hook of `evaluate_zero_shot`: overlays of the first `overlays`
    samples (`overlays/<id>.png`: image | prediction | truth; in W&B one `overlays` key of
    images with `prediction` and `ground_truth` masks and the class names, logged by
    `log_overlays` after the loop), and, with `prediction_dir`, every prediction as a label PNG
    (for `python -m vitlab.metrics miou`)."""

    def __init__(
        self,
        spec: SegmentationDatasetSpec,
        run_dir: Path,
        tracker: RunTracker,
        overlay_ids: set[str],
        prediction_dir: Path | None = None,
    ) -> None:
        self.spec, self.run_dir, self.tracker = spec, run_dir, tracker
        self.overlay_ids = overlay_ids
        self.prediction_dir = prediction_dir
        self.masked: list[MaskedImage] = []
        if prediction_dir is not None:
            prediction_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(
        cls, seg_cfg: DictConfig, samples: list, spec, run_dir: Path, tracker: RunTracker
    ) -> SampleOutputs:
        overlay_ids = {s.sample_id for s in samples[: int(seg_cfg.overlays)]}
        prediction_dir = run_dir / "predictions" if seg_cfg.save_predictions else None
        return cls(spec, run_dir, tracker, overlay_ids, prediction_dir)

    def __call__(
        self, sample: SegmentationSample, image, prediction: np.ndarray, truth: np.ndarray
    ) -> None:
        if self.prediction_dir is not None:
            _write_prediction(self.prediction_dir / f"{sample.sample_id}.png", prediction)
        if sample.sample_id in self.overlay_ids:  # truth in the predictions' label space
            shown = read_label_map(sample.label_path, self.spec, reduce=True)
            _overlay(image, prediction, shown, self.spec, self.run_dir, sample.sample_id)
            if self.tracker.wandb is not None:
                rgb = np.asarray(image.convert("RGB"))
                self.masked.append(MaskedImage(rgb, prediction, shown, sample.sample_id))

    def log_overlays(self) -> None:
        """The overlays as W&B mask images under one key, `overlays`."""
        labels = dict(enumerate(str(name) for name in self.spec.class_names))
        if 0 <= self.spec.ignore_index <= 255:
            labels[int(self.spec.ignore_index)] = "ignore"
        self.tracker.log_masks("overlays", self.masked, labels)
        self.masked = []


def _write_prediction(path: Path, labels: np.ndarray) -> None:
    write_label_png(path, labels.astype(np.uint8))  # atomic: never a truncated file


def _overlay(image, prediction, truth, spec, run_dir: Path, sample_id: str) -> None:
    from vitlab.reports import segmentation_overlay_png

    segmentation_overlay_png(
        image,
        prediction,
        truth,
        spec.class_names,
        spec.ignore_index,
        run_dir / "overlays" / f"{sample_id}.png",
    )


def _report(scores: dict[str, Any], spec, run_dir: Path, tracker: RunTracker) -> None:
    from vitlab.reports import per_class_iou_png

    rows = [[name, values["iou"], values["pixels"]] for name, values in scores["per_class"].items()]
    tracker.log_table("per_class_iou", ["class", "iou", "truth_pixels"], rows)
    if scores["miou"] is None:  # nothing scored (e.g. every image skipped)
        return
    iou = np.array([np.nan if v is None else v for v in scores["iou"]], dtype=float)
    chart = per_class_iou_png(
        spec.class_names,
        iou,
        run_dir / "per_class_iou.png",
        title=f"{spec.name}: mIoU {scores['miou']:.3f}",
    )
    tracker.log_image("per_class_iou", chart)
    tracker.log_metrics({"miou": float(scores["miou"]), "pixel_accuracy": scores["pixel_accuracy"]})


PIPELINE = Pipeline(
    "segmentation", infer=evaluate_segmentation, validate_infer=validate_segmentation
)
