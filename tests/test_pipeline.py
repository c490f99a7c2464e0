"""The quickstart end to end on a tiny synthetic dataset: train -> infer -> score."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import vitlab.stages.embed as embed_module
from tests.conftest import TINY_PLANTCLEF_RUN, compose_config
from vitlab.data.plantclef import read_submission
from vitlab.errors import DatasetFormatError
from vitlab.pipelines.plantclef import infer, train

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "logger=csv",
    "trainer.max_epochs=25",
    "head.batch_size=32",
    "optimizer.lr=1e-2",
    *TINY_PLANTCLEF_RUN,
    "fit.early_stopping_patience=0",
]


def _train_cfg(root: Path, data: Path, *extra: str):
    return compose_config("train", [*FAST, f"dataset.root={data}", *extra], root)


@pytest.fixture(scope="module")
def trained(tiny_plantclef, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    summary = train(_train_cfg(root, tiny_plantclef))
    return root, summary


def test_train_writes_run_directory(trained, tiny_plantclef):
    root, summary = trained
    run = root / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["best_checkpoint"] == summary["best_checkpoint"]
    assert set(on_disk["cache_keys"]) == {"prepare", "embed", "tiles"}
    assert (Path(summary["best_checkpoint"]).parent / "label_map.json").is_file()
    assert (run / "csv" / "metrics.csv").is_file()
    assert (run / "per_plot_predictions.csv").is_file() and (run / "per_species_f1.png").is_file()
    submission = read_submission(run / "submission.csv")
    truth = read_submission(tiny_plantclef / "test_ground_truth.csv")
    assert set(submission) == set(truth)
    # a working pipeline scores well on the synthetic plots (chance is far below this)
    assert summary["scores"]["macro_f1_per_plot"] > 0.6, summary["scores"]
    assert summary["fit_metrics"]["val_images/acc"] > 0.6, summary["fit_metrics"]
    assert on_disk["stage_seconds"]["embed"] >= 0


def test_infer_reproduces_train_predictions(trained, tiny_plantclef, tmp_path):
    root, summary = trained
    cfg = compose_config(
        "infer",
        [
            "logger=csv",
            f"dataset.root={tiny_plantclef}",
            "dataset.synthetic=null",
            f"ckpt_path={summary['best_checkpoint']}",
        ],
        tmp_path,
    )
    result = infer(cfg)
    assert result["scores"] == pytest.approx(summary["scores"])
    assert (tmp_path / "run" / "submission.csv").read_text() == (
        root / "run" / "submission.csv"
    ).read_text()


def test_second_run_hits_the_embed_cache(trained, tiny_plantclef, monkeypatch):
    root, first = trained
    calls = []
    original = embed_module.embed_pixels
    monkeypatch.setattr(embed_module, "embed_pixels", lambda *a: calls.append(1) or original(*a))
    summary = train(_train_cfg(root, tiny_plantclef, "optimizer.lr=5e-3"))
    assert calls == []  # no backbone forward in the embed stage
    assert summary["cache_keys"] == first["cache_keys"]
    # a different feature reducer is a different cache entry and does run the backbone
    train(_train_cfg(root, tiny_plantclef, "features=mean_patch", "trainer.max_epochs=1"))
    assert calls


def test_corrupt_images_are_skipped_counted_and_reported(tiny_plantclef, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_plantclef, data)
    train_image = sorted((data / "images_max_side_800" / "train").rglob("*.jpg"))[0]
    train_image.write_bytes(train_image.read_bytes()[:100])  # truncated JPEG
    quadrat = sorted((data / "PlantCLEF2024test").glob("*.jpg"))[0]
    quadrat.write_bytes(b"garbage")
    summary = train(_train_cfg(tmp_path, data, "trainer.max_epochs=2"))
    assert summary["prepare_report"]["corrupt_images"] == 1
    assert summary["prepare_report"]["corrupt_examples"] == [train_image.name]
    assert summary["predict_report"]["skipped_images"] == 1
    submission = read_submission(tmp_path / "run" / "submission.csv")
    assert submission[quadrat.stem] == [] and len(submission) == 4


def test_missing_column_and_empty_test_folder_fail_clearly(tiny_plantclef, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_plantclef, data)
    csv = data / "PlantCLEF2024_single_plant_training_metadata.csv"
    frame = pd.read_csv(csv, sep=";")
    frame.drop(columns=["species_id"]).to_csv(csv, sep=";", index=False)
    with pytest.raises(DatasetFormatError, match="species_id"):
        train(_train_cfg(tmp_path, data))
    frame.to_csv(csv, sep=";", index=False)
    for quadrat in (data / "PlantCLEF2024test").glob("*.jpg"):
        quadrat.unlink()
    with pytest.raises(DatasetFormatError, match="contains no images"):
        train(_train_cfg(tmp_path, data))
    assert not (tmp_path / "cache").exists()  # failed before any work


def test_cli_multirun(tiny_plantclef, tmp_path):
    """`python train.py --multirun optimizer.lr=...` runs one job per value, each with a summary."""
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--multirun",
        "optimizer.lr=1e-3,1e-2",
        *[o for o in FAST if not o.startswith(("trainer.max_epochs", "optimizer.lr"))],
        "trainer.max_epochs=2",
        f"dataset.root={tiny_plantclef}",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    env_root = {"VITLAB_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    out = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env_root},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted((tmp_path / "multirun").glob("*/summary.json"))
    assert len(summaries) == 2
    lrs = {json.loads(s.read_text())["fit_metrics"]["val/loss"] for s in summaries}
    assert len(lrs) == 2  # two different trainings
    # the Hydra callback's table: what differs between the jobs and the optimised metric
    table = pd.read_csv(tmp_path / "multirun" / "multirun_results.csv")
    assert list(table.columns) == ["job", "optimizer.lr", "val_images/macro_f1", "status"]
    assert list(table["optimizer.lr"]) == [1e-3, 1e-2] and set(table["status"]) == {"completed"}
    assert "val_images/macro_f1" in out.stdout  # and on the console


def test_cli_bad_override_exits_with_message(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "inference.grid_size=0", "logger=csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "inference.grid_size" in out.stdout + out.stderr


def test_streaming_loader_trains_like_the_in_memory_one(trained, tiny_plantclef):
    root, first = trained
    summary = train(_train_cfg(root, tiny_plantclef, "fit.loader=streaming"))
    assert summary["fit_data"]["loader"] == "streaming"
    assert summary["fit_data"]["images_train"] == first["fit_data"]["images_train"]
    assert summary["fit_metrics"]["val_images/acc"] > 0.6
    assert summary["scores"]["macro_f1_per_plot"] > 0.6
