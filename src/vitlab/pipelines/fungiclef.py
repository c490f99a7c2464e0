"""The FungiCLEF pipeline behind `train.py pipeline=fungiclef`: config in, summary out.

(generate) -> prepare + embed every image (DF20, DF21, test) -> DF21 split into the held-out
test third and folds -> one head per fold (trained on DF20 + the other folds, validated on its
fold) -> ensemble of the fold heads with the open-set rule -> per-observation predictions ->
submission + official scores (held-out third always; official test when its truth exists).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.special import softmax
from torch.utils.data import DataLoader, WeightedRandomSampler

from vitlab.cache import directory_fingerprint, file_sha256
from vitlab.callbacks import trained_checkpoint
from vitlab.config import (
    require_choice,
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
from vitlab.data.shards import ShardedStage, arrow_to_embeddings
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.errors import ConfigError, DatasetFormatError
from vitlab.inference.fungiclef import (
    AVERAGES,
    TUNE_TRACKS,
    ensemble_probabilities,
    predict_with_open_set,
    tune_entropy_threshold,
)
from vitlab.losses import LabelStats, check_loss_input
from vitlab.losses.multilabel import is_multilabel
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
    build_trainer,
    embedding_components,
    ensure_generated,
    numeric_metrics,
    prepare_run,
    validate_embedding_training,
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
    """Checks that need no work, naming the key and the allowed values (the shared ones:
    `validate_embedding_training`; FungiCLEF cannot resume a run)."""
    validate_embedding_training(cfg, resume_supported=False)
    require_choice(cfg, "sampler", SAMPLERS)
    require_choice(cfg, "ensemble.average", AVERAGES)
    require_choice(cfg, "ensemble.tune_track", TUNE_TRACKS)
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
    if is_multilabel(module.loss_fn):
        raise ConfigError(
            f"loss._target_={cfg.loss.get('_target_')} is a multi-label loss (a sigmoid per "
            "species, for PlantCLEF's collages); FungiCLEF observations have one species: use "
            "loss=ce|weighted_ce|focal|seesaw|seesaw_poison"
        )
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


@dataclass
class Listing:
    """The dataset as listed, read and checked before any work (a bad file fails before the
    run folder is written): the splits, the image work for prepare and what the run records."""

    parts: dict[str, Part]
    poisonous: set[int]
    test_truth: dict[int, int] | None
    test_observations: list[int]
    work: pd.DataFrame
    missing_report: dict[str, dict[str, Any]]
    run_fields: dict[str, Any]

    def skipped_images(self) -> dict[str, Any]:
        """The missing images for prepare's report: their count and the first names."""
        names = [
            f"{name}/{image}"
            for name, report in self.missing_report.items()
            for image in report["missing_examples"]
        ]
        return {
            "missing_images": sum(r["missing"] for r in self.missing_report.values()),
            "missing_examples": names[:REPORT_LIST_LIMIT],
        }


def list_splits(cfg: DictConfig) -> Listing:
    """Read DF20, DF21, the public test (when its CSV exists), the poison list and the test
    truth, and find each split's images, so every input problem fails before any work."""
    ds = cfg.dataset
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
    run_fields = {"missing_images": missing_report, **(no_test if test is None else {})}
    return Listing(
        parts, poisonous, test_truth, test_observations, work, missing_report, run_fields
    )


def _cache_key_parts(ds: DictConfig, with_test: bool) -> list[str]:
    """What the prepare cache key reads: the CSVs' contents and the image folders' files."""
    key_parts = [
        file_sha256(ds.train_csv),
        file_sha256(ds.val_csv),
        directory_fingerprint(ds.train_images_dir),
        directory_fingerprint(ds.val_images_dir),
    ]
    if with_test:
        key_parts += [file_sha256(ds.test_csv), directory_fingerprint(ds.test_images_dir)]
    return key_parts


def train_fungiclef(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> RunSummary:
    """embed (cached) -> one head per fold -> ensemble -> open-set rule -> scores; `callbacks`
    join every fold's Trainer (sweep.py's pruning)."""
    prepare_run(cfg)
    validate_fungiclef(cfg)
    parts = embedding_components(cfg)
    prepare_params = PrepareParams.from_config(cfg.prepare)
    ensure_fungi_dataset(cfg.dataset)
    listing = list_splits(cfg)
    with RunContext(cfg, "train", **listing.run_fields) as run:
        key_parts = _cache_key_parts(cfg.dataset, "test" in listing.parts)
        with run.stage("prepare"):
            prepared = prepare_images(
                listing.work,
                key_parts,
                cfg.paths.cache_dir,
                prepare_params,
                parts.engine,
                listing.skipped_images(),
            )
        embedded = parts.embed_and_record(run, prepared)
        data = load_fungi_data(cfg, run, listing, embedded)
        with run.stage("fit"):
            folds = fit_folds(cfg, run, data, callbacks)
        with run.stage("predict"):
            score_ensemble(cfg, run, data, folds)
    return run.summary


def _label_space(df20: pd.DataFrame, df21: pd.DataFrame) -> list[int]:
    known = sorted(int(c) for c in df20["class_id"].unique() if c != UNKNOWN)
    if not known:  # nothing to learn: every prediction would be "unknown"
        raise DatasetFormatError("DF20 (dataset.train_csv) has no image of a known species")
    return known + ([UNKNOWN] if (df21["class_id"] == UNKNOWN).any() else [])


@dataclass
class FungiData:
    """What fitting and scoring read: one `Rows` per split (only the images that were read;
    DF21 with its `split` column: `test` is the held-out third, `fold1`... the folds), the
    metadata encoder, the poison list and the public test's observations and truth.

    The label space (from DF20's and DF21's rows) is derived on first use, in the fit stage,
    so a DF20 without a known species fails that stage."""

    rows: dict[str, Rows]
    encoder: MetadataEncoder
    poisonous: set[int]
    test_observations: list[int]
    test_truth: dict[int, int] | None

    @cached_property
    def species_ids(self) -> list[int]:
        """DF20's known species, then unknown (-1) when DF21 has unknowns."""
        return _label_space(self.rows["DF20"].frame, self.rows["DF21"].frame)

    @cached_property
    def index_of(self) -> dict[int, int]:
        return {s: i for i, s in enumerate(self.species_ids)}

    @cached_property
    def vocab(self) -> dict[str, dict[str, int]]:
        """DF20's genus and family names -> index (the auxiliary targets)."""
        df20 = self.rows["DF20"].frame
        return {
            level: {v: i for i, v in enumerate(sorted(df20[level].dropna().astype(str).unique()))}
            for level in ("genus", "family")
            if level in df20
        }

    @property
    def aux_sizes(self) -> dict[str, int]:
        return {"poisonous": 1, **{k: len(v) for k, v in self.vocab.items()}}

    @property
    def poison_idx(self) -> list[int]:
        return sorted(self.index_of[c] for c in self.poisonous if c in self.index_of)

    @property
    def held_out(self) -> Rows:
        df21 = self.rows["DF21"]
        return df21.take(df21.frame["split"].to_numpy() == "test")

    def fold_rows(self, name: str) -> tuple[Rows, Rows]:
        """(train, validation) rows of fold `name`: DF20 + the other folds, and the fold; only
        rows whose class is in the label space."""
        df21 = self.rows["DF21"]
        split = df21.frame["split"].to_numpy()
        extra = df21.take((split != "test") & (split != name))
        train = _labelled(_concat_rows(self.rows["DF20"], extra), self.index_of)
        return train, _labelled(df21.take(split == name), self.index_of)

    def targets(self, rows: Rows) -> dict[str, np.ndarray]:
        """Species index (-1 outside the label space), poisonous flag, and genus/family index
        (IGNORE when unknown) per row."""
        frame = rows.frame
        out = {
            "species": frame["class_id"].map(self.index_of).fillna(-1).astype(np.int64).to_numpy(),
            "poisonous": frame["class_id"].isin(self.poisonous).astype(np.int64).to_numpy(),
        }
        for level, mapping in self.vocab.items():
            values = frame[level] if level in frame else pd.Series([None] * len(frame))
            out[level] = values.map(mapping).fillna(IGNORE).astype(np.int64).to_numpy()
        return out


def load_fungi_data(
    cfg: DictConfig, run: RunContext, listing: Listing, embedded: ShardedStage
) -> FungiData:
    """The listed splits joined to their embeddings and encoded metadata (DF20's vocabulary),
    DF21 split into the held-out third and folds; records the missing metadata per split."""
    vectors = _embeddings_by_name(embedded)
    encoder = MetadataEncoder().fit(listing.parts["DF20"].frame)
    rows, run.summary["metadata_missing"] = _encoded_rows(listing.parts, vectors, encoder)
    df21 = rows["DF21"]
    df21.frame["split"] = split_df21(
        df21.frame, cfg.dataset.n_folds, cfg.dataset.split_seed
    ).to_numpy()
    return FungiData(
        rows, encoder, listing.poisonous, listing.test_observations, listing.test_truth
    )


def _embeddings_by_name(embedded: ShardedStage) -> dict[str, np.ndarray]:
    table = embedded.read_table(["image_name", "embedding"])
    return dict(
        zip(
            table.column("image_name").to_pylist(),
            arrow_to_embeddings(table.column("embedding")),
        )
    )


def _encoded_rows(
    parts: dict[str, Part], vectors: dict[str, np.ndarray], encoder: MetadataEncoder
) -> tuple[dict[str, Rows], dict[str, dict[str, int]]]:
    """Each split's rows whose image was embedded (skipped images drop out, counted in the
    prepare report), and its missing metadata per column; a split left empty is an error."""
    data, meta_missing = {}, {}
    for name, part in parts.items():
        frame = part.frame
        names = name + "/" + frame["image_path"].astype(str)
        keep = names.isin(vectors.keys()).to_numpy()
        if not keep.any():  # every image of the split was missing or corrupt
            raise DatasetFormatError(
                f"{name}: no image listed in {part.csv} could be read from {part.folder} "
                f"({part.folder_key}); see summary.json/prepare_report"
            )
        frame = frame[keep].reset_index(drop=True)
        meta, meta_missing[name] = encoder.transform(frame)
        emb = np.stack([vectors[n] for n in names[keep]])
        data[name] = Rows(frame, emb, meta)
    return data, meta_missing


@dataclass
class FoldModel:
    """A fold's trained head, its best checkpoint and the rows it was validated on."""

    name: str
    module: FungiClassifier
    checkpoint: Path
    val_rows: Rows


def fit_folds(
    cfg: DictConfig, run: RunContext, data: FungiData, callbacks: Sequence[pl.Callback] = ()
) -> list[FoldModel]:
    """One head per fold (trained on DF20 + the other folds, validated on its fold; the
    held-out third is never seen), each loaded back from its best checkpoint with its
    validation rows (for tuning the open-set threshold out of fold)."""
    folds = [
        _fit_fold(cfg, run, data, f"fold{fold}", callbacks)
        for fold in range(1, cfg.dataset.n_folds)
    ]
    run.summary["species_ids"] = data.species_ids
    return folds


def _fit_fold(
    cfg: DictConfig,
    run: RunContext,
    data: FungiData,
    name: str,
    callbacks: Sequence[pl.Callback],
) -> FoldModel:
    """Train fold `name`'s head, keep its best checkpoint and record it in the summary."""
    train_rows, val_rows = data.fold_rows(name)
    train_t, val_t = data.targets(train_rows), data.targets(val_rows)
    counts = np.bincount(train_t["species"], minlength=len(data.species_ids)).tolist()
    module = fold_module(
        cfg,
        embed_dim=train_rows.embedding.shape[1],
        meta_groups=data.encoder.groups,
        species_ids=data.species_ids,
        class_counts=counts,
        poisonous_classes=data.poison_idx,
        aux_sizes=data.aux_sizes,
        context={
            "backbone": to_container(cfg.backbone),
            "features": to_container(cfg.features),
            "encoder": data.encoder.state(),
            "genus_vocab": data.vocab.get("genus"),
            "cache_keys": run.summary["cache_keys"],
        },
    )
    loader = _train_loader(cfg, train_rows, train_t, val_t["species"], len(data.species_ids))
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
    fold = FoldModel(name, load_lightning_module(FungiClassifier, best), best, val_rows)
    run.summary.setdefault("folds", {})[name] = {
        "checkpoint": str(best),
        "train_images": len(train_rows.frame),
        "val_images": len(val_rows.frame),
    }
    return fold


def _train_loader(
    cfg: DictConfig,
    rows: Rows,
    targets: dict[str, np.ndarray],
    val_species: np.ndarray,
    num_classes: int,
) -> DataLoader:
    """Shuffled batches of a fold's training rows; with `sampler=val_distribution` drawn so
    the classes follow the fold's validation distribution."""
    sampler = None
    if cfg.sampler == "val_distribution":
        weights = validation_matching_weights(targets["species"], val_species, num_classes)
        sampler = WeightedRandomSampler(weights, len(weights))
    return batch_loader(
        RowsDataset(rows, targets), cfg.head.batch_size, shuffle=True, sampler=sampler
    )


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


@dataclass
class Ensemble:
    """Fold heads as one predictor: their probabilities averaged (`ensemble.average`) per
    observation, over the label space, with the open-set rule."""

    folds: Sequence[FoldModel]
    species_ids: list[int]
    average: str
    threshold: float | None

    def predict(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """(observation ids, predicted class ids; -1 is unknown) for `rows`."""
        logits = [f.module.predict_logits(rows.embedding, rows.metadata) for f in self.folds]
        probs = ensemble_probabilities(logits, self.average)
        ids, obs_probs = aggregate_by_observation(rows.frame["observationID"].to_numpy(), probs)
        return ids, predict_with_open_set(obs_probs, self.species_ids, self.threshold)


def _truth(rows: Rows) -> dict[int, int]:
    first = rows.frame.groupby("observationID")["class_id"].first()
    return {int(k): int(v) for k, v in first.items()}


def score_ensemble(
    cfg: DictConfig, run: RunContext, data: FungiData, folds: Sequence[FoldModel]
) -> None:
    """Score every fold head and their ensemble on the held-out DF21 third (the run's
    metrics), then write the public test's submission and score it when its truth exists."""
    threshold = _open_set_threshold(cfg, run, data, folds)
    ensemble = Ensemble(folds, data.species_ids, cfg.ensemble.average, threshold)
    _score_held_out(cfg, run, data, ensemble)
    if "test" in data.rows:
        _predict_test(cfg, run, data, ensemble)
    else:
        log.warning(
            "no public-test CSV at %s (dataset.test_csv): no submission written",
            cfg.dataset.test_csv,
        )


def _open_set_threshold(
    cfg: DictConfig, run: RunContext, data: FungiData, folds: Sequence[FoldModel]
) -> float | None:
    """`ensemble.open_set_threshold`, or with `tune` the entropy threshold that minimises the
    tune track on out-of-fold validation predictions: no test data involved."""
    threshold = cfg.ensemble.open_set_threshold
    if threshold != "tune":
        return threshold
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
        data.species_ids,
        np.asarray(oof_truth),
        track=track,
        poisonous=data.poisonous,
    )
    run.summary["open_set"] = {
        "tuned_threshold": threshold,
        "tune_track": track,
        f"oof_track{track}": score,
    }
    log.info("open set: entropy threshold %s minimises out-of-fold Track %d", threshold, track)
    return threshold


def _score_held_out(cfg: DictConfig, run: RunContext, data: FungiData, ensemble: Ensemble) -> None:
    """Official scores of each fold head alone and of the ensemble, with the ensemble's views."""
    held_out = data.held_out
    truth = _truth(held_out)
    results = {}
    members = {f.name: replace(ensemble, folds=[f]) for f in ensemble.folds}
    members["ensemble"] = ensemble  # last: the views below use its predictions
    for name, member in members.items():
        obs_ids, pred = member.predict(held_out)
        results[name] = fungiclef_scores(
            truth, dict(zip(obs_ids.tolist(), pred.tolist())), data.poisonous
        )
    summary, tracker = run.summary, run.tracker
    summary["held_out_scores"] = results
    summary.setdefault("metrics", {}).update(numeric_metrics(results, "held_out/"))
    _log_views(cfg, run, held_out, truth, obs_ids, pred, data.poisonous)
    # the parent run's scores: `held_out/ensemble/track1` (= the summary's metrics, so the
    # experiment's optimized_metric has the same name in W&B) and each fold head's
    tracker.log_metrics(numeric_metrics(results, "held_out/"))
    tracker.log_table(
        "held_out_scores",
        ["model", *results["ensemble"]],
        [[n, *r.values()] for n, r in results.items()],
    )
    log.info("held-out DF21 third: %s", results["ensemble"])


def _predict_test(cfg: DictConfig, run: RunContext, data: FungiData, ensemble: Ensemble) -> None:
    """The ensemble's submission for the public test, scored when its truth exists."""
    summary = run.summary
    obs_ids, pred = ensemble.predict(data.rows["test"])
    predictions = dict(zip(obs_ids.tolist(), pred.tolist()))
    # an observation whose images were all unreadable still gets a row (unknown), counted
    unseen = sorted(set(data.test_observations) - set(predictions))
    predictions.update({obs: UNKNOWN for obs in unseen})
    summary["test_observations_without_images"] = {
        "count": len(unseen),
        "examples": unseen[:100],
    }
    submission = write_fungiclef_submission(predictions, run.run_dir / "submission.csv")
    summary["submission"] = str(submission)
    if data.test_truth is not None:
        scores = fungiclef_scores(data.test_truth, predictions, data.poisonous)
        summary["scores"] = scores
        summary.setdefault("metrics", {}).update(numeric_metrics(scores, "test/"))
        write_json(run.run_dir / "scores.json", scores)
        run.tracker.log_metrics({f"test/{k}": v for k, v in scores.items() if v is not None})
        log.info("official test: %s", scores)
    else:
        log.info(
            "no test ground truth at %s (dataset.test_ground_truth): submission written, "
            "not scored",
            cfg.dataset.test_ground_truth,
        )


def _log_views(
    cfg: DictConfig,
    run: RunContext,
    held_out: Rows,
    truth: dict[int, int],
    obs_ids: np.ndarray,
    pred: np.ndarray,
    poisonous: set[int],
) -> None:
    """Poisonous/edible confusion, the worst classes' F1 and an embedding map (ensemble)."""
    tracker = run.tracker
    y_true = np.array([truth[i] for i in obs_ids.tolist()])
    confusion = poison_confusion(y_true, pred, poisonous)
    run.summary["held_out_poison_confusion"] = {"rows=truth(edible,poisonous)": confusion.tolist()}
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
        run.run_dir / "embedding_map.png",
        cfg.report.embedding_map,
    )
    if image is not None:
        tracker.log_image("embedding_map", image)


PIPELINE = Pipeline("fungiclef", train=train_fungiclef, validate_train=validate_fungiclef)
