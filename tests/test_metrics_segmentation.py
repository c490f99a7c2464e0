import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import jaccard_score

from vitlab.metrics.__main__ import main
from vitlab.metrics.segmentation import (
    ConfusionMatrixAccumulator,
    confusion_matrix,
    iou_from_confusion,
    miou_from_confusion,
)

C = 7


def _random_images(rng: np.random.Generator, n: int = 5):
    """Label maps of varying sizes over classes 0..C-1 where classes 5 and 6 never occur (truth
    or prediction), class 4 is only predicted, and ~10% of truth pixels are 255."""
    images = []
    for _ in range(n):
        h, w = int(rng.integers(3, 30)), int(rng.integers(3, 30))
        truth = rng.integers(0, 4, (h, w)).astype(np.uint8)
        truth[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, truth, rng.integers(0, 5, (h, w)))
        pred = np.where(pred == 255, rng.integers(0, 5, (h, w)), pred).astype(np.uint8)
        images.append((pred, truth))
    return images


def _oracle(images, num_classes=C):
    """sklearn on the flattened pixels of all images concatenated (dataset-level counts)."""
    truth = np.concatenate([t.ravel() for _, t in images]).astype(np.int64)
    pred = np.concatenate([p.ravel() for p, _ in images]).astype(np.int64)
    keep = truth != 255
    truth, pred = truth[keep], pred[keep]
    matrix = sk_confusion_matrix(truth, pred, labels=list(range(num_classes)))
    present = sorted(set(truth) | set(pred))  # classes with a non-empty union
    iou = np.full(num_classes, np.nan)  # (this sklearn refuses zero_division=nan for jaccard)
    iou[present] = jaccard_score(truth, pred, labels=present, average=None)
    miou = jaccard_score(truth, pred, labels=present, average="macro")
    return matrix, iou, miou, float((truth == pred).mean())


@pytest.mark.parametrize("seed", range(10))
def test_matches_sklearn_on_concatenated_pixels(seed):
    images = _random_images(np.random.default_rng(seed))
    acc = ConfusionMatrixAccumulator(C)
    for pred, truth in images:
        acc.update(pred, truth)
    matrix, iou, miou, pixel_acc = _oracle(images)
    np.testing.assert_array_equal(acc.matrix, matrix)
    assert acc.matrix.dtype == np.int64 and acc.matrix.shape == (C, C)
    np.testing.assert_allclose(acc.iou(), iou, rtol=0, atol=1e-12)  # nan in the same places
    assert np.isnan(acc.iou()[5:]).all()  # never seen: skipped
    assert acc.iou()[4] == 0.0  # predicted but never in the truth: counts as 0
    assert acc.miou() == pytest.approx(miou, abs=1e-12)
    assert acc.accuracy() == pytest.approx(pixel_acc, abs=1e-12)
    assert miou_from_confusion(matrix) == pytest.approx(miou, abs=1e-12)


def test_dataset_level_differs_from_mean_of_per_image_miou():
    big = (np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))  # class 0, all right
    small = (np.array([[1, 1], [1, 0]], np.uint8), np.ones((2, 2), np.uint8))
    acc = ConfusionMatrixAccumulator(2)
    per_image = []
    for pred, truth in (big, small):
        acc.update(pred, truth)
        per_image.append(miou_from_confusion(confusion_matrix(pred, truth, 2)))
    # per image: (1 + (0 + 3/4) / 2) / 2; dataset: class 0 I=4 U=5, class 1 I=3 U=4
    assert np.mean(per_image) == pytest.approx(0.6875)
    assert acc.miou() == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert acc.miou() == pytest.approx(_oracle([big, small], 2)[2])
    assert acc.miou() != pytest.approx(np.mean(per_image))


def test_hand_computed_iou_and_ignore():
    truth = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 2]])  # the 2 is under an ignored pixel: not counted
    matrix = confusion_matrix(pred, truth, 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(iou_from_confusion(matrix), [1 / 2, 1 / 2, np.nan])
    assert miou_from_confusion(matrix) == pytest.approx(0.5)
    assert miou_from_confusion(np.zeros((3, 3), np.int64)) != miou_from_confusion(matrix)
    assert np.isnan(miou_from_confusion(np.zeros((3, 3), np.int64)))


def test_reduce_zero_label_applies_to_truth_only():
    truth = np.array([[0, 1, 2, 3], [255, 1, 2, 0]], np.uint8)  # uint8: no wrap-around
    pred = np.array([[2, 0, 1, 1], [0, 0, 0, 2]], np.uint8)
    reduced = np.array([[255, 0, 1, 2], [255, 0, 1, 255]])
    got = confusion_matrix(pred, truth, 3, reduce_zero_label=True)
    np.testing.assert_array_equal(got, confusion_matrix(pred, reduced, 3))
    np.testing.assert_array_equal(got, [[2, 0, 0], [1, 1, 0], [0, 1, 0]])
    # with another ignore index, truth 0 becomes that index
    truth_ignore_99 = np.where(truth == 255, 99, truth)
    got_99 = confusion_matrix(pred, truth_ignore_99, 3, ignore_index=99, reduce_zero_label=True)
    np.testing.assert_array_equal(got_99, got)
    with pytest.raises(ValueError, match="after reduce_zero_label"):
        confusion_matrix(pred, np.full_like(truth, 4), 3, reduce_zero_label=True)


def test_merge_equals_one_shot_and_torch_equals_numpy():
    images = _random_images(np.random.default_rng(123), n=8)
    one_shot = ConfusionMatrixAccumulator(C)
    left, right = ConfusionMatrixAccumulator(C), ConfusionMatrixAccumulator(C)
    tensors = ConfusionMatrixAccumulator(C)
    for i, (pred, truth) in enumerate(images):
        one_shot.update(pred, truth)
        (left if i % 3 else right).update(pred, truth)
        # tensors (and a numpy/tensor mix) go through torch.bincount
        tensors.update(torch.from_numpy(pred), truth if i % 2 else torch.from_numpy(truth))
    merged = left.merge(right)
    np.testing.assert_array_equal(merged.matrix, one_shot.matrix)
    assert merged.n_updates == one_shot.n_updates == len(images)
    np.testing.assert_array_equal(tensors.matrix, one_shot.matrix)
    assert merged.miou() == one_shot.miou()
    with pytest.raises(ValueError, match="cannot merge"):
        one_shot.merge(ConfusionMatrixAccumulator(C, reduce_zero_label=True))


def test_summary_is_json_ready():
    acc = ConfusionMatrixAccumulator(3).update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    summary = acc.summary(["sky", "tree", "car"])
    json.dumps(summary, allow_nan=False)
    assert summary["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert summary["iou"] == [pytest.approx(0.5), pytest.approx(0.5), None]
    assert summary["pixel_accuracy"] == pytest.approx(2 / 3)
    assert summary["per_class"]["sky"] == {"iou": 0.5, "accuracy": 0.5, "pixels": 2}
    assert summary["per_class"]["car"] == {"iou": None, "accuracy": None, "pixels": 0}
    assert list(ConfusionMatrixAccumulator(2).summary()["per_class"]) == ["0", "1"]
    assert ConfusionMatrixAccumulator(2).summary()["miou"] is None
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        acc.summary(["a", "b"])


@pytest.mark.parametrize(
    "pred, truth, message",
    [
        (np.array([0, 3]), np.array([0, 1]), r"predicted class 3 out of range \[0, 3\)"),
        (np.array([0, -1]), np.array([0, 255]), "predicted class -1"),  # even if ignored
        (np.array([0, 1]), np.array([0, 7]), "truth label 7"),
        (np.zeros((2, 3), int), np.zeros((3, 2), int), r"\(2, 3\) != truth shape \(3, 2\)"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer class indices, got float64"),
        (torch.tensor([0, 9]), torch.tensor([0, 1]), "predicted class 9"),
    ],
)
def test_invalid_inputs(pred, truth, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred, truth, 3)


# --- CLI ---------------------------------------------------------------------------------------

# VOC-like palette: the colour's luminance is not the index, so an RGB/L conversion would show
VOC_PALETTE = [v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 13) % 256)]


def _write_png(path, labels: np.ndarray, palette: bool) -> None:
    img = Image.fromarray(labels.astype(np.uint8))  # mode L
    if palette:
        img.putpalette(VOC_PALETTE)  # mode P, same indices
    img.save(path)


def _dataset(tmp_path, images, palette=True):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir(exist_ok=True)
    pred_dir.mkdir(exist_ok=True)
    for i, (pred, truth) in enumerate(images):
        _write_png(truth_dir / f"img{i:02d}.png", truth, palette)
        _write_png(pred_dir / f"img{i:02d}.png", pred, palette)
    return truth_dir, pred_dir


def _cli(capsys, *args):
    code = main(["miou", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("palette", [True, False])
def test_cli_matches_oracle(tmp_path, capsys, palette):
    images = _random_images(np.random.default_rng(7), n=6)
    truth_dir, pred_dir = _dataset(tmp_path, images, palette)
    mode = Image.open(truth_dir / "img00.png").mode
    assert mode == ("P" if palette else "L")
    code, out, err = _cli(capsys, "--truth", truth_dir, "--pred", pred_dir, "--num-classes", C)
    assert code == 0, err
    scores = json.loads(out)
    _, iou, miou, pixel_acc = _oracle(images)
    assert set(scores) == {"miou", "iou", "pixel_accuracy", "n_images"}
    assert scores["n_images"] == 6
    assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(pixel_acc, abs=1e-12)
    assert scores["iou"][5:] == [None, None]
    assert scores["iou"][:5] == pytest.approx(list(iou[:5]), abs=1e-12)


def test_cli_subprocess_reduce_zero_label_and_extra_predictions(tmp_path):
    truth = np.array([[0, 1, 2], [255, 1, 2]], np.uint8)
    pred = np.array([[1, 0, 1], [1, 0, 0]], np.uint8)
    truth_dir, pred_dir = _dataset(tmp_path, [(pred, truth)])
    _write_png(pred_dir / "stray.png", pred, True)
    cmd = [sys.executable, "-m", "vitlab.metrics", "miou", "--truth", str(truth_dir)]
    cmd += ["--pred", str(pred_dir), "--num-classes", "2", "--reduce-zero-label"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "stray.png" in out.stderr and "warning" in out.stderr
    scores = json.loads(out.stdout)
    # reduced truth [[-, 0, 1], [-, 0, 1]] vs pred [[-, 0, 1], [-, 0, 0]]
    assert scores["iou"] == pytest.approx([2 / 3, 1 / 2])
    assert scores["pixel_accuracy"] == pytest.approx(3 / 4)
    assert scores["n_images"] == 1


def test_cli_errors(tmp_path, capsys):
    images = _random_images(np.random.default_rng(1), n=2)
    truth_dir, pred_dir = _dataset(tmp_path, images)
    base = ["--truth", truth_dir, "--pred", pred_dir, "--num-classes", C]

    code, _, err = _cli(
        capsys, "--truth", tmp_path / "nope", "--pred", pred_dir, "--num-classes", 3
    )
    assert code == 2 and "--truth" in err and "nope" in err

    code, _, err = _cli(
        capsys, "--truth", truth_dir, "--pred", tmp_path / "gone", "--num-classes", 3
    )
    assert code == 2 and "--pred" in err and "gone" in err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pngs here")
    code, _, err = _cli(
        capsys, "--truth", tmp_path / "empty", "--pred", pred_dir, "--num-classes", 3
    )
    assert code == 2 and "no PNG" in err and "empty" in err

    code, _, err = _cli(capsys, *base[:-1], 4)  # class 4 is predicted: out of range for 4
    assert code == 2 and "predicted class 4" in err and "img0" in err

    (pred_dir / "img01.png").unlink()
    code, _, err = _cli(capsys, *base)
    assert code == 2 and "img01.png" in err and "without a prediction" in err

    _write_png(pred_dir / "img01.png", np.zeros((2, 2), np.uint8), True)
    code, _, err = _cli(capsys, *base)
    assert code == 2 and "img01.png" in err and "size mismatch" in err and "2x2" in err

    Image.new("RGB", images[1][1].shape[::-1]).save(pred_dir / "img01.png")
    code, _, err = _cli(capsys, *base)
    assert code == 2 and "img01.png" in err and "mode RGB" in err


def _voc_folder(tmp_path, n_train=4, n_val=3):
    """A VOC2012-layout folder: SegmentationClass holds train and val truth, ImageSets lists
    them; predictions exist for the val ids only (what a zero-shot evaluation produces)."""
    rng = np.random.default_rng(3)
    voc = tmp_path / "VOC2012"
    truth_dir, pred_dir = voc / "SegmentationClass", tmp_path / "pred"
    sets = voc / "ImageSets" / "Segmentation"
    for d in (truth_dir, pred_dir, sets):
        d.mkdir(parents=True)
    images = _random_images(rng, n_train + n_val)
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    for image_id, (_, truth) in zip(ids, images, strict=True):
        _write_png(truth_dir / f"{image_id}.png", truth, True)
    val = list(range(n_train, n_train + n_val))
    for i in val:
        _write_png(pred_dir / f"{ids[i]}.png", images[i][0], True)
    (sets / "train.txt").write_text("".join(f"{ids[i]}\n" for i in range(n_train)))
    (sets / "val.txt").write_text("".join(f"{ids[i]}\n" for i in val))
    return truth_dir, pred_dir, sets / "val.txt", [images[i] for i in val], [ids[i] for i in val]


def test_cli_split_scores_only_the_listed_val_ids(tmp_path, capsys):
    truth_dir, pred_dir, val_txt, val_images, val_ids = _voc_folder(tmp_path)
    base = ["--truth", truth_dir, "--pred", pred_dir, "--num-classes", C]

    code, _, err = _cli(capsys, *base)  # without a split: the train truth has no prediction
    assert code == 2 and "4 truth file(s) without a prediction" in err and "--split" in err

    code, out, err = _cli(capsys, *base, "--split", val_txt)
    assert code == 0, err
    scores = json.loads(out)
    _, iou, miou, pixel_acc = _oracle(val_images)  # the val images alone
    assert scores["n_images"] == 3
    assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(pixel_acc, abs=1e-12)

    # the same subset given as ids (stems or file names), and the accumulator directly
    code, out2, err = _cli(capsys, *base, "--ids", val_ids[0], f"{val_ids[1]}.png", val_ids[2])
    assert code == 0, err
    assert json.loads(out2) == scores
    acc = ConfusionMatrixAccumulator(C)
    for pred, truth in val_images:
        acc.update(pred, truth)
    assert scores["miou"] == pytest.approx(acc.miou(), abs=1e-12)

    subprocess_scores = subprocess.run(
        [sys.executable, "-m", "vitlab.metrics", "miou", *map(str, base), "--split", val_txt],
        capture_output=True,
        text=True,
    )
    assert subprocess_scores.returncode == 0, subprocess_scores.stderr
    assert json.loads(subprocess_scores.stdout) == scores


def test_cli_split_errors_name_the_file_and_line(tmp_path, capsys):
    truth_dir, pred_dir, val_txt, _, val_ids = _voc_folder(tmp_path)
    base = ["--truth", truth_dir, "--pred", pred_dir, "--num-classes", C]

    val_txt.write_text(f"{val_ids[0]}\n\n{val_ids[1]}\n2007_999999\n{val_ids[2]}\n")
    code, out, err = _cli(capsys, *base, "--split", val_txt)
    assert code == 2 and out == ""
    assert f"{val_txt} line 4" in err and "2007_999999" in err
    assert "no truth file" in err and "no prediction file" in err

    train_id = "2007_000000"  # has truth, no prediction
    val_txt.write_text(f"{val_ids[0]}\n{train_id}\n")
    code, _, err = _cli(capsys, *base, "--split", val_txt)
    assert code == 2 and f"{val_txt} line 2" in err
    assert str(pred_dir / f"{train_id}.png") in err and "no truth file" not in err

    (pred_dir / f"{val_ids[1]}.png").rename(tmp_path / "moved.png")  # missing prediction
    code, _, err = _cli(capsys, *base, "--ids", val_ids[0], val_ids[1])
    assert code == 2 and "--ids item 2" in err and f"{val_ids[1]}.png" in err

    val_txt.write_text(f"{val_ids[0]}\n{val_ids[0]}\n")
    code, _, err = _cli(capsys, *base, "--split", val_txt)
    assert code == 2 and "listed twice" in err and "line 1" in err and "line 2" in err

    val_txt.write_text("../SegmentationClass/2007_000000\n")
    code, _, err = _cli(capsys, *base, "--split", val_txt)
    assert code == 2 and "not an image id" in err and "line 1" in err

    val_txt.write_text("\n\n")
    code, _, err = _cli(capsys, *base, "--split", val_txt)
    assert code == 2 and "no image ids" in err

    code, _, err = _cli(capsys, *base, "--split", tmp_path / "absent.txt")
    assert code == 2 and "absent.txt" in err and "cannot read" in err

    with pytest.raises(SystemExit):  # argparse: one way of choosing the subset
        main(["miou", *map(str, base), "--split", str(val_txt), "--ids", val_ids[0]])
