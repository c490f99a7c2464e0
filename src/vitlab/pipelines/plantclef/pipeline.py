"""The PlantCLEF pipeline behind `train.py` and `infer.py`: config in, summary out.

train: (generate) -> prepare -> embed -> fit -> predict -> score
infer: checkpoint (+ its backbone and features) -> predict -> score
All components are built and validated before the first stage runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vitlab.atomic import atomic_output
from vitlab.config import (
    instantiate_node,
    require_choice,
    require_positive,
    require_positive_or_auto,
    require_set,
    to_container,
)
from vitlab.data.missing_images import FRACTION_KEY, check_max_missing_fraction
from vitlab.data.plantclef import (
    check_plantclef_dataset,
    read_ground_truth,
    read_species_names,
    read_submission,
    write_submission,
)
from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef
from vitlab.devices import CPU, Compute
from vitlab.errors import ConfigError
from vitlab.losses import LabelStats, check_loss_input
from vitlab.losses.factory import outputs_log_probs
from vitlab.metrics.plantclef import plantclef_scores
from vitlab.models.features import ClsToken
from vitlab.optim import check_optimization, follow_monitor
from vitlab.pipelines.base import (
    Pipeline,
    RunContext,
    RunSummary,
    build_backbone,
    build_trainer,
    embedding_components,
    ensure_generated,
    numeric_metrics,
    place_backbone,
    prepare_run,
    run_compute,
    validate_embedding_training,
)
from vitlab.pipelines.plantclef.collages import CollageParams, build_collages
from vitlab.pipelines.plantclef.fit import (
    LOADERS,
    fit_head,
    load_splits,
    read_label_map,
    write_label_map,
)
from vitlab.pipelines.plantclef.fit_multilabel import load_collage_splits
from vitlab.pipelines.plantclef.predict import (
    TILE_FITS,
    BackboneClassifierPredictor,
    EmbeddingHeadPredictor,
    Predictor,
    predict_quadrats,
)
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.pipelines.plantclef.score import per_plot_rows, plot_per_species_f1
from vitlab.pipelines.plantclef.tiles import embed_test_tiles, predict_from_tiles
from vitlab.safe_load import distrusted, load_checkpoint_file, load_lightning_module
from vitlab.stages.embed import forward_batch_size
from vitlab.stages.prepare import PrepareParams
from vitlab.tasks.classification import EmbeddingClassifier
from vitlab.tracking import WANDB_MODES, write_json

log = logging.getLogger(__name__)
PREDICTORS = ("head", "backbone_classifier")


def validate(cfg: DictConfig) -> None:
    """Checks that need no work (the shared ones: `validate_embedding_training`); components
    validate their own arguments on instantiation."""
    resumed = validate_embedding_training(cfg)
    require_choice(cfg, "predictor", PREDICTORS)
    if resumed is not None:
        check_resumed_run(cfg, resumed)
    require_choice(cfg, "fit.loader", LOADERS)
    require_positive(cfg, "predict.quadrats_per_batch", "dataset.min_images_per_species")
    require_positive_or_auto(cfg, "predict.batch_size")
    if cfg.logger and cfg.logger.get("wandb"):
        require_choice(cfg, "logger.wandb.mode", WANDB_MODES)
    seed = cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"seed must be a whole number >= 0 (or null: random), got {seed!r}")
    if "center_crop" in cfg.predict:
        from vitlab.deprecations import renamed_error

        raise renamed_error("predict.center_crop")
    require_choice(cfg, "predict.tile_fit", TILE_FITS)
    require_choice(cfg, "predict.test", (True, False))
    strategy = instantiate_node(cfg.inference, "inference")
    collages = CollageParams.from_config(cfg.get("collages"))
    if collages.enabled and cfg.fit.loader != "memory":
        raise ConfigError("collages.enabled=true needs fit.loader=memory (collages are in memory)")
    if cfg.predictor == "head":
        module = check_head_and_loss(cfg)
        check_multilabel_choices(cfg, module.multilabel, strategy)
    elif getattr(strategy, "needs_thresholds", False):
        raise ConfigError(
            "inference.threshold=auto: thresholds are chosen after training a head with a "
            "multi-label loss; with predictor=backbone_classifier set inference.threshold=<number>"
        )


def check_multilabel_choices(cfg: DictConfig, multilabel: bool, strategy: Any) -> None:
    """Multi-label settings that cannot work together fail before any stage."""
    if multilabel and cfg.fit.monitor == "val/acc":
        raise ConfigError(
            "fit.monitor=val/acc: a multi-label head logs val/loss and val/macro_f1 (each "
            "species' sigmoid at 0.5), no single-label accuracy"
        )
    if getattr(strategy, "needs_thresholds", False) and not multilabel:
        raise ConfigError(
            f"inference.threshold=auto: thresholds are chosen on validation data for a "
            f"multi-label head, and loss._target_={cfg.loss.get('_target_')} trains a softmax "
            "one: use loss=bce|asl|focal_bce, or set inference.threshold=<number>"
        )


RESUME_MUST_MATCH = ("dataset.root", "dataset.min_images_per_species", "backbone", "features")
"""What a resumed PlantCLEF run must share with the run that wrote `ckpt_path`."""


def check_resumed_run(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """Before prepare and embed: `ckpt_path` is a PlantCLEF head checkpoint of a run on the same
    data with the same backbone and features (else resuming trains on other data, or fails on
    mis-shaped weights after the expensive stages)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    recorded = {"dataset": {}, **(hparams.get("context") or {})}
    if not {"head", "species_ids"} <= hparams.keys() or "backbone" not in recorded:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: not a PlantCLEF training checkpoint (its "
            f"hyperparameters hold {sorted(hparams)}): resume from a pipeline=plantclef run's "
            "checkpoints/last.ckpt"
        )
    differ = []
    for key in RESUME_MUST_MATCH:
        theirs = OmegaConf.select(OmegaConf.create(recorded), key)
        ours = to_container(OmegaConf.select(cfg, key))
        if theirs is None:  # not recorded by older vitlab versions
            continue
        if key == "dataset.root":
            if Path(str(theirs)).resolve() != Path(str(ours)).resolve():
                differ.append(f"{key} ({theirs} there, {ours} here)")
        else:
            differ += leaf_differences(distrusted(to_container(theirs)), distrusted(ours), key)
    if differ:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} was trained with another "
            + "; ".join(differ)
            + ": resuming it here would continue that training on other inputs. Resume with "
            "the settings of its run (its .hydra/config.yaml), or start a new run"
        )


def leaf_differences(theirs: Any, ours: Any, key: str) -> list[str]:
    """`key.leaf (a there, b here)` for every leaf where two config trees differ."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [
            diff
            for name in sorted(theirs.keys() | ours.keys(), key=str)
            for diff in leaf_differences(theirs.get(name), ours.get(name), f"{key}.{name}")
        ]
    return [] if theirs == ours else [f"{key} ({theirs} there, {ours} here)"]


def check_head_and_loss(cfg: DictConfig) -> EmbeddingClassifier:
    """Build the LightningModule (head, loss, optimiser) against dummy label statistics and run
    one dummy training step, so a `head=`/`loss=` that cannot work here fails before any stage,
    naming the key. PlantCLEF has no poison list: `loss=seesaw_poison` is refused."""
    stats = LabelStats.dummy()
    try:
        module = EmbeddingClassifier(
            head=to_container(cfg.head.model),
            loss=to_container(cfg.loss),
            in_features=8,
            species_ids=list(range(stats.num_classes)),
            optimizer=to_container(cfg.optimizer),
            scheduler=to_container(cfg.get("scheduler")),
            class_counts=list(stats.class_counts),
        )
    except ConfigError as err:
        if not str(err).startswith("head.model"):
            raise
        raise ConfigError(
            f"{err} (PlantCLEF heads take in_features and num_classes: head=linear)"
        ) from err
    x = torch.randn(2, 8)
    try:
        output = module.head(x)
    except Exception as err:  # e.g. a FungiCLEF head, which also takes metadata
        raise ConfigError(
            f"head.model._target_={cfg.head.model.get('_target_')} cannot classify PlantCLEF "
            f"embeddings (head(x) failed: {err}): use head=linear"
        ) from err
    if not isinstance(output, torch.Tensor) or output.shape != (2, stats.num_classes):
        raise ConfigError(
            f"head.model._target_={cfg.head.model.get('_target_')} must return a (batch, "
            "classes) tensor for PlantCLEF: use head=linear"
        )
    check_loss_input(cfg.loss, output)
    if module.multilabel and outputs_log_probs(output):
        raise ConfigError(
            f"loss._target_={cfg.loss.get('_target_')} is multi-label (a sigmoid per species) "
            "and takes logits, but head.model ends in log-softmax: set "
            "head.model.log_softmax=false (experiment=plantclef_multilabel does)"
        )
    module.loss_fn.train()
    module.loss_fn(output, torch.tensor([0, 1]))
    check_optimization(cfg)
    return module


def ensure_dataset(dataset: DictConfig) -> None:
    ensure_generated(dataset, generate_plantclef, PlantClefSyntheticSpec, "PlantCLEF")


def train(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> RunSummary:
    """(generate) -> prepare -> embed -> fit -> predict -> score; `callbacks` join the
    Trainer's (sweep.py's pruning)."""
    prepare_run(cfg)
    validate(cfg)
    parts = embedding_components(cfg)
    strategy = instantiate_node(cfg.inference, "inference")
    prepare_params = PrepareParams.from_config(cfg.prepare)
    collage_params = CollageParams.from_config(cfg.get("collages"))
    classifier = None
    if cfg.predictor == "backbone_classifier":
        classifier = BackboneClassifierPredictor(parts.backbone)  # no class mapping: fails now
    ensure_dataset(cfg.dataset)
    # every input problem at once, before any work (folders, metadata, species filter, truth)
    checked = check_plantclef_dataset(cfg.dataset, training=cfg.predictor == "head")
    test_images = checked.test_images
    if classifier is not None:
        check_label_overlap(classifier.species_ids, cfg.dataset.get("test_ground_truth"), cfg)
    with RunContext(cfg, "train", cache_keys={}, dataset_check=checked.report) as run:
        summary = run.summary
        if classifier is not None:
            predictor: Predictor = classifier
        else:
            with run.stage("prepare"):
                prepared = prepare_training_images(
                    cfg.dataset.metadata_csv,
                    cfg.dataset.train_images_dir,
                    cfg.paths.cache_dir,
                    prepare_params,
                    parts.engine,
                    max_missing_fraction=check_max_missing_fraction(
                        OmegaConf.select(cfg, FRACTION_KEY)
                    ),
                )
            embedded = parts.embed_and_record(run, prepared)
            collage_embeddings = None
            if collage_params.enabled:
                with run.stage("collages"):
                    collages = build_collages(
                        prepared,
                        cfg.paths.cache_dir,
                        collage_params,
                        prepare_params.image_size,
                        parts.engine,
                    )
                with run.stage("embed_collages"):
                    collage_embeddings = parts.embed(collages)
                summary["cache_keys"]["collages"] = collages.key
                summary["cache_keys"]["embed_collages"] = collage_embeddings.key
            with run.stage("fit"):
                splits = load_splits(
                    embedded, cfg.dataset.min_images_per_species, cfg.fit.loader, cfg.seed
                )
                if collage_embeddings is not None:
                    splits = load_collage_splits(
                        splits, collage_embeddings, collage_params.proportion, cfg.seed
                    )
                summary["fit_data"] = splits.report
                result = _fit(cfg, splits, parts.backbone, parts.features, run, callbacks, strategy)
            predictor = EmbeddingHeadPredictor(
                parts.backbone,
                parts.features,
                result.module.head,
                result.module.species_ids,
                result.module.multilabel,
            )
            strategy = with_decision(strategy, result.module, "the trained head")
        if cfg.predict.get("test", True):
            _predict_and_score(cfg, predictor, strategy, test_images, run, parts.engine)
        else:
            summary["predict_report"] = {"skipped": "predict.test=false"}
            log.info("predict.test=false: the test set is not predicted (no submission)")
    return summary


def _fit(
    cfg: DictConfig,
    splits,
    backbone,
    features,
    run: RunContext,
    callbacks: Sequence[pl.Callback],
    strategy: Any = None,
):
    summary = run.summary
    has_val = splits.counts["val"] > 0
    monitor = cfg.fit.monitor if has_val else "train/loss"
    mode = cfg.fit.mode if has_val else "min"
    context = {
        "backbone": to_container(cfg.backbone),
        "features": to_container(cfg.features),
        "prepare": to_container(cfg.prepare),
        "dataset": to_container(cfg.dataset),  # infer.py scores on it unless told otherwise
        "cache_keys": summary["cache_keys"],
    }
    module = EmbeddingClassifier(
        head=to_container(cfg.head.model),
        loss=to_container(cfg.loss),
        in_features=splits.dim,
        species_ids=splits.species_ids,
        optimizer=to_container(cfg.optimizer),
        scheduler=follow_monitor(to_container(cfg.get("scheduler")), monitor, mode),
        context=context,
        class_counts=train_class_counts(splits),
    )
    checkpoint_dir = run.run_dir / "checkpoints"
    trainer = build_trainer(cfg, run, checkpoint_dir, monitor, mode, callbacks)
    result = fit_head(
        splits, module, trainer, cfg.head.batch_size, checkpoint_dir, cfg.get("ckpt_path")
    )
    last = result.last_checkpoint  # fit_head wrote label_map.json beside best.ckpt
    if last and last.parent != Path(result.best_checkpoint).parent:
        write_label_map(last.parent, splits.species_ids)
    if getattr(strategy, "needs_thresholds", False) and splits.counts["val"]:
        decision = choose_val_thresholds(result.module, splits, strategy, cfg.seed or 0)
        record_decision(Path(result.best_checkpoint), decision)
        result.module.decision = decision
        summary["decision"] = {k: v for k, v in decision.items() if k != "per_species"}
        # the rule's per-plot F1 on validation pseudo-plots: a sweep objective without test data
        summary.setdefault("metrics", {})["val_plots/f1"] = decision["global_val_f1"]
        log.info("thresholds chosen on validation data: %s", summary["decision"])
    summary["best_checkpoint"] = str(result.best_checkpoint)
    summary["fit_metrics"] = result.metrics
    summary.setdefault("metrics", {}).update(result.metrics)
    run.tracker.log_metrics({f"final/{k}": v for k, v in result.metrics.items()})
    return result


def choose_val_thresholds(
    module: EmbeddingClassifier, splits: Any, strategy: Any, seed: int
) -> dict[str, Any]:
    """The decision thresholds of `strategy` for a multi-label head, chosen on pseudo-plots
    of the validation images and collages (`PooledThreshold.calibrate`)."""
    probs, truth = [], []
    module.eval()
    with torch.inference_mode():
        for x, y in splits.loader("val", 4096, shuffle=False):
            probs.append(torch.sigmoid(module.head(x.float())).numpy())
            truth.append(y.numpy() if y.dim() == 2 else np.eye(len(module.species_ids))[y.numpy()])
    decision = strategy.calibrate(np.concatenate(probs), np.concatenate(truth) > 0.5, seed)
    return {**decision, "chosen_on": "pseudo-plots of validation images and collages"}


def record_decision(checkpoint: Path, decision: dict[str, Any]) -> None:
    """Save the thresholds in the checkpoint (`decision`), so infer.py applies the same rule."""
    content = load_checkpoint_file(checkpoint, opt_in="(a checkpoint this run wrote)")
    content["decision"] = decision
    with atomic_output(checkpoint) as tmp:
        torch.save(content, tmp)


def with_decision(strategy: Any, module: EmbeddingClassifier, source: str) -> Any:
    """The inference strategy with the thresholds `threshold=auto` stands for, from the head's
    checkpoint; other strategies as they are."""
    if not getattr(strategy, "needs_thresholds", False):
        return strategy
    if not module.decision:
        raise ConfigError(
            f"inference.threshold=auto: {source} has no thresholds chosen on validation data "
            "(trained without a multi-label loss or without validation images): set "
            "inference.threshold=<number>"
        )
    try:
        return strategy.with_thresholds(module.decision)
    except ValueError as err:
        raise ConfigError(f"inference.threshold=auto with {source}: {err}") from err


def train_class_counts(splits) -> list[int]:
    """Training images per class index of the label map (`loss.counts_from=train`)."""
    splits = getattr(splits, "singles", splits)  # with collages: the single images' counts
    if not splits.streaming:
        labels = splits.arrays["train"][1]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(splits.shard_paths, columns=["species_id", "learn_tag"])
        species = table.column("species_id").to_numpy()
        train = np.asarray(table.column("learn_tag").to_pylist()) == "train"
        index_of = {s: i for i, s in enumerate(splits.species_ids)}
        labels = np.array(
            [index_of[int(s)] for s in species[train] if int(s) in index_of], dtype=np.int64
        )
    return np.bincount(labels, minlength=len(splits.species_ids)).tolist()


def _predict_and_score(
    cfg: DictConfig,
    predictor: Predictor,
    strategy,
    test_images,
    run: RunContext,
    engine=None,
) -> None:
    run_dir, tracker, summary = run.run_dir, run.tracker, run.summary
    result, report = _predict(cfg, predictor, strategy, test_images, run, engine)
    submission = write_submission(result.predictions, run_dir / "submission.csv")
    summary["submission"] = str(submission)
    summary["predict_report"] = {**result.report(), **report}
    summary["inference"] = to_container(cfg.inference)
    truth_path = cfg.dataset.get("test_ground_truth")
    if truth_path and Path(truth_path).is_file():
        with run.stage("score"):
            truth = read_ground_truth(truth_path)
            scores = plantclef_scores(truth, result.predictions)
            summary["scores"] = scores
            summary.setdefault("metrics", {}).update(numeric_metrics(scores, "test/"))
            write_json(run_dir / "scores.json", scores)
            tracker.log_metrics({f"test/{k}": v for k, v in scores.items()})
            tracker.log_table(
                "per_plot_predictions",
                ["plot_id", "truth", "prediction", "f1"],
                per_plot_rows(truth, result.predictions),
            )
            chart = plot_per_species_f1(
                truth,
                result.predictions,
                run_dir / "per_species_f1.png",
                read_species_names(cfg.dataset.get("metadata_csv")),
            )
            tracker.log_image("per_species_f1", chart)
        log.info("scores: %s", scores)
    else:
        log.info("no test ground truth at %s: submission written, not scored", truth_path)


def _predict(
    cfg: DictConfig, predictor: Predictor, strategy, test_images, run: RunContext, engine=None
):
    """The test predictions; with a trained head, from the cached tile embeddings (`embed_tiles`
    computes only what the cache lacks), else every tile through the backbone's classifier."""
    tile_fit = cfg.predict.get("tile_fit", "center_crop")
    compute = run_compute(cfg)
    if not isinstance(predictor, EmbeddingHeadPredictor):
        # the classifier's forward is the backbone's: its [CLS] probe sizes `auto` batches
        batch = forward_batch_size(cfg.predict.batch_size, predictor.backbone, ClsToken(), compute)
        with run.stage("predict"):
            result = predict_quadrats(
                test_images,
                strategy,
                predictor,
                batch,
                cfg.predict.quadrats_per_batch,
                tile_fit,
                compute,
            )
        return result, {}
    with run.stage("embed_tiles"):
        root = Path(os.path.commonpath([p.parent for p in test_images]))
        tiles, embedded = embed_test_tiles(
            test_images,
            root,
            strategy,
            predictor.backbone,
            predictor.features,
            cfg.paths.cache_dir,
            tile_fit,
            cfg.predict.batch_size,
            engine,
            compute,
        )
    run.summary.setdefault("cache_keys", {})["tiles"] = tiles.key
    with run.stage("predict"):
        result = predict_from_tiles(
            tiles,
            strategy,
            predictor.head,
            predictor.species_ids,
            tile_fit,
            multilabel=predictor.multilabel,
        )
    return result, {"quadrats_embedded": embedded, "tile_cache": str(tiles.directory)}


def infer(cfg: DictConfig) -> RunSummary:
    """Predict (and score) with a trained checkpoint, or with the backbone's own classifier.
    The dataset is the checkpoint's run's unless the command line sets `dataset`."""
    prepare_run(cfg)
    validate_infer(cfg)
    strategy = instantiate_node(cfg.inference, "inference")
    module, dataset = None, cfg.dataset
    if cfg.predictor != "head" or dataset_set_on_command_line():
        ensure_dataset(dataset)  # a wrong dataset.root fails before any model is loaded
    if cfg.predictor == "head":
        if not cfg.get("ckpt_path"):
            raise ConfigError(
                "ckpt_path is required with predictor=head (a checkpoint written "
                "by train.py, e.g. outputs/.../checkpoints/best.ckpt)"
            )
        module = load_head_module(Path(cfg.ckpt_path))
        dataset = dataset_of_checkpoint_run(cfg, module)
        ensure_dataset(dataset)  # before building the backbone
    test_images = check_plantclef_dataset(dataset, training=False).test_images
    if module is not None:
        strategy = with_decision(strategy, module, f"ckpt_path={cfg.ckpt_path}")
        trust = bool(OmegaConf.select(cfg, "backbone.trust_checkpoint", default=False))
        predictor: Predictor = head_predictor(module, run_compute(cfg), trust)
    else:
        backbone = place_backbone(build_backbone(cfg.backbone), run_compute(cfg))
        predictor = BackboneClassifierPredictor(backbone)
    check_label_overlap(predictor.species_ids, dataset.get("test_ground_truth"), cfg)
    if dataset is not cfg.dataset:
        with open_dict(cfg):
            cfg.dataset = dataset  # what _predict_and_score scores against and the run records
    with RunContext(cfg, "infer", checkpoint=cfg.get("ckpt_path")) as run:
        _predict_and_score(cfg, predictor, strategy, test_images, run)
    return run.summary


def validate_infer(cfg: DictConfig) -> None:
    """infer.py's checks that need no work."""
    require_set(cfg, "dataset.root", "backbone.name", "backbone.checkpoint_path")
    require_choice(cfg, "predictor", PREDICTORS)
    require_positive(cfg, "predict.quadrats_per_batch")
    require_positive_or_auto(cfg, "predict.batch_size")
    require_choice(cfg, "predict.tile_fit", TILE_FITS)


def load_head_predictor(checkpoint: Path) -> EmbeddingHeadPredictor:
    """Rebuild backbone, features and head exactly as they were at training time."""
    return head_predictor(load_head_module(checkpoint))


def load_head_module(checkpoint: Path) -> EmbeddingClassifier:
    """The trained head (with its label map and training context), checked against the
    `label_map.json` beside it."""
    if not checkpoint.is_file():
        raise ConfigError(f"ckpt_path={checkpoint} does not exist")
    try:
        module = load_lightning_module(EmbeddingClassifier, checkpoint)
    except (TypeError, KeyError) as err:  # another module's hyperparameters (e.g. FungiCLEF's)
        raise ConfigError(
            f"ckpt_path={checkpoint} is not a PlantCLEF head checkpoint (the ones train.py "
            f"writes with pipeline=plantclef): {err}. FungiCLEF fold checkpoints are scored by "
            "their own run's ensemble; infer.py does not predict with them"
        ) from err
    module.eval()
    label_map = read_label_map(checkpoint)
    if label_map is not None and label_map != module.species_ids:
        raise ConfigError(f"{checkpoint}: label_map.json beside it disagrees with the checkpoint")
    return module


def head_predictor(
    module: EmbeddingClassifier, compute: Compute = CPU, trust_backbone: bool = False
) -> EmbeddingHeadPredictor:
    """The checkpoint's backbone and features (their `_target_`s checked, their `trust_*` keys
    replaced by `trust_backbone`: this run's `backbone.trust_checkpoint`) with its head."""
    context = distrusted(module.hparams.context or {}, trust_backbone)
    backbone = place_backbone(build_backbone(context["backbone"], "checkpoint backbone"), compute)
    features = instantiate_node(OmegaConf.create(context["features"]), "checkpoint features")
    return EmbeddingHeadPredictor(
        backbone, features, module.head, module.species_ids, module.multilabel
    )


def dataset_of_checkpoint_run(cfg: DictConfig, module: EmbeddingClassifier) -> DictConfig:
    """The dataset the checkpoint was trained on (recorded in it, or in its run's
    `.hydra/config.yaml`), unless the command line sets `dataset` or `dataset.*`: `infer.py
    ckpt_path=...` alone must not fall back to the synthetic default."""
    if dataset_set_on_command_line():
        return cfg.dataset
    stored = (module.hparams.context or {}).get("dataset")
    if stored is None:  # checkpoints from before the dataset was recorded
        run_config = Path(cfg.ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
        if run_config.is_file():
            stored = to_container(OmegaConf.load(run_config).get("dataset"))
    if not stored:
        log.warning(
            "ckpt_path=%s records no dataset: using dataset=%s (set dataset=... to choose)",
            cfg.ckpt_path,
            cfg.dataset.get("root"),
        )
        return cfg.dataset
    dataset = OmegaConf.create(stored)
    log.info("dataset of the checkpoint's run: root=%s (dataset=... overrides it)", dataset.root)
    return dataset


def dataset_set_on_command_line() -> bool:
    return any(key == "dataset" or key.startswith("dataset.") for key in command_line_keys())


def command_line_keys() -> list[str]:
    """Config keys set on the command line (`key=value`, `+key=...`, `~key`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = HydraConfig.get().overrides.task
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


MIN_LABEL_OVERLAP = 0.5  # below: a loud warning that the model may not fit the test plots


def check_label_overlap(species_ids: list[int] | None, truth_path: Any, cfg: DictConfig) -> None:
    """A label map that shares no species with the ground truth would score 0 everywhere: an
    error before any work; little overlap is a warning."""
    if not species_ids or not truth_path or not Path(truth_path).is_file():
        return
    truth = {s for ids in read_submission(truth_path).values() for s in ids}
    if not truth:
        return
    shared = len(truth & set(species_ids)) / len(truth)
    source = f"ckpt_path={cfg.get('ckpt_path')}" if cfg.predictor == "head" else "backbone"
    if shared == 0:
        raise ConfigError(
            f"{source}: its {len(species_ids)} species share none of the {len(truth)} species "
            f"of the ground truth {truth_path}: it was trained on another dataset (set "
            "dataset=... dataset.root=... to the one it was trained for)"
        )
    if shared < MIN_LABEL_OVERLAP:
        log.warning(
            "%s knows only %.0f%% of the %d species in %s: scores will be low",
            source,
            100 * shared,
            len(truth),
            truth_path,
        )


PIPELINE = Pipeline(
    "plantclef", train=train, infer=infer, validate_train=validate, validate_infer=validate_infer
)
