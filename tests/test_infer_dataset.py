"""`infer.py ckpt_path=...` scores on the dataset the checkpoint was trained on, and refuses a
ground truth whose species the checkpoint does not know."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import compose_config
from tests.test_pipeline import _train_cfg
from vitlab.data.plantclef import write_submission
from vitlab.errors import ConfigError
from vitlab.pipelines.plantclef import infer, load_head_module, train


@pytest.fixture(scope="module")
def trained_elsewhere(tiny_plantclef, tmp_path_factory):
    """A run trained on a dataset that is not the default one (as real data would be)."""
    root = tmp_path_factory.mktemp("real")
    summary = train(_train_cfg(root, tiny_plantclef, "trainer.max_epochs=8"))
    return root, summary


def test_infer_with_only_a_checkpoint_uses_the_runs_dataset(trained_elsewhere, tmp_path, caplog):
    root, summary = trained_elsewhere
    cfg = compose_config(
        "infer", ["logger=csv", f"ckpt_path={summary['best_checkpoint']}"], tmp_path
    )
    with caplog.at_level(logging.INFO, logger="vitlab.pipelines.plantclef"):
        result = infer(cfg)
    assert result["scores"] == pytest.approx(summary["scores"])  # same plots, same truth
    assert not (tmp_path / "data").exists()  # the synthetic default was not generated
    assert "dataset of the checkpoint's run" in caplog.text


def test_runs_without_a_recorded_dataset_read_the_runs_hydra_config(
    trained_elsewhere, tiny_plantclef, tmp_path, monkeypatch
):
    """Checkpoints from before the dataset was recorded: the run's .hydra/config.yaml says it."""
    import vitlab.pipelines.plantclef.pipeline as run_module

    root, summary = trained_elsewhere
    original = run_module.load_head_module

    def without_dataset(path):
        module = original(path)
        module.hparams.context.pop("dataset")
        return module

    monkeypatch.setattr(run_module, "load_head_module", without_dataset)
    hydra_dir = root / "run" / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    (hydra_dir / "config.yaml").write_text(
        f"dataset:\n  root: {tiny_plantclef}\n"
        f"  test_images_dir: {tiny_plantclef}/PlantCLEF2024test\n"
        f"  test_ground_truth: {tiny_plantclef}/test_ground_truth.csv\n"
    )
    cfg = compose_config(
        "infer", ["logger=csv", f"ckpt_path={summary['best_checkpoint']}"], tmp_path
    )
    assert infer(cfg)["scores"] == pytest.approx(summary["scores"])


def test_dataset_on_the_command_line_wins(trained_elsewhere, tiny_plantclef, tmp_path):
    root, summary = trained_elsewhere
    truth = tmp_path / "truth.csv"
    write_submission({f"SYNTH-QUADRAT-{i:04d}": [1 + i % 2] for i in range(4)}, truth)
    cfg = compose_config(
        "infer",
        [
            "logger=csv",
            f"ckpt_path={summary['best_checkpoint']}",
            f"dataset.root={tiny_plantclef}",
            "dataset.synthetic=null",
            f"dataset.test_ground_truth={truth}",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError, match="share none of the 2 species"):
        infer(cfg)
    assert not (tmp_path / "run" / "submission.csv").exists()  # refused before any work


def test_little_overlap_is_a_loud_warning(trained_elsewhere, tiny_plantclef, tmp_path, caplog):
    root, summary = trained_elsewhere
    species = load_head_module(Path(summary["best_checkpoint"])).species_ids
    truth = tmp_path / "truth.csv"
    plots = {f"SYNTH-QUADRAT-{i:04d}": [1, 2, 3] for i in range(4)}
    plots["SYNTH-QUADRAT-0000"].append(species[0])
    write_submission(plots, truth)
    overrides = ["logger=csv", f"ckpt_path={summary['best_checkpoint']}"]
    cfg = compose_config("infer", [*overrides, f"dataset.test_ground_truth={truth}"], tmp_path)
    with open_dict(cfg):
        cfg.dataset.root = str(tiny_plantclef)
        cfg.dataset.synthetic = None
    with caplog.at_level(logging.WARNING):
        infer(cfg)
    assert "knows only 25% of the 4 species" in caplog.text
