"""What a researcher reads in W&B and the run folders: the Hydra config intact, the module's
hyperparameters apart, run names from the overrides, FungiCLEF's folds apart (W&B prefixes, a
CSV `fold` column), checkpoints as artifacts, sweep trial folders that say what they ran, and
`logger=many`. W&B runs offline here and is read back from its transaction log."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import yaml

import vitlab.tracking as tracking
from tests.conftest import compose_config
from tests.test_fungiclef_pipeline import FAST as FUNGI_FAST
from tests.test_pipeline import FAST
from tests.wandb_records import offline_runs
from vitlab.errors import ConfigError
from vitlab.run_tables import format_table, multirun_table

SHORT = [o for o in FAST if o != "logger=csv" and not o.startswith("trainer.max_epochs")]


@pytest.fixture
def offline_wandb(monkeypatch):
    """W&B offline for one test (the tracker sets WANDB_MODE; monkeypatch restores it)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_run_holds_the_hydra_config_intact(tiny_plantclef, tmp_path, offline_wandb):
    from vitlab.pipelines.plantclef import train

    short = [o for o in SHORT if not o.startswith("head.batch_size")]
    cfg = compose_config(
        "train",
        ["head.batch_size=16", *short, "trainer.max_epochs=2", f"dataset.root={tiny_plantclef}"],
        tmp_path,
    )
    train(cfg)
    (run,) = offline_runs(tmp_path / "run")
    # the CLI-overridden key, in Hydra's own group, not replaced by the module's `head`
    assert run.config["head"]["batch_size"] == 16
    assert run.config["head"]["model"]["_target_"] == "vitlab.models.heads.LinearHead"
    assert run.config["loss"] == {"_target_": "torch.nn.NLLLoss"}
    assert run.config["optimizer"]["lr"] == 1e-2 and run.config["seed"] == 42
    assert "hydra" not in run.config
    # the LightningModule's hyperparameters: their own key
    assert run.config["module"]["in_features"] > 0 and "species_ids" in run.config["module"]
    # the name: the overrides as typed, without paths
    assert run.name.startswith("head.batch_size=16,") and "dataset.root" not in run.name
    assert run.group == "quickstart_plantclef"
    # best.ckpt as the model artifact, recorded in the offline run
    (model,) = [a for a in run.artifacts if a["type"] == "model"]
    assert sorted(model["aliases"]) == ["best", "latest"]
    assert model["metadata"]["original_filename"] == "best.ckpt"
    assert "train/loss" in run.summary and "test/macro_f1_per_plot" in run.summary


def test_run_names_come_from_the_overrides(tmp_path):
    overrides = [
        "optimizer.lr=0.0012345678",
        "loss=focal",
        "+optimizer.amsgrad=true",
        "dataset.root=/data/PlantCLEF2024",
        "paths.cache_dir=/shared/cache",
        "logger.wandb.mode=offline",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    assert tracking.run_name(cfg) == "optimizer.lr=0.001235,loss=focal,optimizer.amsgrad=true"
    cfg = compose_config("train", ["optimizer.lr=1", *overrides], tmp_path)  # the last one wins
    assert tracking.run_name(cfg) == "optimizer.lr=0.001235,loss=focal,optimizer.amsgrad=true"
    cfg = compose_config("train", [*overrides, "logger.wandb.name=mine"], tmp_path)
    assert tracking.run_name(cfg) == "mine"
    cfg = compose_config("train", ["experiment=quickstart_fungiclef"], tmp_path)
    assert tracking.run_name(cfg) == "experiment=quickstart_fungiclef"
    cfg = compose_config("train", [], tmp_path)
    assert tracking.run_name(cfg) == "quickstart_plantclef"  # no override: the experiment


@pytest.fixture(scope="module")
def tiny_fungi_data(tmp_path_factory):
    from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef

    spec = FungiSyntheticSpec(seed=2, n_species=8, n_unknown=2, max_observations=10)
    return generate_fungiclef(tmp_path_factory.mktemp("fungi") / "data", spec)


def test_fungiclef_folds_log_apart(tiny_fungi_data, tmp_path, offline_wandb):
    """One W&B run per experiment; each fold's curves under `foldN/`, the ensemble's and each
    fold's held-out scores in the same run; the CSV has a `fold` column."""
    from vitlab.pipelines.fungiclef import train_fungiclef

    fast = [o for o in FUNGI_FAST if o != "logger=csv" and not o.startswith("trainer.max_")]
    extra = ["trainer.max_epochs=2", "report.embedding_map=none", "head.batch_size=48"]
    cfg = compose_config("train", [*fast, *extra, f"dataset.root={tiny_fungi_data}"], tmp_path)
    summary = train_fungiclef(cfg)
    (run,) = offline_runs(tmp_path / "run")
    keys = {k for row in run.history for k in row}
    for fold in ("fold1", "fold2"):
        assert {f"{fold}/train/loss", f"{fold}/val/loss", f"{fold}/epoch"} <= keys
        assert f"{fold}/module" in run.config
    assert not {"train/loss", "val/loss", "epoch"} & keys  # no curve restarts under one key
    metric = cfg.optimized_metric  # held_out/ensemble/macro_f1: the same name as summary.json
    assert run.summary[metric] == pytest.approx(summary["metrics"][metric])
    assert "held_out/fold1/track1" in run.summary
    assert run.config["head"]["batch_size"] == 48
    models = sorted(a["name"].rsplit("-", 1)[1] for a in run.artifacts if a["type"] == "model")
    assert models == ["fold1", "fold2"]
    metrics = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    epochs = metrics.dropna(subset=["train/loss"])
    assert sorted(epochs["fold"].unique()) == ["fold1", "fold2"]
    assert (epochs.groupby("fold")["epoch"].max() == 1).all()
    assert metrics.loc[metrics[metric].notna(), "fold"].isna().all()  # the ensemble: no fold


def test_logger_many_refused_without_tensorboard(tiny_plantclef, tmp_path, monkeypatch):
    from vitlab.pipelines.plantclef import train

    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    cfg = compose_config(
        "train", [*FAST, "logger=many", f"dataset.root={tiny_plantclef}"], tmp_path
    )
    assert cfg.logger.wandb.project == "vitlab" and cfg.logger.tensorboard is not None
    with pytest.raises(ConfigError, match="logger.tensorboard: .*`tensorboard` package"):
        train(cfg)
    assert not (tmp_path / "cache").exists()  # before any work


@pytest.mark.skipif(not tracking.tensorboard_available(), reason="tensorboard not installed")
def test_logger_many_writes_wandb_csv_and_tensorboard(tiny_plantclef, tmp_path, offline_wandb):
    from vitlab.pipelines.plantclef import train

    cfg = compose_config(
        "train",
        [*SHORT, "trainer.max_epochs=2", "logger=many", f"dataset.root={tiny_plantclef}"],
        tmp_path,
    )
    train(cfg)
    run_dir = tmp_path / "run"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "csv" / "metrics.csv").is_file()
    (run,) = offline_runs(run_dir)
    assert "val/loss" in run.summary


def test_multirun_table_reads_the_job_folders(tmp_path):
    for job, (lr, value, status) in enumerate([("1e-3", 0.5, "completed"), ("1e-2", 0.75, None)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        overrides = [f"optimizer.lr={lr}", "trainer.max_epochs=2"]
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / ".hydra" / "config.yaml").write_text("optimized_metric: val/macro_f1\n")
        if status:
            summary = {"status": status, "metrics": {"val/macro_f1": value}}
            (folder / "summary.json").write_text(json.dumps(summary))
    columns, rows = multirun_table(tmp_path)
    assert columns == ["job", "optimizer.lr", "val/macro_f1", "status"]  # common keys left out
    assert rows == [["0", "1e-3", 0.5, "completed"], ["1", "1e-2", None, "no summary.json"]]
    assert "val/macro_f1" in format_table(columns, rows).splitlines()[0]


def test_sweep_trial_folders_and_rerun_of_a_finished_study(
    tiny_plantclef, tmp_path, capsys, caplog, offline_wandb
):
    """Each trial folder holds its config, overrides and log; `trials.csv` lists every trial;
    rerunning a finished study opens no W&B run."""
    from sweep import run_sweep

    caplog.set_level(logging.INFO)  # as sweep.py sets it

    args = [
        *[o for o in SHORT if not o.startswith("optimizer.lr")],
        "trainer.max_epochs=1",
        "logger.wandb.mode=offline",
        "logger.wandb.log_model=false",
        f"dataset.root={tiny_plantclef}",
        f"paths.root_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        "sweep=quickstart_head",
        "sweep.n_trials=2",
    ]
    study = run_sweep(args)
    sweep_dir = tmp_path / "sweeps" / study.study_name
    for trial in study.trials:
        folder = sweep_dir / f"trial_{trial.number:04d}"
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        assert config["head"]["batch_size"] == trial.params["head.batch_size"]
        assert f"head.batch_size={trial.params['head.batch_size']}" in overrides
        assert f"dataset.root={tiny_plantclef}" in overrides
        assert "hydra" in yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        assert "vitlab" in (folder / "train.log").read_text()
        (run,) = offline_runs(folder)
        assert run.name.startswith(f"trial_{trial.number:04d} ") and run.group == study.study_name
    table = pd.read_csv(sweep_dir / "trials.csv")
    assert list(table["trial"]) == [0, 1] and set(table["state"]) == {"COMPLETE"}
    assert table["val_images/macro_f1"].tolist() == pytest.approx([t.value for t in study.trials])
    assert "head.batch_size" in table.columns
    assert "trial_0001" in capsys.readouterr().out  # the console table
    runs_before = sorted(p.name for p in tmp_path.rglob("offline-run-*"))
    assert len(runs_before) == 3  # two trials + the study's summary run
    run_sweep(args)  # the study is finished: nothing runs, nothing is opened
    assert sorted(p.name for p in tmp_path.rglob("offline-run-*")) == runs_before


def test_segmentation_overlays_are_one_key_of_mask_images(tmp_path, offline_wandb):
    """`log_masks`: W&B's mask overlay (prediction + ground truth with class names) for every
    overlaid sample under one key, not one image key per sample."""
    import numpy as np
    from omegaconf import OmegaConf

    from vitlab.tracking import MaskedImage, RunTracker

    logger = OmegaConf.create(
        {"wandb": {"mode": "offline", "project": "p", "group": None, "tags": [], "name": "seg"}}
    )
    tracker = RunTracker(logger, tmp_path, "segmentation", OmegaConf.create({"a": 1}))
    rng = np.random.default_rng(0)
    items = [
        MaskedImage(
            rng.integers(0, 255, (12, 16, 3), dtype=np.uint8),
            rng.integers(0, 3, (12, 16)).astype(np.uint8),
            np.full((12, 16), 255 if i else 1, dtype=np.uint8),
            f"sample{i}",
        )
        for i in range(3)
    ]
    tracker.log_masks("overlays", items, {0: "background", 1: "cat", 2: "car", 255: "ignore"})
    tracker.finish()
    (run,) = offline_runs(tmp_path)
    (row,) = [r for r in run.history if any(k.startswith("overlays") for k in r)]
    assert row["overlays/_type"] == "images/separated" and row["overlays/count"] == 3
    masks = row["overlays/all_masks"]
    assert len(masks) == 3 and {"prediction", "ground_truth"} <= set(masks[0])
    assert not [k for k in row if k.startswith("overlays/sample")]
