"""The FungiCLEF pipeline behind `train.py pipeline=fungiclef`: config in, summary out.

(generate) -> prepare + embed every image (DF20, DF21, test) -> DF21 split into the held-out
test third and folds -> one head per fold (trained on DF20 + the other folds, validated on its
fold) -> ensemble of the fold heads with the open-set rule -> per-observation predictions ->
submission + official scores (held-out third always; official test when its truth exists).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.special import softmax
from torch.utils.data import WeightedRandomSampler

from vitlab.cache import directory_fingerprint, file_sha256
from vitlab.callbacks import trained_checkpoint
from vitlab.config import (
    instantiate_node,
    require_choice,
    require_positive,
    require_positive_or_auto,
    require_set,
    to_container,
)
from vitlab.data.embedding_rows import Rows, RowsDataset, batch_loader
from vitlab.data.fungiclef import (
    UNKNOWN,
    aggregate_by_observation,
    read_metadata,
    split_df21,
)
from vitlab.data.metadata import MetadataEncoder
from vitlab.data.missing_images import (
    FRACTION_KEY,
    REPORT_LIST_LIMIT,
    check_max_missing_fraction,
    check_missing_images,
    require_image_folder,
)
from vitlab.data.shards import arrow_to_embeddings
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.devices import require_accelerator
from vitlab.errors import ConfigError, DatasetFormatError
from vitlab.inference.fungiclef import (
    AVERAGES,
    TUNE_TRACKS,
    ensemble_probabilities,
    predict_with_open_set,
    tune_entropy_threshold,
)
from vitlab.losses import LabelStats, check_loss_input
from vitlab.metrics.fungiclef import (
    fungiclef_scores,
    read_fungiclef_truth,
    read_poison_list,
    write_fungiclef_submission,
)
from vitlab.optim import check_optimization
from vitlab.pipelines.base import (
    Pipeline,
    RunContext,
    RunSummary,
    begin,
    build_backbone,
    build_trainer,
    check_resume,
    embed_training_images,
    ensure_generated,
    numeric_metrics,
    place_backbone,
    run_compute,
)
from vitlab.reports import embedding_map_png, per_class_f1, poison_confusion
from vitlab.safe_load import load_lightning_module
from vitlab.stages.prepare import PrepareParams, prepare_images
from vitlab.tasks.fungiclef import IGNORE, FungiClassifier
from vitlab.tracking import write_json

log = logging.getLogger(__name__)
SAMPLERS = ("none", "val_distribution")


def validation_matching_weights(
    train_labels: np.ndarray, val_labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Per-sample weights (val frequency / train frequency of the sample's class), so sampling
    with them gives the validation class distribution; classes absent from validation keep a
    small weight rather than vanishing."""
    train = np.bincount(train_labels, minlength=num_classes) / max(len(train_labels), 1)
    val = np.bincount(val_labels, minlength=num_classes) / max(len(val_labels), 1)
    floor = 0.1 / num_classes
    ratio = (np.maximum(val, floor)) / np.maximum(train, 1e-12)
    return ratio[train_labels]


def validate_fungiclef(cfg: DictConfig) -> None:
    """Checks that need no work, naming the key and the allowed values."""
    require_set(cfg, "dataset.root", "backbone.name", "backbone.checkpoint_path")
    require_choice(cfg, "sampler", SAMPLERS)
    check_resume(cfg, supported=False)
    require_choice(cfg, "ensemble.average", AVERAGES)
    require_choice(cfg, "ensemble.tune_track", TUNE_TRACKS)
    require_choice(cfg, "fit.mode", ("min", "max"))
    require_positive(cfg, "head.batch_size")
    require_positive_or_auto(cfg, "embed.batch_size")
    check_optimization(cfg)
    threshold = OmegaConf.select(cfg, "ensemble.open_set_threshold")
    if threshold not in (None, "tune") and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0
    ):
        raise ConfigError(
            f"ensemble.open_set_threshold={threshold!r} must be null, tune or an entropy >= 0 "
            "(nats)"
        )
    n_folds = OmegaConf.select(cfg, "dataset.n_folds")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ConfigError(
            f"dataset.n_folds={n_folds!r} must be an integer >= 2 (the held-out third + folds)"
        )
    check_max_missing_fraction(OmegaConf.select(cfg, FRACTION_KEY))
    require_accelerator(cfg.get("trainer"))
    check_head_and_loss(cfg)


DUMMY_META_GROUPS = {"date": (0, 4), "geo": (4, 8), "substrate": (8, 12)}


def fold_module(cfg: DictConfig, **runtime: Any) -> FungiClassifier:
    """One fold's LightningModule from the config (head, loss, aux targets, optimiser,
    scheduler) and what is known at run time (widths, label space, counts, context)."""
    return FungiClassifier(
        head=to_container(cfg.head.model),
        loss=to_container(cfg.loss),
        aux_weights=to_container(cfg.aux_targets),
        optimizer=to_container(cfg.optimizer),
        scheduler=to_container(cfg.get("scheduler")),
        **runtime,
    )


def check_head_and_loss(cfg: DictConfig) -> None:
    """Build the fold LightningModule (head, loss, auxiliary outputs, optimiser, scheduler)
    against dummy label statistics and run one dummy training step, so a `head=`/`loss=` that
    cannot work here fails before any stage, naming the key. The embedding width is a stand-in
    (the backbone's is known after embed): `head.model.heads` must still divide the real one."""
    not_fungi_head = ConfigError(
        "head: pipeline=fungiclef needs a FungiCLEF head (embeddings + metadata): "
        f"head=fungi_mlp|fungi_transformer, not {OmegaConf.select(cfg, 'head.model._target_')}"
    )
    if not isinstance(cfg.head.get("model"), DictConfig):
        raise not_fungi_head
    stats = LabelStats.dummy(poison_list=True)
    width = 8 * int(cfg.head.model.get("heads") or 1)
    aux_sizes = {"poisonous": 1, "genus": 2, "family": 2}
    try:
        module = fold_module(
            cfg,
            embed_dim=width,
            meta_groups=DUMMY_META_GROUPS,
            species_ids=list(range(stats.num_classes)),
            class_counts=list(stats.class_counts),
            poisonous_classes=list(stats.poisonous_classes),
            aux_sizes=aux_sizes,
        )
    except ConfigError as err:
        if str(err).startswith("head.model: ") and "unexpected keyword" in str(err):
            raise not_fungi_head from err
        raise
    batch = {
        "embedding": torch.randn(2, width),
        "metadata": torch.randn(2, 12),
        "species": torch.tensor([0, 1]),
        "poisonous": torch.tensor([1, 0]),
        "genus": torch.tensor([0, IGNORE]),
        "family": torch.tensor([1, 0]),
    }
    try:
        output = module(batch["embedding"], batch["metadata"])["species"]
    except Exception as err:
        raise ConfigError(
            f"head.model._target_={cfg.head.model.get('_target_')} cannot take FungiCLEF "
            f"embeddings + metadata ({err}): use head=fungi_mlp|fungi_transformer"
        ) from err
    check_loss_input(cfg.loss, output, "weighted_ce, focal, seesaw or seesaw_poison")
    module.train()
    module._losses(batch)


def ensure_fungi_dataset(dataset: DictConfig) -> None:
    ensure_generated(dataset, generate_fungiclef, FungiSyntheticSpec, "FungiCLEF")


@dataclass
class Part:
    """One split of the dataset as listed: its metadata, image folder and their config keys."""

    frame: pd.DataFrame
    folder: Path
    folder_key: str
    csv: str


def _image_work(
    parts: dict[str, Part], max_fraction: float
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Work rows (image_name, path) for prepare, names `<part>/<image_path>`, and each split's
    missing-image report. A missing folder, a split with no image on disk or more than
    `max_fraction` of them missing is an error naming the folder and its key (before any
    work); fewer are skipped and counted."""
    rows, report = [], {}
    for name, part in parts.items():
        require_image_folder(part.folder, part.folder_key)
        listed = part.frame["image_path"].astype(str).drop_duplicates()
        names = name + "/" + listed
        paths = [part.folder / p for p in listed]
        exists = np.array([p.is_file() for p in paths], dtype=bool)
        report[name] = check_missing_images(
            name,
            len(listed),
            listed[~exists].tolist(),
            part.folder,
            part.folder_key,
            max_fraction,
            source=part.csv,
        ).report()
        rows.append(
            pd.DataFrame(
                {"image_name": names[exists], "path": [str(p) for p, e in zip(paths, exists) if e]}
            )
        )
    return pd.concat(rows, ignore_index=True), report


def _test_truth(ds: DictConfig, test: pd.DataFrame | None) -> dict[int, int] | None:
    """The public test's truth when `dataset.test_ground_truth` exists (read before any work,
    so a bad file fails first); it must cover exactly the test CSV's observations."""
    path = Path(ds.test_ground_truth)
    if test is None or not path.is_file():
        return None
    truth = read_fungiclef_truth(path)
    observations = {int(i) for i in test["observationID"].unique()}
    if set(truth) != observations:
        missing = sorted(observations - set(truth))
        extra = sorted(set(truth) - observations)
        raise DatasetFormatError(
            f"{path} (dataset.test_ground_truth) and {ds.test_csv} (dataset.test_csv) disagree: "
            f"{len(missing)} test observation(s) without truth (e.g. {missing[:5]}), "
            f"{len(extra)} truth observation(s) not in the test (e.g. {extra[:5]})"
        )
    return truth


def train_fungiclef(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> RunSummary:
    """embed (cached) -> one head per fold -> ensemble -> open-set rule -> scores; `callbacks`
    join every fold's Trainer (sweep.py's pruning)."""
    begin(cfg)
    validate_fungiclef(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    compute = run_compute(cfg)
    backbone = place_backbone(build_backbone(cfg.backbone), compute)
    features = instantiate_node(cfg.features, "features")
    engine = instantiate_node(cfg.engine, "engine")
    prepare_params = PrepareParams.from_config(cfg.prepare)
    ds = cfg.dataset
    ensure_fungi_dataset(ds)
    df20, df21 = read_metadata(ds.train_csv), read_metadata(ds.val_csv)
    test = read_metadata(ds.test_csv, labelled=False) if Path(ds.test_csv).is_file() else None
    poisonous = read_poison_list(ds.poison_csv)
    test_truth = _test_truth(ds, test)
    parts = {
        "DF20": Part(df20, Path(ds.train_images_dir), "dataset.train_images_dir", ds.train_csv),
        "DF21": Part(df21, Path(ds.val_images_dir), "dataset.val_images_dir", ds.val_csv),
    }
    if test is not None:
        parts["test"] = Part(test, Path(ds.test_images_dir), "dataset.test_images_dir", ds.test_csv)
    else:
        log.warning(
            "no public-test CSV at %s (dataset.test_csv): this run writes no submission; it "
            "scores the held-out DF21 third only",
            ds.test_csv,
        )
    max_fraction = check_max_missing_fraction(OmegaConf.select(cfg, FRACTION_KEY))
    work, missing_report = _image_work(parts, max_fraction)  # fails before any work
    test_observations = (
        [] if test is None else sorted(int(i) for i in test["observationID"].unique())
    )
    no_test = {
        "submission": None,
        "submission_note": f"no public-test CSV at {ds.test_csv} (dataset.test_csv)",
    }
    with RunContext(
        cfg, "train", missing_images=missing_report, **(no_test if test is None else {})
    ) as run:
        run_dir, tracker, summary = run.run_dir, run.tracker, run.summary
        key_parts = [
            file_sha256(ds.train_csv),
            file_sha256(ds.val_csv),
            directory_fingerprint(ds.train_images_dir),
            directory_fingerprint(ds.val_images_dir),
        ]
        if test is not None:
            key_parts += [file_sha256(ds.test_csv), directory_fingerprint(ds.test_images_dir)]
        missing_names = [
            f"{name}/{image}"
            for name, report in missing_report.items()
            for image in report["missing_examples"]
        ]
        with run.stage("prepare"):
            prepared = prepare_images(
                work,
                key_parts,
                cfg.paths.cache_dir,
                prepare_params,
                engine,
                {
                    "missing_images": sum(r["missing"] for r in missing_report.values()),
                    "missing_examples": missing_names[:REPORT_LIST_LIMIT],
                },
            )
        with run.stage("embed"):
            embedded = embed_training_images(cfg, prepared, backbone, features, engine, compute)
        summary["cache_keys"] = {"prepare": prepared.key, "embed": embedded.key}
        summary["prepare_report"] = prepared.manifest.get("report", {})
        table = embedded.read_table(["image_name", "embedding"])
        vectors = dict(
            zip(
                table.column("image_name").to_pylist(),
                arrow_to_embeddings(table.column("embedding")),
            )
        )
        encoder = MetadataEncoder().fit(df20)
        data, meta_missing = {}, {}
        for name, part in parts.items():
            frame = part.frame
            names = name + "/" + frame["image_path"].astype(str)
            keep = names.isin(vectors.keys()).to_numpy()  # skipped images drop out, counted
            if not keep.any():  # every image of the split was missing or corrupt
                raise DatasetFormatError(
                    f"{name}: no image listed in {part.csv} could be read from {part.folder} "
                    f"({part.folder_key}); see summary.json/prepare_report"
                )
            frame = frame[keep].reset_index(drop=True)
            meta, meta_missing[name] = encoder.transform(frame)
            emb = np.stack([vectors[n] for n in names[keep]])
            data[name] = Rows(frame, emb, meta)
        summary["metadata_missing"] = meta_missing
        df21_rows = data["DF21"]
        df21_rows.frame["split"] = split_df21(
            df21_rows.frame, cfg.dataset.n_folds, cfg.dataset.split_seed
        ).to_numpy()
        with run.stage("fit"):
            folds = _fit_folds(cfg, data, df21_rows, encoder, poisonous, run, callbacks)
        with run.stage("predict"):
            _ensemble_and_score(
                cfg,
                folds,
                data,
                df21_rows,
                poisonous,
                test_observations,
                test_truth,
                run_dir,
                tracker,
                summary,
            )
    return summary


@dataclass
class FoldModel:
    name: str
    module: FungiClassifier
    checkpoint: Path
    val_rows: Rows


def _label_space(df20: pd.DataFrame, df21: pd.DataFrame) -> list[int]:
    known = sorted(int(c) for c in df20["class_id"].unique() if c != UNKNOWN)
    if not known:  # nothing to learn: every prediction would be "unknown"
        raise DatasetFormatError("DF20 (dataset.train_csv) has no image of a known species")
    return known + ([UNKNOWN] if (df21["class_id"] == UNKNOWN).any() else [])


def _targets(
    rows: Rows, index_of: dict[int, int], vocab: dict[str, dict[str, int]], poisonous: set[int]
) -> dict[str, np.ndarray]:
    frame = rows.frame
    out = {
        "species": frame["class_id"].map(index_of).fillna(-1).astype(np.int64).to_numpy(),
        "poisonous": frame["class_id"].isin(poisonous).astype(np.int64).to_numpy(),
    }
    for level, mapping in vocab.items():
        values = frame[level] if level in frame else pd.Series([None] * len(frame))
        out[level] = values.map(mapping).fillna(IGNORE).astype(np.int64).to_numpy()
    return out


def _fit_folds(cfg, data, df21_rows, encoder, poisonous, run: RunContext, callbacks):
    summary = run.summary
    species_ids = _label_space(data["DF20"].frame, df21_rows.frame)
    index_of = {s: i for i, s in enumerate(species_ids)}
    vocab = {
        level: {
            v: i
            for i, v in enumerate(sorted(data["DF20"].frame[level].dropna().astype(str).unique()))
        }
        for level in ("genus", "family")
        if level in data["DF20"].frame
    }
    aux_sizes = {"poisonous": 1, **{k: len(v) for k, v in vocab.items()}}
    poison_idx = sorted(index_of[c] for c in poisonous if c in index_of)
    folds = []
    for fold in range(1, cfg.dataset.n_folds):
        name = f"fold{fold}"
        split = df21_rows.frame["split"].to_numpy()
        extra = df21_rows.take((split != "test") & (split != name))
        train_rows = _labelled(_concat_rows(data["DF20"], extra), index_of)
        val_rows = _labelled(df21_rows.take(split == name), index_of)
        train_t = _targets(train_rows, index_of, vocab, poisonous)
        val_t = _targets(val_rows, index_of, vocab, poisonous)
        counts = np.bincount(train_t["species"], minlength=len(species_ids)).tolist()
        module = fold_module(
            cfg,
            embed_dim=train_rows.embedding.shape[1],
            meta_groups=encoder.groups,
            species_ids=species_ids,
            class_counts=counts,
            poisonous_classes=poison_idx,
            aux_sizes=aux_sizes,
            context={
                "backbone": to_container(cfg.backbone),
                "features": to_container(cfg.features),
                "encoder": encoder.state(),
                "genus_vocab": vocab.get("genus"),
                "cache_keys": summary["cache_keys"],
            },
        )
        train_set = RowsDataset(train_rows, train_t)
        sampler = None
        if cfg.sampler == "val_distribution":
            weights = validation_matching_weights(
                train_t["species"], val_t["species"], len(species_ids)
            )
            sampler = WeightedRandomSampler(weights, len(weights))
        loader = batch_loader(train_set, cfg.head.batch_size, shuffle=True, sampler=sampler)
        val_loader = batch_loader(RowsDataset(val_rows, val_t), 4096)
        fold_dir = run.run_dir / "checkpoints" / name
        trainer = build_trainer(cfg, run, fold_dir, cfg.fit.monitor, cfg.fit.mode, callbacks)
        log.info(
            "%s: training on %d images, validating on %d",
            name,
            len(train_rows.frame),
            len(val_rows.frame),
        )
        with run.tracker.scope(name, fold=name):  # W&B `fold1/train/loss`, CSV column `fold`
            trainer.fit(module, loader, val_loader)
        best = trained_checkpoint(trainer, fold_dir)
        folds.append(FoldModel(name, load_lightning_module(FungiClassifier, best), best, val_rows))
        summary.setdefault("folds", {})[name] = {
            "checkpoint": str(best),
            "train_images": len(train_rows.frame),
            "val_images": len(val_rows.frame),
        }
    summary["species_ids"] = species_ids
    return folds


def _labelled(rows: Rows, index_of: dict[int, int]) -> Rows:
    """Rows whose class is in the label space (DF21 species unseen in DF20 are -1, which is in
    it when DF21 has unknowns)."""
    return rows.take(rows.frame["class_id"].isin(index_of.keys()).to_numpy())


def _concat_rows(a: Rows, b: Rows) -> Rows:
    return Rows(
        pd.concat([a.frame, b.frame], ignore_index=True),
        np.concatenate([a.embedding, b.embedding]),
        np.concatenate([a.metadata, b.metadata]),
    )


def _observation_predictions(logits_per_model, rows: Rows, species_ids, average, threshold):
    probs = ensemble_probabilities(logits_per_model, average)
    obs_ids, obs_probs = aggregate_by_observation(rows.frame["observationID"].to_numpy(), probs)
    return obs_ids, obs_probs, predict_with_open_set(obs_probs, species_ids, threshold)


def _truth(rows: Rows) -> dict[int, int]:
    first = rows.frame.groupby("observationID")["class_id"].first()
    return {int(k): int(v) for k, v in first.items()}


def _ensemble_and_score(
    cfg, folds, data, df21_rows, poisonous, test_observations, test_truth, run_dir, tracker, summary
):
    species_ids = summary["species_ids"]
    average = cfg.ensemble.average
    threshold = cfg.ensemble.open_set_threshold
    if threshold == "tune":  # on out-of-fold validation predictions: no test data involved
        oof_ids, oof_probs, oof_truth = [], [], []
        for fold in folds:
            logits = fold.module.predict_logits(fold.val_rows.embedding, fold.val_rows.metadata)
            ids, probs = aggregate_by_observation(
                fold.val_rows.frame["observationID"].to_numpy(), softmax(logits, axis=1)
            )
            truth = _truth(fold.val_rows)
            oof_ids += ids.tolist()
            oof_probs.append(probs)
            oof_truth += [truth[i] for i in ids]
        track = int(cfg.ensemble.tune_track)
        threshold, score = tune_entropy_threshold(
            np.concatenate(oof_probs),
            species_ids,
            np.asarray(oof_truth),
            track=track,
            poisonous=poisonous,
        )
        summary["open_set"] = {
            "tuned_threshold": threshold,
            "tune_track": track,
            f"oof_track{track}": score,
        }
        log.info("open set: entropy threshold %s minimises out-of-fold Track %d", threshold, track)
    held_out = df21_rows.take(df21_rows.frame["split"].to_numpy() == "test")
    truth = _truth(held_out)
    results = {}
    members = {f.name: [f] for f in folds}
    members["ensemble"] = folds  # last: the views below use its predictions
    for name, models in members.items():
        logits = [m.module.predict_logits(held_out.embedding, held_out.metadata) for m in models]
        obs_ids, _, pred = _observation_predictions(
            logits, held_out, species_ids, average, threshold
        )
        results[name] = fungiclef_scores(
            truth, dict(zip(obs_ids.tolist(), pred.tolist())), poisonous
        )
    summary["held_out_scores"] = results
    summary.setdefault("metrics", {}).update(numeric_metrics(results, "held_out/"))
    _log_views(cfg, held_out, truth, obs_ids, pred, poisonous, run_dir, tracker, summary)
    # the parent run's scores: `held_out/ensemble/track1` (= the summary's metrics, so the
    # experiment's optimized_metric has the same name in W&B) and each fold head's
    tracker.log_metrics(numeric_metrics(results, "held_out/"))
    tracker.log_table(
        "held_out_scores",
        ["model", *results["ensemble"]],
        [[n, *r.values()] for n, r in results.items()],
    )
    log.info("held-out DF21 third: %s", results["ensemble"])
    if "test" in data:
        rows = data["test"]
        logits = [f.module.predict_logits(rows.embedding, rows.metadata) for f in folds]
        obs_ids, _, pred = _observation_predictions(logits, rows, species_ids, average, threshold)
        predictions = dict(zip(obs_ids.tolist(), pred.tolist()))
        # an observation whose images were all unreadable still gets a row (unknown), counted
        unseen = sorted(set(test_observations) - set(predictions))
        predictions.update({obs: UNKNOWN for obs in unseen})
        summary["test_observations_without_images"] = {
            "count": len(unseen),
            "examples": unseen[:100],
        }
        submission = write_fungiclef_submission(predictions, run_dir / "submission.csv")
        summary["submission"] = str(submission)
        if test_truth is not None:
            scores = fungiclef_scores(test_truth, predictions, poisonous)
            summary["scores"] = scores
            summary.setdefault("metrics", {}).update(numeric_metrics(scores, "test/"))
            write_json(run_dir / "scores.json", scores)
            tracker.log_metrics({f"test/{k}": v for k, v in scores.items() if v is not None})
            log.info("official test: %s", scores)
        else:
            log.info(
                "no test ground truth at %s (dataset.test_ground_truth): submission written, "
                "not scored",
                cfg.dataset.test_ground_truth,
            )
    else:
        log.warning(
            "no public-test CSV at %s (dataset.test_csv): no submission written",
            cfg.dataset.test_csv,
        )


def _log_views(cfg, held_out: Rows, truth, obs_ids, pred, poisonous, run_dir, tracker, summary):
    """Poisonous/edible confusion, the worst classes' F1 and an embedding map (ensemble)."""
    y_true = np.array([truth[i] for i in obs_ids.tolist()])
    confusion = poison_confusion(y_true, pred, poisonous)
    summary["held_out_poison_confusion"] = {"rows=truth(edible,poisonous)": confusion.tolist()}
    tracker.log_table(
        "poison_confusion",
        ["truth", "predicted edible", "predicted poisonous"],
        [["edible", *confusion[0]], ["poisonous", *confusion[1]]],
    )
    worst = sorted(per_class_f1(y_true, pred).items(), key=lambda kv: (kv[1][0], -kv[1][1]))
    tracker.log_table(
        "worst_classes_f1",
        ["class_id", "f1", "support"],
        [[c, round(f, 4), n] for c, (f, n) in worst[: cfg.report.worst_classes]],
    )
    image = embedding_map_png(
        held_out.embedding,
        held_out.frame["class_id"].to_numpy(),
        run_dir / "embedding_map.png",
        cfg.report.embedding_map,
    )
    if image is not None:
        tracker.log_image("embedding_map", image)


PIPELINE = Pipeline("fungiclef", validate=validate_fungiclef, train=train_fungiclef)
