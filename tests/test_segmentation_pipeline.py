"""`infer.py pipeline=segmentation` end to end on the synthetic VOC-layout set."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import compose_config
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec
from vitlab.errors import ConfigError
from vitlab.metrics.__main__ import main as metrics_main
from vitlab.models.groupvit.checkpoints import save_groupvit
from vitlab.models.groupvit.model import GroupViT, tiny_spec
from vitlab.pipelines.segmentation import evaluate_segmentation

SYNTHETIC = CocoCaptionsSyntheticSpec(seed=5, n_train=6, n_val=8, image_size=64)


def _config(tmp_path, *extra: str):
    torch.manual_seed(0)
    checkpoint = save_groupvit(GroupViT(tiny_spec()), tmp_path / "tiny.pt")
    overrides = [
        "experiment=segment_synthetic_voc",
        f"ckpt_path={checkpoint}",
        f"dataset.synthetic.seed={SYNTHETIC.seed}",
        f"dataset.synthetic.n_train={SYNTHETIC.n_train}",
        f"dataset.synthetic.n_val={SYNTHETIC.n_val}",
        f"dataset.synthetic.image_size={SYNTHETIC.image_size}",
        "logger=csv",
        *extra,
    ]
    return compose_config("infer", overrides, tmp_path)


def test_whole_evaluation_on_the_synthetic_voc_set(tmp_path, capsys):
    cfg = _config(tmp_path, "segmentation.save_predictions=true", "segmentation.overlays=3")
    summary = evaluate_segmentation(cfg)
    run = tmp_path / "run"
    assert summary["n_images"] == SYNTHETIC.n_val and summary["skipped_images"] == 0
    assert 0.0 <= summary["miou"] <= 1.0 and len(summary["iou"]) == 21
    assert json.loads((run / "summary.json").read_text())["miou"] == summary["miou"]
    assert summary["images_per_second"] > 0
    # the trivial reference: background everywhere scores IoU only on background
    trivial = summary["all_background"]
    present = [k for k, v in summary["per_class"].items() if v["pixels"]]
    assert trivial["per_class"]["background"] > 0.5
    assert trivial["miou"] == pytest.approx(trivial["per_class"]["background"] / len(present))
    assert summary["metrics"]["all_background/miou"] == pytest.approx(trivial["miou"])
    assert (run / "per_class_iou.csv").read_text().startswith("class,iou,truth_pixels")
    assert (run / "per_class_iou.png").is_file()
    assert len(list((run / "overlays").glob("*.png"))) == 3
    # the saved label maps rescored by the metric CLI give the same mIoU
    voc = tmp_path / "data" / "synthetic" / f"coco_captions_seed{SYNTHETIC.seed}"
    voc = voc / "VOCdevkit" / "VOC2012"
    truth = tmp_path / "truth"
    truth.mkdir()
    for sample_id in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        shutil.copy(voc / "SegmentationClass" / f"{sample_id}.png", truth)
    args = ["miou", "--truth", str(truth), "--pred", summary["predictions_dir"]]
    assert metrics_main([*args, "--num-classes", "21"]) == 0
    rescored = json.loads(capsys.readouterr().out)
    assert rescored["miou"] == pytest.approx(summary["miou"])


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    cfg = _config(tmp_path, "segmentation.overlays=0")
    evaluate_segmentation(cfg)  # generates the set
    voc = tmp_path / "data" / "synthetic" / f"coco_captions_seed{SYNTHETIC.seed}"
    voc = voc / "VOCdevkit" / "VOC2012"
    first = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (voc / "JPEGImages" / f"{first}.jpg").write_bytes(b"not a jpeg")
    summary = evaluate_segmentation(cfg)
    assert summary["skipped_images"] == 1 and summary["n_images"] == SYNTHETIC.n_val - 1
    assert first in summary["skipped"][0]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = _config(tmp_path, "ckpt_path=null")
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate_segmentation(cfg)
    cfg = _config(tmp_path, f"ckpt_path={tmp_path}/nope.pt")
    with pytest.raises(ConfigError, match="nope.pt"):
        evaluate_segmentation(cfg)


def test_logit_scale_max_plain_overrides_reach_the_model(tmp_path):
    """`segmentation.logit_scale_max` composes without `+`: `default` (the config's) is the
    model's DEFAULT_LOGIT_SCALE_MAX, a number or null (no clamp) reach the model, `++` works
    too, and a bad value is a ConfigError naming the key before any work."""
    from vitlab.models.groupvit.model import DEFAULT_LOGIT_SCALE_MAX
    from vitlab.pipelines.segmentation import load_segmentation_model, validate_segmentation

    cfg = _config(tmp_path)
    assert cfg.segmentation.logit_scale_max == "default"
    assert load_segmentation_model(cfg).logit_scale_max == DEFAULT_LOGIT_SCALE_MAX == 100.0
    for override, clamp in [("=50", 50.0), ("=null", None), ("=2.5", 2.5)]:
        for prefix in ("", "++"):
            cfg = _config(tmp_path, f"{prefix}segmentation.logit_scale_max{override}")
            assert load_segmentation_model(cfg).logit_scale_max == clamp
    for bad in ("0", "-1", "huge", "true"):
        cfg = _config(tmp_path, f"segmentation.logit_scale_max={bad}")
        with pytest.raises(ConfigError, match=r"segmentation\.logit_scale_max="):
            validate_segmentation(cfg)
        with pytest.raises(ConfigError, match=r"segmentation\.logit_scale_max="):
            load_segmentation_model(cfg)
