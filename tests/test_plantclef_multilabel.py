"""experiment=plantclef_multilabel through the normal entry points: collages cached with the
other stages, thresholds chosen on validation data and saved in the checkpoint, infer.py
applying the same rule, and the settings that cannot work refused before any stage."""

import json
import shutil

import pytest

from tests.conftest import TINY_PLANTCLEF_RUN, compose_config
from vitlab.errors import ConfigError
from vitlab.pipelines.plantclef import infer, train
from vitlab.safe_load import load_checkpoint_file

RECIPE = ["experiment=plantclef_multilabel", *TINY_PLANTCLEF_RUN, "trainer.max_epochs=3"]
FAST = ["logger=csv", "runtime.threads=1", "collages.per_image=0.5"]


def _train(root, data, *extra):
    return train(compose_config("train", [*RECIPE, *FAST, f"dataset.root={data}", *extra], root))


def test_the_recipe_trains_on_collages_and_infer_applies_the_saved_thresholds(
    tiny_plantclef, tmp_path
):
    summary = _train(tmp_path / "a", tiny_plantclef)
    assert summary["status"] == "completed"
    assert {"collages", "embed_collages"} <= summary["stage_seconds"].keys()
    assert summary["fit_data"]["collages_train"] > 0 and summary["fit_data"]["collages_val"] > 0
    assert 0 < summary["decision"]["global"] < 1
    assert summary["metrics"]["val_plots/f1"] == summary["decision"]["global_val_f1"]
    assert "test/micro_precision" in summary["metrics"]
    saved = load_checkpoint_file(summary["best_checkpoint"], opt_in="test")
    assert saved["decision"]["global"] == summary["decision"]["global"]
    assert len(saved["decision"]["per_species"]) == len(saved["hyper_parameters"]["species_ids"])

    overrides = ["experiment=plantclef_multilabel", f"ckpt_path={summary['best_checkpoint']}"]
    inferred = infer(compose_config("infer", [*overrides, "logger=csv"], tmp_path / "infer"))
    trained_rows = (tmp_path / "a" / "run" / "submission.csv").read_text()
    assert (tmp_path / "infer" / "run" / "submission.csv").read_text() == trained_rows
    assert inferred["scores"] == summary["scores"]

    # a second run with other mixing reuses the collages and their embeddings
    again = _train(tmp_path / "a", tiny_plantclef, "collages.proportion=0.8")
    assert again["cache_keys"] == summary["cache_keys"]


def test_the_recipe_takes_the_official_layout_under_other_folder_names(tiny_plantclef, tmp_path):
    data = tmp_path / "elsewhere"
    shutil.copytree(tiny_plantclef / "images_max_side_800", data / "train_jpgs")
    shutil.copytree(tiny_plantclef / "PlantCLEF2024test", data / "quadrats")
    csv = "PlantCLEF2024_single_plant_training_metadata.csv"
    shutil.copy(tiny_plantclef / csv, data / "meta.csv")
    shutil.copy(tiny_plantclef / "test_ground_truth.csv", data / "truth.csv")
    summary = _train(
        tmp_path / "run",
        data,
        "dataset=plantclef",
        f"dataset.metadata_csv={data / 'meta.csv'}",
        f"dataset.train_images_dir={data / 'train_jpgs'}",
        f"dataset.test_images_dir={data / 'quadrats'}",
        f"dataset.test_ground_truth={data / 'truth.csv'}",
        "dataset.min_images_per_species=6",
    )
    assert summary["status"] == "completed" and "macro_f1_per_plot" in summary["scores"]
    saved = json.loads((tmp_path / "run" / "run" / "summary.json").read_text())
    assert saved["predict_report"]["plots"] == 4


@pytest.mark.parametrize(
    "extra, match",
    [
        (["loss=nll", "head.model.log_softmax=true", "fit.monitor=val/macro_f1"], "threshold=auto"),
        (["head.model.log_softmax=true"], "head.model.log_softmax=false"),
        (["fit.monitor=val/acc"], "fit.monitor=val/acc"),
        (["collages.species=[3,1]"], "collages: species"),
        (["fit.loader=streaming"], "collages.enabled=true needs fit.loader=memory"),
        (["inference.pooling=median"], "pooling"),
    ],
)
def test_what_cannot_work_is_refused_before_any_stage(tiny_plantclef, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        _train(tmp_path, tiny_plantclef, *extra)
    assert not (tmp_path / "cache").exists()


def test_a_softmax_head_can_be_pooled_with_a_fixed_threshold(tiny_plantclef, tmp_path):
    summary = _train(
        tmp_path,
        tiny_plantclef,
        "loss=ce",
        "collages.enabled=false",
        "fit.monitor=val/macro_f1",
        "inference.threshold=0.3",
    )
    assert summary["status"] == "completed" and "decision" not in summary


def test_the_recipe_sweeps_on_its_validation_pseudo_plot_f1(tiny_plantclef, tmp_path):
    from sweep import run_sweep

    study = run_sweep(
        [
            *RECIPE,
            *FAST,
            "trainer.max_epochs=2",
            f"dataset.root={tiny_plantclef}",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache",
            "sweep=quickstart_head",
            "sweep.n_trials=2",
        ]
    )
    values = [t.value for t in study.trials]
    assert len(values) == 2 and all(0 < v <= 1 for v in values)
    assert study.study_name == "plantclef_multilabel_head"
