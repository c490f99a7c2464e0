"""The thesis's GroupViT analyses (`python -m vitlab.analysis`): known answers for the pure
parts (rigged kNN bank, rigged affinities, hand-written summaries), then every tool end to end on
a tiny random GroupViT and a small synthetic VOC-layout set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.analysis.__main__ import main
from vitlab.analysis.groupvit import (
    AnalysisError,
    FeatureBank,
    background_group_scores,
    bank_image,
    compare_summaries,
    entropy_per_patch,
    foreground_truth,
    group_region_mean_scores,
    knn_predict,
    paint_regions,
    paint_segments,
    region_mean_scores,
    segment_soft_labels,
)
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec, generate_coco_captions
from vitlab.inference.segmentation import add_background, pixel_class_scores
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator
from vitlab.models.groupvit.checkpoints import save_groupvit
from vitlab.models.groupvit.model import GroupViT, tiny_spec

SYNTHETIC = CocoCaptionsSyntheticSpec(n_train=12, n_val=6, image_size=64)


# ----------------------------------------------------------------------------- known answers


def _rigged_image(rng: np.random.Generator, n_classes: int, size: int = 12):
    """4 groups in the quadrants, each a different class; a few ignored pixels."""
    group_index = np.zeros((size, size), dtype=np.int64)
    half = size // 2
    group_index[:half, half:], group_index[half:, :half], group_index[half:, half:] = 1, 2, 3
    classes = rng.permutation(n_classes)[:4]
    truth = classes[group_index]
    truth[0, :3] = 255
    return group_index, truth, classes


def test_soft_labels_are_class_histograms_of_a_segment_without_ignored_pixels():
    group_index = np.array([[0, 0, 1, 1], [0, 0, 1, 2]])
    truth = np.array([[3, 3, 1, 255], [3, 1, 1, 255]])
    soft, pixels = segment_soft_labels(group_index, truth, n_groups=4, num_classes=5)
    assert pixels.tolist() == [4, 2, 0, 0]  # group 2 holds only an ignored pixel
    torch.testing.assert_close(soft[0], torch.tensor([0, 0.25, 0, 0.75, 0]))
    torch.testing.assert_close(soft[1], torch.tensor([0, 1.0, 0, 0, 0]))
    assert soft[2:].sum() == 0


def test_knn_with_a_one_hot_bank_is_perfect_on_the_bank_itself():
    rng = np.random.default_rng(0)
    n_classes = 5
    images = [_rigged_image(rng, n_classes) for _ in range(10)]
    bank = FeatureBank(n_classes, cap=1000)
    for group_index, truth, classes in images:
        features = torch.eye(n_classes)[torch.as_tensor(classes)]  # one-hot class vectors
        bank_image(bank, features, group_index, truth, ignore_index=255)
    assert len(bank) == 40 and sum(bank.per_class()) == 40
    bank_features, bank_labels = bank.tensors()
    metric = ConfusionMatrixAccumulator(n_classes)
    for group_index, truth, classes in images:
        features = torch.eye(n_classes)[torch.as_tensor(classes)]
        pred = knn_predict(features, group_index, bank_features, bank_labels, k=10)
        assert np.array_equal(pred[truth != 255], truth[truth != 255])
        metric.update(pred, truth)
    assert metric.miou() == 1.0


def test_feature_bank_caps_each_class_with_a_seeded_sample():
    def fill(seed):
        bank = FeatureBank(num_classes=2, cap=5, seed=seed)
        labels = torch.tensor([[1.0, 0.0]] * 50 + [[0.2, 0.8]] * 3)
        bank.add(torch.arange(53, dtype=torch.float32)[:, None], labels)
        return bank

    bank = fill(0)
    assert bank.per_class() == [5, 3] and bank.seen.tolist() == [50, 3]
    features, labels = bank.tensors()
    assert features.shape == (8, 1) and labels.shape == (8, 2)
    assert torch.equal(features, fill(0).tensors()[0])  # seeded
    assert not torch.equal(features, fill(1).tensors()[0])
    with pytest.raises(AnalysisError, match="empty"):
        FeatureBank(3).tensors()


def test_paint_segments_gives_each_pixel_its_group_class():
    assert paint_segments(np.array([[0, 1], [2, 1]]), [7, 3, 5]).tolist() == [[7, 3], [5, 3]]


def test_alignment_takes_the_highest_mean_per_region_even_where_pixels_disagree():
    # 3 classes; class 1 on the left, class 2 on the right, a background strip, ignored corner
    truth = np.zeros((10, 10), dtype=np.int64)
    truth[2:, :5], truth[2:, 5:] = 1, 2
    truth[9, 9] = 255
    scores = torch.full((3, 10, 10), 0.1)
    rng = np.random.default_rng(0)
    for correct, distractor in ((0, 2), (1, 0), (2, 1)):
        region = torch.as_tensor(truth == correct)
        scores[correct][region] = 0.6
        # the distractor wins 40% of the region's pixels (1.0 > 0.6) but its mean is lower
        wins = torch.as_tensor(rng.random((10, 10)) < 0.4) & region
        scores[distractor][wins] = 1.0
    assert (scores.argmax(0).numpy() != truth)[truth != 255].any()  # per-pixel argmax errs
    means = region_mean_scores(scores, truth, num_classes=3)
    pred = paint_regions(truth, means)
    metric = ConfusionMatrixAccumulator(3).update(pred, truth)
    assert metric.miou() == 1.0
    assert pred[9, 9] == 0  # ignored pixels are filled with 0 (not counted)


def test_group_level_region_means_equal_the_pixel_level_ones():
    torch.manual_seed(0)
    group_index = torch.randint(0, 4, (9, 11))
    truth = torch.randint(0, 3, (9, 11))
    truth[0, 0] = 255
    group_scores = torch.rand(4, 5)
    onehot = torch.nn.functional.one_hot(group_index, 4).permute(2, 0, 1).float()[None]
    pixels = pixel_class_scores(onehot, group_scores[None])[0]
    expected = region_mean_scores(pixels, truth, num_classes=4)
    got = group_region_mean_scores(group_index, group_scores, truth, num_classes=4)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isnan(got[3]).all()  # class 3 is absent


def test_background_group_scores_follow_the_evaluation_rule():
    scores = torch.tensor([[0.9, 0.05], [0.3, 0.2], [0.5, 0.45]])
    onehot = torch.eye(3)[None, :, None, :]  # 3 pixels in a row, one per group
    pixel = add_background(pixel_class_scores(onehot, scores[None]), scores[None], 0.6)
    rule = background_group_scores(scores, "rule", bg_threshold=0.6)
    assert rule.tolist() == pixel[0, 0].flatten().tolist() == [0.0, 1.0, 1.0]
    torch.testing.assert_close(
        background_group_scores(scores, "complement"), torch.tensor([0.1, 0.7, 0.5])
    )
    assert foreground_truth(np.array([0, 1, 3, 255]), 255).tolist() == [255, 0, 2, 255]


def test_entropies_per_patch_have_the_known_extremes():
    segments = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    uniform = torch.full((5, 4), 0.25)
    ge, le = entropy_per_patch(uniform, segments, text, scale=0.0)
    torch.testing.assert_close(ge, torch.full((5,), math.log(4)))
    torch.testing.assert_close(le, torch.full((5,), math.log(6)))
    hard = torch.eye(4)[[0, 1, 2, 3, 0]]
    ge, _ = entropy_per_patch(hard, segments, text, scale=100.0)
    assert torch.all(ge == 0)


def _summary(ious: dict, miou: float) -> dict:
    return {
        "miou": miou,
        "iou": list(ious.values()),
        "per_class": {k: {"iou": v, "accuracy": None, "pixels": 1} for k, v in ious.items()},
    }


SUMMARY_A = _summary({"background": 0.5, "cat": 0.25, "car": None, "boat": 0.75}, 0.5)
SUMMARY_B = _summary({"background": 0.75, "cat": 0.125, "car": 0.5, "boat": 0.75}, 0.53125)


def test_compare_summaries_gives_exact_differences():
    got = compare_summaries(SUMMARY_A, SUMMARY_B, "base", "tuned")
    diffs = {name: row["difference"] for name, row in got["per_class"].items()}
    assert diffs == {"background": 0.25, "cat": -0.125, "car": None, "boat": 0.0}
    assert got["miou_difference"] == 0.03125
    assert (got["n_improved"], got["n_worse"], got["n_unchanged"]) == (1, 1, 1)
    assert got["mean_class_difference"] == pytest.approx(0.125 / 3)
    other = _summary({"background": 0.5, "dog": 0.1}, 0.3)
    with pytest.raises(AnalysisError, match="different classes"):
        compare_summaries(SUMMARY_A, other)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forward passes: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("analysis")
    data = generate_coco_captions(root / "data", SYNTHETIC)
    torch.manual_seed(0)
    ckpt_a = save_groupvit(GroupViT(tiny_spec()), root / "a.pt")
    torch.manual_seed(1)
    ckpt_b = save_groupvit(GroupViT(tiny_spec()), root / "b.pt")
    voc = data / "VOCdevkit" / "VOC2012"
    return {"root": root, "voc": str(voc), "a": str(ckpt_a), "b": str(ckpt_b)}


def _common(setup, ckpt_flag="--ckpt", ckpt=None) -> list[str]:
    args = ["--dataset", "synthetic_voc", "--root", setup["voc"], "--short-side", "64"]
    return [ckpt_flag, ckpt or setup["a"], *args] if ckpt_flag else args


def _run(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _unit(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


def test_knn_cli_with_a_train_bank(setup, capsys, tmp_path):
    out = tmp_path / "knn"
    result = _run(capsys, ["knn", *_common(setup), "--bank-split", "train", "--out", str(out)])
    assert result["bank_source"] == "split train" and result["n_bank_images"] == 12
    assert result["n_images"] == 6 and result["k"] == 10 and result["cap"] == 1000
    assert result["n_bank"] >= 1 and 0.0 <= result["miou"] <= 1.0
    assert len(result["iou"]) == 21 and all(_unit(v) for v in result["iou"])
    assert json.loads((out / "knn.json").read_text()) == result
    assert (out / "knn_iou.png").is_file()


def test_knn_cli_falls_back_to_half_of_the_split(setup, capsys, tmp_path):
    argv = ["knn", *_common(setup), "--bank-split", "nosuchsplit", "--k", "3", "--cap", "2"]
    result = _run(capsys, [*argv, "--limit", "4", "--out", str(tmp_path)])
    assert result["bank_source"].startswith("first half of val")
    assert result["n_bank_images"] == 2 and result["n_images"] == 2
    assert max(result["n_bank_per_class"].values()) <= 2 and _unit(result["miou"])


def test_alignment_cli_reports_both_variants(setup, capsys, tmp_path):
    result = _run(capsys, ["alignment", *_common(setup), "--out", str(tmp_path)])
    with_bg, without = result["with_background"], result["without_background"]
    assert len(with_bg["iou"]) == 21 and len(without["iou"]) == 20
    assert "background" not in without["per_class"]
    for block in (with_bg, without):
        assert 0.0 <= block["miou"] <= 1.0 and all(_unit(v) for v in block["iou"])
    assert result["top_k"] == 0 and result["background_score"] == "rule"
    assert result["bg_threshold"] == 0.95 and result["n_images"] == 6
    assert (tmp_path / "alignment.json").is_file()
    assert (tmp_path / "alignment_iou_with_background.png").is_file()
    assert (tmp_path / "alignment_iou_without_background.png").is_file()


def test_entropy_cli_writes_maps_and_means(setup, capsys, tmp_path):
    result = _run(capsys, ["entropy", *_common(setup), "--n", "2", "--out", str(tmp_path)])
    assert result["n_images"] == 2 and result["n_groups"] == 4 and result["n_labels"] == 20
    assert 0.0 <= result["mean_group_entropy"] <= math.log(4) + 1e-6
    assert 0.0 <= result["mean_label_entropy"] <= math.log(20) + 1e-6
    for key in ("mean_group_entropy_normalised", "mean_label_entropy_normalised"):
        assert 0.0 <= result[key] <= 1.0 + 1e-6
    assert len(list((tmp_path / "entropy").glob("*.png"))) == 2
    assert all(Path(r["figure"]).is_file() for r in result["per_image"])


def test_compare_cli_on_summaries_and_on_checkpoints(setup, capsys, tmp_path):
    for name, summary in (("a.json", SUMMARY_A), ("b.json", SUMMARY_B)):
        (tmp_path / name).write_text(json.dumps(summary))
    argv = ["compare", "--summary-a", str(tmp_path / "a.json")]
    argv += ["--summary-b", str(tmp_path / "b.json"), "--out", str(tmp_path / "s")]
    result = _run(capsys, argv)
    assert result["per_class"]["cat"]["difference"] == -0.125
    assert result["per_class"]["car"]["difference"] is None
    assert (tmp_path / "s" / "iou_difference.png").is_file()
    assert (tmp_path / "s" / "compare.json").is_file()

    out = tmp_path / "c"
    argv = ["compare", "--ckpt-a", setup["a"], "--ckpt-b", setup["b"], *_common(setup, None)]
    argv += ["--crop", "64", "--stride", "32", "--limit", "3", "--out", str(out)]
    result = _run(capsys, argv)
    assert (result["label_a"], result["label_b"]) == ("a", "b")
    assert _unit(result["miou_a"]) and _unit(result["miou_b"])
    for row in result["per_class"].values():
        assert row["difference"] is None or -1.0 <= row["difference"] <= 1.0
    summary_a = json.loads((out / "summary_a.json").read_text())
    assert summary_a["n_images"] == 3 and summary_a["miou"] == result["miou_a"]
    assert (out / "summary_b.json").is_file() and (out / "iou_difference.png").is_file()


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["entropy", "--ckpt", "CKPT", "--dataset", "nope", "--root", "VOC"], "nope"),
        (["entropy", "--ckpt", "/no/such.pt", "--dataset", "synthetic_voc", "--root", "VOC"],
         "/no/such.pt"),
        (["entropy", "--ckpt", "CKPT", "--dataset", "synthetic_voc", "--root", "/no/root"],
         "/no/root"),
        (["compare", "--summary-a", "/no/a.json", "--summary-b", "/no/b.json"], "/no/a.json"),
        (["compare", "--summary-a", "/no/a.json"], "--summary-b"),
        (["entropy", "--ckpt", "CKPT", "--dataset", "synthetic_voc", "--root", "VOC",
          "--device", "gpu"], "--device"),
    ],
)  # fmt: skip
def test_bad_inputs_exit_2_naming_the_culprit(setup, capsys, tmp_path, argv, culprit):
    argv = [setup["a"] if a == "CKPT" else setup["voc"] if a == "VOC" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert culprit in capsys.readouterr().err
