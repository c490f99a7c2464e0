"""The GroupViT pipeline behind `train.py pipeline=groupvit`: config in, summary out.

(generate) -> read COCO captions (train/val) -> drop undecodable images (counted) -> label
extraction per caption (nouns / noun phrases / caption, K labels, templates, <PAD>) ->
fine-tune the selected components -> best checkpoint -> `groupvit.pt` for the segmentation
evaluation (`infer.py pipeline=segmentation`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vitlab.callbacks import trained_checkpoint
from vitlab.config import (
    require_choice,
    require_positive,
    require_set,
    to_container,
)
from vitlab.data.coco_captions import (
    CocoCaptionsDataset,
    coco_paths,
    collate_captions,
    eval_transform,
    read_coco_captions_with_report,
    train_transform,
    validate_images,
)
from vitlab.data.missing_images import FRACTION_KEY, check_max_missing_fraction
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec, generate_coco_captions
from vitlab.devices import require_accelerator
from vitlab.errors import ConfigError
from vitlab.models.groupvit.checkpoints import (
    CHECKPOINT_KINDS,
    CheckpointError,
    load_groupvit,
    save_groupvit,
)
from vitlab.models.groupvit.model import (
    LOGIT_SCALE_MAX_DEFAULT,
    GroupViT,
    GroupViTSpec,
    released_spec,
    resolve_logit_scale_max,
    split_runtime,
    tiny_spec,
)
from vitlab.models.groupvit.tagged_sample import SampleTrainedTagger
from vitlab.models.groupvit.text import KINDS, PAD_MODES, CaptionLabeler, nltk_pos_tagger
from vitlab.optim import check_optimization
from vitlab.pipelines.base import (
    Pipeline,
    RunContext,
    RunSummary,
    build_trainer,
    check_resume,
    ensure_generated,
    prepare_run,
)
from vitlab.safe_load import fit_resumable
from vitlab.tasks.groupvit import COMPONENTS, GroupViTFineTuner, LossWeights

log = logging.getLogger(__name__)
SPEC_PRESETS = {"released": released_spec, "tiny": tiny_spec}
TAGGERS = {"nltk": nltk_pos_tagger, "sample": SampleTrainedTagger}


CLAMP_KEY = "groupvit.model.overrides.logit_scale_max"


def model_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """`groupvit.model.overrides` with the clamp resolved (`resolve_logit_scale_max`): always
    given, so the config's clamp wins over one an older vitlab checkpoint saved."""
    overrides = dict(model_cfg.get("overrides") or {})
    clamp = overrides.get("logit_scale_max", LOGIT_SCALE_MAX_DEFAULT)
    overrides["logit_scale_max"] = resolve_logit_scale_max(clamp, CLAMP_KEY)
    return overrides


def build_groupvit(model_cfg: dict[str, Any]) -> GroupViT:
    """From `groupvit.model`: a checkpoint (`source`, any kind) or a random init of a preset spec,
    with `overrides` of runtime settings (logit-scale clamp, drop-path, Gumbel tau)."""
    overrides = model_overrides(model_cfg)
    source = model_cfg.get("source")
    if source:
        try:
            trust = bool(model_cfg.get("trust_checkpoint", False))
            return load_groupvit(
                source,
                model_cfg.get("kind", "auto"),
                overrides,
                trust=trust,
                trust_key="groupvit.model.trust_checkpoint",
            )
        except CheckpointError as err:
            raise ConfigError(f"groupvit.model.source: {err}") from err
    spec_cfg = dict(model_cfg.get("spec") or {})
    preset = spec_cfg.pop("preset", "released")
    if preset not in SPEC_PRESETS:
        raise ConfigError(f"groupvit.model.spec.preset={preset!r} not in {sorted(SPEC_PRESETS)}")
    values, runtime = split_runtime({**spec_cfg, **overrides})
    try:
        spec: GroupViTSpec = SPEC_PRESETS[preset](**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"groupvit.model.spec: {err}") from err
    return GroupViT(spec, **runtime)


def build_labeler(labels_cfg: dict[str, Any], context_length: int) -> CaptionLabeler:
    cfg = dict(labels_cfg)
    tagger = TAGGERS[cfg.pop("tagger", "nltk")]()
    return CaptionLabeler(tagger=tagger, context_length=context_length, **cfg)


def validate_groupvit(cfg: DictConfig) -> None:
    """Checks that need no work, naming the key and the allowed values."""
    if cfg.get("groupvit") is None:
        raise ConfigError("pipeline=groupvit needs a groupvit recipe: use experiment=<groupvit_*>")
    require_set(cfg, "dataset.root", "groupvit.model.source")
    require_choice(cfg, "groupvit.labels.kind", KINDS)
    check_resume(cfg)
    require_choice(cfg, "groupvit.labels.pad", PAD_MODES)
    require_choice(cfg, "groupvit.labels.tagger", TAGGERS)
    require_choice(cfg, "groupvit.model.kind", CHECKPOINT_KINDS)
    model_overrides(cfg.groupvit.model)
    require_positive(cfg, "groupvit.labels.k", "groupvit.batch_size", "groupvit.image_size")
    check_optimization(cfg)
    for name in cfg.groupvit.trainable:
        if name not in COMPONENTS:
            raise ConfigError(f"groupvit.trainable: {name!r} is not one of {sorted(COMPONENTS)}")
    try:
        LossWeights.from_config(to_container(cfg.groupvit.losses))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_max_missing_fraction(OmegaConf.select(cfg, FRACTION_KEY))
    require_accelerator(cfg.get("trainer"))


def ensure_coco_dataset(dataset: DictConfig) -> None:
    ensure_generated(dataset, generate_coco_captions, CocoCaptionsSyntheticSpec, "COCO captions")


def caption_datasets(
    cfg: DictConfig, labeler: CaptionLabeler, report: dict[str, Any]
) -> tuple[CocoCaptionsDataset, CocoCaptionsDataset]:
    gv = cfg.groupvit
    datasets = []
    for split, transform in (
        (
            cfg.dataset.train_split,
            train_transform(gv.image_size, tuple(gv.augment.scale), gv.augment.randaugment),
        ),
        (cfg.dataset.val_split, eval_transform(gv.image_size)),
    ):
        annotation_json, image_dir = coco_paths(cfg.dataset.root, split)
        records, read_report = read_coco_captions_with_report(
            annotation_json,
            image_dir,
            max_missing_fraction=check_max_missing_fraction(OmegaConf.select(cfg, FRACTION_KEY)),
            folder_key=f"dataset.root (split {split})",
        )
        records, corrupt = validate_images(records, workers=cfg.groupvit.num_workers or 2)
        report[split] = {
            "images": len(records),
            "captions": read_report.n_captions,
            "skipped_without_captions": read_report.skipped_no_captions,
            "blank_captions": read_report.empty_captions,
            "missing_images": read_report.missing_images,
            "missing_examples": list(read_report.missing_examples),
            "skipped_corrupt_images": len(corrupt),
            "corrupt_images": [str(p) for p in corrupt[:20]],
        }
        if not records:
            raise ConfigError(f"{annotation_json}: no usable images")
        datasets.append(CocoCaptionsDataset(records, transform, labeler, seed=cfg.seed))
    return datasets[0], datasets[1]


def _loader(dataset, cfg: DictConfig, train: bool) -> DataLoader:
    workers = int(cfg.groupvit.num_workers)
    return DataLoader(
        dataset,
        batch_size=int(cfg.groupvit.batch_size),
        shuffle=train,
        drop_last=train and len(dataset) > cfg.groupvit.batch_size,  # contrastive needs B > 1
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate_captions,
    )


class EpochCaptions(pl.Callback):
    """A new random caption (and label prompts) per image each epoch, reproducibly."""

    def __init__(self, dataset: CocoCaptionsDataset):
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dataset.set_epoch(trainer.current_epoch)


def train_groupvit(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> RunSummary:
    prepare_run(cfg)
    validate_groupvit(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    gv = cfg.groupvit
    model = build_groupvit(to_container(gv.model))
    labeler = build_labeler(to_container(gv.labels), model.spec.context_length)
    ensure_coco_dataset(cfg.dataset)
    with RunContext(cfg, "train") as run:
        run_dir, tracker, summary = run.run_dir, run.tracker, run.summary
        with run.stage("data"):
            data_report: dict[str, Any] = {}
            train_set, val_set = caption_datasets(cfg, labeler, data_report)
            summary["data"] = data_report
        module = GroupViTFineTuner(
            model,
            trainable=list(gv.trainable),
            losses=to_container(gv.losses),
            optimizer=to_container(cfg.optimizer),
            scheduler=to_container(cfg.get("scheduler")),
            context={"model": to_container(gv.model), "labels": to_container(gv.labels)},
            entropy_map_dir=str(run_dir / "media"),
        )
        summary["parameters"] = {
            "trainable": module.trainable_parameters,
            "total": module.total_parameters,
            "components": list(gv.trainable),
        }
        if gv.get("save_untrained", False) and run.is_global_zero:
            # the same weights before any training step: the "does training help?" reference
            untrained = save_groupvit(model, run_dir / "groupvit_untrained.pt")
            summary["groupvit_untrained_checkpoint"] = str(untrained)
        checkpoint_dir = run_dir / "checkpoints"
        trainer = build_trainer(cfg, run, checkpoint_dir, cfg.fit.monitor, cfg.fit.mode, callbacks)
        trainer.callbacks.append(EpochCaptions(train_set))
        with run.stage("fit"):
            fit_resumable(
                trainer,
                module,
                _loader(train_set, cfg, True),
                _loader(val_set, cfg, False),
                cfg.get("ckpt_path"),
            )
        best = str(trained_checkpoint(trainer, checkpoint_dir))
        summary["best_checkpoint"] = best
        summary["fit_metrics"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1
        }
        summary["metrics"] = dict(summary["fit_metrics"])
        if not run.is_global_zero:  # DDP: every rank runs this function; one writes the files
            return summary
        export = save_groupvit(load_groupvit(best, kind="vitlab"), run_dir / "groupvit.pt")
        summary["groupvit_checkpoint"] = str(export)
        maps = sorted((run_dir / "media").glob("entropy_maps_epoch*.png"))
        if maps:
            summary["entropy_maps"] = str(maps[-1])
            tracker.log_image("entropy_maps", maps[-1])
        tracker.log_metrics({f"final/{k}": v for k, v in summary["fit_metrics"].items()})
    log.info("GroupViT checkpoint for segmentation: %s", summary.get("groupvit_checkpoint"))
    return summary


PIPELINE = Pipeline("groupvit", train=train_groupvit, validate_train=validate_groupvit)
