from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from vitlab.data.segmentation import (
    DATASETS,
    SegmentationSample,
    dataset_samples,
    ensure_synthetic_voc,
    load_image,
    read_label_map,
    samples_from_config,
    segmentation_spec,
    spec_from_config,
)
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec, generate_coco_captions
from vitlab.data.voc import VOC_CLASSES, read_voc_split, write_label_png
from vitlab.errors import DatasetFormatError
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "dataset"


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _label(path: Path, values: list[int]) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.resize(np.array(values, dtype=np.uint8), (12, 16))
    write_label_png(path, labels)
    return labels


def make_voc_like(root: Path, labels_dir: str, splits_dir: str, ids: list[str], values) -> Path:
    for n, i in enumerate(ids):
        _image(root / "JPEGImages" / f"{i}.jpg", n)
        _label(root / labels_dir / f"{i}.png", values)
    (root / splits_dir).mkdir(parents=True, exist_ok=True)
    (root / splits_dir / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def make_scan_layout(root: Path, split: str, ids: list[str], suffix: str, values) -> Path:
    for n, i in enumerate(ids):
        _image(root / "images" / split / f"{i}.jpg", n)
        _label(root / "annotations" / split / f"{i}{suffix}", values)
    return root


@pytest.fixture
def voc(tmp_path):
    return make_voc_like(
        tmp_path / "VOCdevkit" / "VOC2012",
        "SegmentationClass",
        "ImageSets/Segmentation",
        ["2007_000033", "2007_000042", "2007_000061"],
        [0, 1, 20, 255],
    )


def test_class_counts_names_and_background():
    counts = {name: spec.num_classes for name, spec in DATASETS.items()}
    assert counts == {
        "pascal_voc": 21,
        "pascal_context": 60,
        "coco_object": 81,
        "ade20k": 150,
        "synthetic_voc": 21,
    }
    voc = segmentation_spec("pascal_voc")
    # GroupViT's prompt names; label indices are those of the official list
    assert voc.class_names[11] == "table" and VOC_CLASSES[11] == "diningtable"
    assert voc.class_names[16] == "plant" and voc.class_names[20] == "monitor"
    assert segmentation_spec("synthetic_voc").class_names == voc.class_names
    context = segmentation_spec("pascal_context")
    assert context.class_names[:3] == ("background", "airplane", "bag")
    assert {"plant", "monitor", "table"} <= set(context.class_names)
    assert not {"aeroplane", "pottedplant", "tvmonitor"} & set(context.class_names)
    coco = segmentation_spec("coco_object")
    assert coco.class_names[1] == "person" and coco.class_names[-1] == "toothbrush"
    assert {"dining table", "potted plant", "tv", "traffic light"} <= set(coco.class_names)
    ade = segmentation_spec("ade20k")
    assert ade.class_names[0] == "wall" and ade.class_names[7] == "bed"
    assert ade.class_names[-1] == "flag"
    for spec in DATASETS.values():
        assert spec.has_background == (spec.class_names[0] == "background")
        assert len(spec.prompt_names) == spec.num_classes - spec.has_background
        assert "background" not in spec.prompt_names
        assert all(n == n.strip() for n in spec.class_names)
    assert ade.reduce_zero_label and not ade.has_background
    assert not any(DATASETS[n].reduce_zero_label for n in DATASETS if n != "ade20k")
    thresholds = {n: s.bg_threshold for n, s in DATASETS.items()}
    assert thresholds["pascal_voc"] == 0.95 and thresholds["coco_object"] == 0.9
    assert thresholds["pascal_context"] == 0.35


def test_pascal_voc(voc):
    samples = dataset_samples("pascal_voc", voc)
    assert [s.sample_id for s in samples] == ["2007_000033", "2007_000042", "2007_000061"]
    assert samples[0] == SegmentationSample(
        voc / "JPEGImages/2007_000033.jpg",
        voc / "SegmentationClass/2007_000033.png",
        "2007_000033",
    )
    labels = read_label_map(samples[0].label_path, segmentation_spec("pascal_voc"))
    assert labels.dtype == np.int64 and labels.shape == (12, 16)
    assert set(np.unique(labels).tolist()) == {0, 1, 20, 255}
    img = load_image(samples[0].image_path)
    assert img.mode == "RGB" and img.size == (16, 12)
    assert [s.sample_id for s in dataset_samples("pascal_voc", voc, limit=2)] == [
        "2007_000033",
        "2007_000042",
    ]
    # the extended VOC helper still reads the default layout the same way
    assert [s.image_id for s in read_voc_split(voc, "val")] == [s.sample_id for s in samples]


def test_pascal_context(tmp_path):
    root = make_voc_like(
        tmp_path / "VOCdevkit" / "VOC2010",
        "SegmentationClassContext",
        "ImageSets/SegmentationContext",
        ["2008_000002", "2008_000007"],
        [0, 5, 59],
    )
    spec = segmentation_spec("pascal_context")
    samples = dataset_samples("pascal_context", root)
    assert [s.sample_id for s in samples] == ["2008_000002", "2008_000007"]
    assert samples[1].label_path == root / "SegmentationClassContext/2008_000007.png"
    labels = read_label_map(samples[0].label_path, spec)
    assert set(np.unique(labels).tolist()) == {0, 5, 59}
    # a folder without the Context split list: the missing list is named
    with pytest.raises(DatasetFormatError, match="SegmentationContext/val.txt"):
        dataset_samples("pascal_context", tmp_path)


def test_coco_object(tmp_path):
    root = make_scan_layout(
        tmp_path / "coco",
        "val2017",
        ["000000000785", "000000000139"],
        "_instanceTrainIds.png",
        [0, 1, 80],
    )
    samples = dataset_samples("coco_object", root)
    assert [s.sample_id for s in samples] == ["000000000139", "000000000785"]  # sorted
    assert samples[0].label_path == (root / "annotations/val2017/000000000139_instanceTrainIds.png")
    assert dataset_samples("coco_object", root, split="val2017") == samples
    labels = read_label_map(samples[0].label_path, segmentation_spec("coco_object"))
    assert set(np.unique(labels).tolist()) == {0, 1, 80}
    # the unconverted COCO-Stuff maps (<id>.png) are not accepted: the conversion is named
    (root / "annotations/val2017/000000000139_instanceTrainIds.png").rename(
        root / "annotations/val2017/000000000139.png"
    )
    with pytest.raises(DatasetFormatError, match=r"000000000139_instanceTrainIds\.png.*convert"):
        dataset_samples("coco_object", root)


def test_ade20k_reduce_zero_label_applied_once(tmp_path):
    root = make_scan_layout(
        tmp_path / "ADEChallengeData2016",
        "validation",
        ["ADE_val_00000001", "ADE_val_00000002"],
        ".png",
        [0, 1, 2, 150],
    )
    spec = segmentation_spec("ade20k")
    samples = dataset_samples("ade20k", root, "val")
    assert [s.sample_id for s in samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    raw = read_label_map(samples[0].label_path, spec)
    assert set(np.unique(raw).tolist()) == {0, 1, 2, 150}
    reduced = read_label_map(samples[0].label_path, spec, reduce=True)
    assert set(np.unique(reduced).tolist()) == {255, 0, 1, 149}
    np.testing.assert_array_equal(reduced[raw == 0], 255)
    np.testing.assert_array_equal(reduced[raw == 150], 149)
    # the metric on the RAW map (reduce_zero_label from the spec) == plain metric on the reduced
    pred = np.where(reduced == 255, 0, reduced)
    via_metric = ConfusionMatrixAccumulator(**spec.metric_kwargs()).update(pred, raw)
    plain = ConfusionMatrixAccumulator(spec.num_classes).update(pred, reduced)
    np.testing.assert_array_equal(via_metric.matrix, plain.matrix)
    assert via_metric.matrix.sum() == (raw != 0).sum()


def test_label_values_out_of_range_named(tmp_path):
    path = tmp_path / "bad.png"
    write_label_png(path, np.array([[0, 21], [30, 255]]))
    with pytest.raises(DatasetFormatError, match=r"bad\.png.*\[21, 30\].*0\.\.20"):
        read_label_map(path, segmentation_spec("pascal_voc"))
    # 150 is a valid raw ADE20K label (reduce_zero_label), 151 is not
    write_label_png(path, np.array([[150, 151]]))
    with pytest.raises(DatasetFormatError, match=r"\[151\].*0\.\.150"):
        read_label_map(path, segmentation_spec("ade20k"))
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(rgb)
    with pytest.raises(DatasetFormatError, match="rgb.png"):
        read_label_map(rgb, segmentation_spec("pascal_voc"))


def test_errors_name_the_culprit(voc, tmp_path):
    with pytest.raises(ValueError, match=r"unknown segmentation dataset 'voc'.*pascal_voc"):
        dataset_samples("voc", voc)
    with pytest.raises(DatasetFormatError, match=r"root not found: .*nowhere.*VOCdevkit/VOC2012"):
        dataset_samples("pascal_voc", tmp_path / "nowhere")
    with pytest.raises(DatasetFormatError, match=r"Segmentation/test\.txt"):
        dataset_samples("pascal_voc", voc, split="test")
    with pytest.raises(ValueError, match="limit"):
        dataset_samples("pascal_voc", voc, limit=0)

    (voc / "JPEGImages/2007_000042.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"val\.txt.*JPEGImages.*2007_000042\.jpg"):
        dataset_samples("pascal_voc", voc)
    _image(voc / "JPEGImages/2007_000042.jpg")
    (voc / "SegmentationClass/2007_000061.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"SegmentationClass.*2007_000061\.png"):
        dataset_samples("pascal_voc", voc)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n\n")
    with pytest.raises(DatasetFormatError, match=r"val\.txt: no image ids"):
        dataset_samples("pascal_voc", voc)

    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "validation").mkdir(parents=True)
    (ade / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"no '\*\.jpg' images in .*validation"):
        dataset_samples("ade20k", ade)
    with pytest.raises(DatasetFormatError, match=r"images/testing.*known splits"):
        dataset_samples("ade20k", ade, split="testing")

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match="broken.jpg"):
        load_image(broken)


def test_configs_match_specs(tmp_path):
    names = sorted(DATASETS)  # configs/dataset also holds the training datasets
    assert all((CONFIG_DIR / f"{name}.yaml").is_file() for name in names)
    for name in names:
        cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        assert cfg["name"] == name and cfg["split"] == "val" and cfg["limit"] is None
        # the threshold is declared once, in DATASETS: a config holds only the deprecated
        # `dataset.bg_threshold` placeholder (ade20k: no background, no key)
        if DATASETS[name].has_background:
            assert cfg["bg_threshold"] is None
        else:
            assert "bg_threshold" not in cfg
        assert ("synthetic" in cfg) == (name == "synthetic_voc")
        assert cfg["root"] == "???" or name == "synthetic_voc"
    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(tmp_path)},
            "segmentation_dataset": OmegaConf.load(CONFIG_DIR / "synthetic_voc.yaml"),
        }
    ).segmentation_dataset
    assert cfg.root == f"{tmp_path}/synthetic/coco_captions_seed0/VOCdevkit/VOC2012"
    assert spec_from_config(cfg).bg_threshold == DATASETS["synthetic_voc"].bg_threshold
    cfg.bg_threshold = 0.99  # the deprecated key is still read
    with pytest.warns(FutureWarning, match="use segmentation.bg_threshold=0.99"):
        spec = spec_from_config(cfg)
    assert spec.bg_threshold == 0.99
    assert spec.class_names == segmentation_spec("pascal_voc").class_names


def test_synthetic_voc_generated_and_read(tmp_path):
    out = generate_coco_captions(
        tmp_path / "syn", CocoCaptionsSyntheticSpec(seed=1, n_train=3, n_val=4, image_size=48)
    )
    root = out / "VOCdevkit" / "VOC2012"
    spec = segmentation_spec("synthetic_voc")
    samples = dataset_samples("synthetic_voc", root)
    assert len(samples) == 4 and dataset_samples("synthetic_voc", root, "train")[0].sample_id
    seen = set()
    for s in samples:
        assert load_image(s.image_path).size == Image.open(s.label_path).size
        seen |= set(np.unique(read_label_map(s.label_path, spec)).tolist())
    names = {spec.class_names[i] for i in seen if i != 255}
    assert "background" in names and names <= {"background", "cat", "car", "bird", "boat", "sheep"}


def test_ensure_synthetic_voc_generates_once(tmp_path):
    cfg = {
        "name": "synthetic_voc",
        "root": str(tmp_path / "syn" / "VOCdevkit" / "VOC2012"),
        "split": "val",
        "bg_threshold": 0.95,
        "limit": 2,
        "synthetic": {"seed": 2, "n_train": 2, "n_val": 3, "image_size": 40},
    }
    samples = samples_from_config(cfg)
    assert len(samples) == 2
    marker = tmp_path / "syn" / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert ensure_synthetic_voc(cfg) == Path(cfg["root"])
    assert marker.stat().st_mtime_ns == stamp  # complete: not regenerated
    with pytest.raises(ValueError, match="VOCdevkit"):
        ensure_synthetic_voc({**cfg, "root": str(tmp_path / "elsewhere")})
    # real datasets: nothing generated, the root is checked by dataset_samples
    real = {"name": "pascal_voc", "root": str(tmp_path / "none"), "split": "val", "limit": None}
    assert ensure_synthetic_voc(real) == tmp_path / "none"
    with pytest.raises(DatasetFormatError, match="root not found"):
        samples_from_config(real)
