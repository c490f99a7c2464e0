"""Issue 12, "right answers on real inputs": missing images (one rule for FungiCLEF, PlantCLEF
and COCO), loss=nll refused for FungiCLEF, the organisers' per-image ground truth, the track the
open-set threshold is tuned on, the paper's final recipe, and cache keys that hold only what
changes the output."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict

from tests.conftest import compose_config
from vitlab.data.coco_captions import coco_paths, read_coco_captions_with_report
from vitlab.data.missing_images import check_max_missing_fraction, check_missing_images
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec, generate_coco_captions
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.errors import ConfigError, DatasetFormatError
from vitlab.inference.fungiclef import entropy, tune_entropy_threshold
from vitlab.metrics.__main__ import main as metrics_main
from vitlab.metrics.fungiclef import (
    fungiclef_scores,
    read_fungiclef_csv,
    read_fungiclef_truth,
    write_fungiclef_submission,
)
from vitlab.pipelines.fungiclef import train_fungiclef
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.prepare import PrepareParams, prepare_images

REPO = Path(__file__).resolve().parents[1]
TRAIN_CSV = "FungiCLEF2023_train_metadata_PRODUCTION.csv"
VAL_CSV = "FungiCLEF2023_val_metadata_PRODUCTION.csv"
TEST_CSV = "FungiCLEF2023_public_test_metadata_PRODUCTION.csv"
FAST = [
    "experiment=quickstart_fungiclef",
    "logger=csv",
    "dataset.synthetic=null",
    "trainer.max_epochs=3",
    "prepare.image_size=64",
    "backbone.model_kwargs.img_size=64",
    "backbone.input_size=64",
    "backbone.model_kwargs.depth=2",
    "head.model.hidden=128",
    "report.embedding_map=none",
]


@pytest.fixture(scope="module")
def fungi(tmp_path_factory):
    spec = FungiSyntheticSpec(
        seed=2, n_species=8, n_unknown=2, max_observations=14, min_observations=5
    )
    return generate_fungiclef(tmp_path_factory.mktemp("fungi") / "data", spec)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(data: Path, root: Path, *extra: str):
    return compose_config("train", [*FAST, f"dataset.root={data}", *extra], root)


def _no_stage_ran(root: Path) -> bool:
    return not (root / "cache" / "prepare").exists() and not (root / "cache" / "embed").exists()


# ------------------------------------------------------------------ 2. missing images, one rule


def test_missing_image_rule():
    few = check_missing_images("DF21", 100, ["a.jpg"], "/d/DF21", "dataset.val_images_dir", 0.05)
    assert few.report()["missing"] == 1 and few.report()["missing_examples"] == ["a.jpg"]
    assert check_missing_images("DF21", 100, [], "/d", "k", 0.0).missing == 0
    with pytest.raises(DatasetFormatError) as err:
        check_missing_images("DF21", 100, list("abcdef"), "/d/DF21", "dataset.val_images_dir", 0.05)
    message = str(err.value)
    assert "6 of 100" in message and "/d/DF21" in message and "dataset.val_images_dir" in message
    assert "dataset.max_missing_fraction=0.05" in message
    with pytest.raises(DatasetFormatError, match="none of the 3 image.*dataset.train_images_dir"):
        check_missing_images("DF20", 3, ["a", "b", "c"], "/d/DF20", "dataset.train_images_dir", 1.0)
    with pytest.raises(DatasetFormatError, match="DF20: no image listed in x.csv"):
        check_missing_images("DF20", 0, [], "/d", "k", 0.05, source="x.csv")
    for bad in (-0.1, 1.5, "lots", True, float("nan")):
        with pytest.raises(ConfigError, match="dataset.max_missing_fraction"):
            check_max_missing_fraction(bad)


def test_fungiclef_missing_df20_folder_fails_before_work(fungi, tmp_path):
    """Before: every DF20 image dropped, label space [-1], val acc 1.000, an all-unknown
    submission and exit 0."""
    data = _copy(fungi, tmp_path / "data")
    shutil.rmtree(data / "DF20_300")
    with pytest.raises(DatasetFormatError, match=r"DF20_300 \(config key dataset.train_images_dir"):
        train_fungiclef(_config(data, tmp_path, "loss=ce"))
    assert _no_stage_ran(tmp_path)


def test_fungiclef_df20_images_gone_from_an_existing_folder(fungi, tmp_path):
    data = _copy(fungi, tmp_path / "data")
    for image in (data / "DF20_300").iterdir():
        image.unlink()
    with pytest.raises(DatasetFormatError, match="DF20: none of the .*dataset.train_images_dir"):
        train_fungiclef(_config(data, tmp_path, "loss=ce"))
    assert _no_stage_ran(tmp_path)


def test_fungiclef_too_many_missing_in_one_split_names_folder_and_keys(fungi, tmp_path):
    data = _copy(fungi, tmp_path / "data")
    val = pd.read_csv(data / VAL_CSV)
    gone = val["image_path"].iloc[:10].tolist()  # 10 of ~87 DF21 images
    for name in gone:
        (data / "DF21_300" / name).unlink()
    with pytest.raises(DatasetFormatError) as err:
        train_fungiclef(_config(data, tmp_path))
    message = str(err.value)
    assert message.startswith("DF21: 10 of") and "DF21_300" in message
    assert "dataset.val_images_dir" in message and "dataset.max_missing_fraction" in message
    assert _no_stage_ran(tmp_path)


def test_bad_max_missing_fraction_is_refused_before_work(fungi, tmp_path):
    with pytest.raises(ConfigError, match="dataset.max_missing_fraction"):
        train_fungiclef(_config(fungi, tmp_path, "dataset.max_missing_fraction=1.5"))
    assert _no_stage_ran(tmp_path)


def test_every_real_dataset_config_has_the_key(tmp_path):
    for dataset in ("fungiclef", "plantclef", "coco_captions"):
        for name in (dataset, f"{dataset}_synthetic"):
            cfg = compose_config("train", [f"dataset={name}", "dataset.root=/x"], tmp_path)
            assert cfg.dataset.max_missing_fraction == 0.05, name


def test_plantclef_missing_folder_split_and_a_few_images(tiny_plantclef, tmp_path):
    params = PrepareParams(image_size=32, shard_size=64)
    csv = tiny_plantclef / "PlantCLEF2024_single_plant_training_metadata.csv"
    with pytest.raises(DatasetFormatError, match=r"nowhere \(config key dataset.train_images_dir"):
        prepare_training_images(csv, tmp_path / "nowhere", tmp_path / "cache", params)
    images = _copy(tiny_plantclef / "images_max_side_800", tmp_path / "images")
    shutil.rmtree(images / "val")  # before: a warning, and a fit without validation images
    with pytest.raises(DatasetFormatError, match="learn_tag=val: none of the 6 image"):
        prepare_training_images(csv, images, tmp_path / "cache", params)
    assert not (tmp_path / "cache").exists()
    shutil.copytree(tiny_plantclef / "images_max_side_800" / "val", images / "val")
    gone = sorted((images / "train").rglob("*.jpg"))[0]
    gone.unlink()  # 1 of 73 training images: skipped and counted
    stage = prepare_training_images(csv, images, tmp_path / "cache", params)
    report = stage.manifest["report"]
    assert report["missing_images"] == 1 and report["missing_examples"] == [gone.name]
    assert report["missing_by_split"]["train"]["missing"] == 1
    assert report["missing_by_split"]["val"]["missing"] == 0
    with pytest.raises(DatasetFormatError, match="learn_tag=train: 1 of 73.*fraction=0"):
        prepare_training_images(csv, images, tmp_path / "cache", params, max_missing_fraction=0.0)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    spec = CocoCaptionsSyntheticSpec(seed=5, n_train=24, n_val=12, image_size=64)
    return generate_coco_captions(tmp_path_factory.mktemp("coco") / "data", spec)


def test_coco_captions_follow_the_same_rule(coco, tmp_path):
    annotation_json, image_dir = coco_paths(coco, "val")
    images = _copy(image_dir, tmp_path / "val2017")
    gone = sorted(images.iterdir())[0]
    gone.unlink()  # 1 of 12: skipped and counted under a fraction of 0.1
    records, report = read_coco_captions_with_report(annotation_json, images, 0.1)
    assert len(records) == 11 and report.missing_images == 1
    assert report.missing_examples == (gone.name,)
    with pytest.raises(DatasetFormatError, match="1 of 12.*dataset.max_missing_fraction=0.05"):
        read_coco_captions_with_report(annotation_json, images)
    with pytest.raises(DatasetFormatError, match=r"config key dataset.root, for captions_val2017"):
        read_coco_captions_with_report(annotation_json, tmp_path / "nowhere")
    for image in images.iterdir():
        image.unlink()
    with pytest.raises(DatasetFormatError, match="none of the 12"):
        read_coco_captions_with_report(annotation_json, images, 1.0)


# --------------------------------------------------------------------- 4. loss=nll on logits


def test_fungiclef_refuses_nll_on_logits_before_work(fungi, tmp_path):
    """Before: val/loss went negative (NLL of raw logits) and the run exited 0."""
    with pytest.raises(ConfigError, match="loss=nll expects log-probabilities.*loss=ce"):
        train_fungiclef(_config(fungi, tmp_path, "loss=nll"))
    assert _no_stage_ran(tmp_path)


def test_train_py_exits_2_without_traceback_naming_the_key(fungi, tmp_path):
    data = _copy(fungi, tmp_path / "data")
    shutil.rmtree(data / "DF20_300")
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            *FAST,
            f"dataset.root={data}",
            "loss=ce",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "dataset.train_images_dir" in out.stdout + out.stderr
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------- 6. the organisers' ground-truth form


def _per_image_truth(path: Path, truth: dict[int, int], repeats: int = 3) -> Path:
    rows = ["observationID,class_id,image_path"]
    for obs, class_id in truth.items():
        rows += [f"{obs},{class_id},{obs}-{k}.JPG" for k in range(repeats)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_truth_one_row_per_image_keeps_the_first_row_per_observation(tmp_path):
    truth = {1: 5, 2: -1, 3: 7}
    path = _per_image_truth(tmp_path / "truth.csv", truth)
    assert read_fungiclef_truth(path) == truth
    path.write_text("observationID,class_id\n1,5\n2,6\n1,5\n1,9\n")
    with pytest.raises(DatasetFormatError, match=r"truth.csv:5: observationID 1 .*9.*5 on line 2"):
        read_fungiclef_truth(path)
    path.write_text("observationID,class_id\n1,5\n1,5\n")
    with pytest.raises(DatasetFormatError, match=":3: observationID 1 listed twice"):
        read_fungiclef_csv(path)  # a submission stays strict


def test_cli_scores_a_per_image_truth_and_keeps_submissions_strict(tmp_path, capsys):
    truth = {1: 5, 2: -1, 3: 7, 4: 5}
    truth_csv = _per_image_truth(tmp_path / "truth.csv", truth)
    submission = write_fungiclef_submission({1: 5, 2: 5, 3: 7, 4: -1}, tmp_path / "sub.csv")
    poison = tmp_path / "poison.csv"
    poison.write_text("class_id,poisonous\n5,0\n7,1\n")
    argv = ["fungiclef", "--truth", str(truth_csv), "--submission", str(submission)]
    assert metrics_main([*argv, "--poison", str(poison)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == fungiclef_scores(truth, {1: 5, 2: 5, 3: 7, 4: -1}, {7})
    assert scores["accuracy"] == 0.5 and 0 <= scores["macro_f1"] <= 1
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("observationID,class_id\n1,5\n1,5\n2,5\n3,7\n4,-1\n")
    argv = ["fungiclef", "--truth", str(truth_csv), "--submission", str(duplicated)]
    assert metrics_main([*argv, "--poison", str(poison)]) == 2
    assert "dup.csv:3" in capsys.readouterr().err


def test_macro_f1_is_a_fraction_like_accuracy():
    truth = {1: 1, 2: 1, 3: 2, 4: 2}
    scores = fungiclef_scores(truth, {1: 1, 2: 2, 3: 2, 4: 2}, set())
    # per label F1: 1 -> 2/3, 2 -> 4/5; mean 0.7333 (the organisers' 73.33)
    assert scores["macro_f1"] == 0.7333 and scores["accuracy"] == 0.75
    assert fungiclef_scores(truth, dict(truth), set())["macro_f1"] == 1.0


def test_truth_that_does_not_match_the_test_csv_fails_before_work(fungi, tmp_path):
    data = _copy(fungi, tmp_path / "data")
    truth = pd.read_csv(data / "test_ground_truth.csv")
    truth.iloc[1:].to_csv(data / "test_ground_truth.csv", index=False)
    with pytest.raises(DatasetFormatError, match="dataset.test_ground_truth.*disagree: 1 test"):
        train_fungiclef(_config(data, tmp_path))
    assert _no_stage_ran(tmp_path)


def test_full_run_on_real_forms(fungi, tmp_path):
    """One run: a per-image ground truth (before: exit 2 without scores.json), a few DF21 images
    missing (skipped and counted), the tuned threshold on Track 3 by default."""
    data = _copy(fungi, tmp_path / "data")
    test = pd.read_csv(data / TEST_CSV)
    truth = pd.read_csv(data / "test_ground_truth.csv")
    per_image = test[["observationID", "image_path"]].merge(truth, on="observationID")
    assert per_image["observationID"].duplicated().any()
    per_image[["observationID", "class_id", "image_path"]].to_csv(
        data / "test_ground_truth.csv", index=False
    )
    val = pd.read_csv(data / VAL_CSV)
    gone = val["image_path"].iloc[0]
    (data / "DF21_300" / gone).unlink()
    summary = train_fungiclef(_config(data, tmp_path))
    run = tmp_path / "run"
    scores = json.loads((run / "scores.json").read_text())
    assert scores == summary["scores"] and 0 <= scores["macro_f1"] <= 1
    assert set(read_fungiclef_csv(run / "submission.csv")) == set(truth["observationID"])
    assert summary["missing_images"]["DF21"]["missing"] == 1
    assert summary["missing_images"]["DF21"]["missing_examples"] == [gone]
    assert summary["missing_images"]["DF20"]["missing"] == 0
    assert summary["prepare_report"]["missing_images"] == 1
    assert summary["open_set"]["tune_track"] == 3 and "oof_track3" in summary["open_set"]


def test_run_without_public_test_csv_says_it_writes_no_submission(fungi, tmp_path, caplog):
    data = _copy(fungi, tmp_path / "data")
    (data / TEST_CSV).unlink()
    with caplog.at_level(logging.WARNING, logger="vitlab.pipelines.fungiclef"):
        summary = train_fungiclef(_config(data, tmp_path, "trainer.max_epochs=1"))
    assert summary["submission"] is None and "dataset.test_csv" in summary["submission_note"]
    assert not (tmp_path / "run" / "submission.csv").exists()
    said = [r.getMessage() for r in caplog.records if "no submission" in r.getMessage()]
    assert said and "dataset.test_csv" in said[0]


# ------------------------------------------------------------- 8. the track the threshold tunes


def test_threshold_tuned_on_track3_keeps_poisonous_predictions():
    """Two unknowns and one poisonous observation, all uncertain, the poisonous one the most:
    Track 1 alone buys the two unknowns with the poisonous one (1 error instead of 2), which
    costs 100 in Track 2; Track 3 keeps the rule off."""
    ids = [10, 11, 12]  # 12 is poisonous
    confident = [[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]] * 4
    uncertain = [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.33, 0.33, 0.34]]
    probs = np.array(confident + uncertain)
    truth = np.array([10, 11] * 4 + [-1, -1, 12])
    h = entropy(probs)
    assert h[-1] > h[-2] > h[0]
    t1, score1 = tune_entropy_threshold(probs, ids, truth, track=1, poisonous={12})
    assert t1 is not None and score1 == pytest.approx(1 / 11)  # the poisonous one -> unknown
    t3, score3 = tune_entropy_threshold(probs, ids, truth, poisonous={12})  # default: Track 3
    assert t3 is None and score3 == pytest.approx(2 / 11)
    t2, _ = tune_entropy_threshold(probs, ids, truth, track=2, poisonous={12})
    assert t2 is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("ensemble.tune_track=5", "ensemble.tune_track"),
        ("ensemble.open_set_threshold=maybe", "ensemble.open_set_threshold"),
        ("dataset.n_folds=1", "dataset.n_folds"),
    ],
)
def test_ensemble_keys_are_checked_before_work(fungi, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        train_fungiclef(_config(fungi, tmp_path, override))
    assert _no_stage_ran(tmp_path)


# ---------------------------------------------------------------- 9a. the paper's final recipe


def test_final_recipe_is_seesaw_plus_poison_only(tmp_path):
    final = compose_config("train", ["experiment=fungiclef_final", "dataset.root=/x"], tmp_path)
    assert final.loss._target_ == "vitlab.losses.SeesawPoisonLoss" and final.loss.alpha == 0.1
    assert dict(final.aux_targets) == {"poisonous": 0.0, "genus": 0.0, "family": 0.0}
    assert final.head.model.hidden == 4096 and final.head.model.use_metadata
    assert final.backbone.name == "vit_large_patch14_reg4_dinov2.lvd142m"
    aux = compose_config("train", ["experiment=fungiclef_final_aux", "dataset.root=/x"], tmp_path)
    assert aux.loss._target_ == "vitlab.losses.SeesawPoisonLoss" and aux.loss.alpha == 0.1
    assert dict(aux.aux_targets) == {"poisonous": 0.1, "genus": 0.1, "family": 0.1}
    assert aux.experiment_name == "fungiclef_final_aux"


# ------------------------------------------------------- 10. only what changes the output is keyed


def test_prepare_workers_is_not_in_the_cache_key(tiny_plantclef, tmp_path):
    images = sorted((tiny_plantclef / "images_max_side_800" / "train").rglob("*.jpg"))[:6]
    work = pd.DataFrame(
        {
            "image_name": [p.name for p in images],
            "species_id": np.arange(6, dtype=np.int64),
            "learn_tag": ["train"] * 6,
            "path": [str(p) for p in images],
        }
    )
    one = prepare_images(work, ["x"], tmp_path, PrepareParams(image_size=32, workers=1))
    four = prepare_images(work, ["x"], tmp_path, PrepareParams(image_size=32, workers=4))
    assert one.key == four.key and one.directory == four.directory
    for changed in (
        PrepareParams(image_size=40, workers=1),
        PrepareParams(image_size=32, center_crop=False),
        PrepareParams(image_size=32, jpeg_quality=80),
        PrepareParams(image_size=32, shard_size=3),  # decides which rows each shard holds
    ):
        assert prepare_images(work, ["x"], tmp_path, changed).key != one.key, changed


def test_prepare_config_errors_name_the_key(fungi, tmp_path):
    cfg = _config(fungi, tmp_path)
    with open_dict(cfg):
        cfg.prepare.image_size = 4
    with pytest.raises(ConfigError, match="prepare.image_size must be >= 8"):
        train_fungiclef(cfg)
