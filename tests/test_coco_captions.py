import json
import random
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitlab.data.coco_captions import (
    CocoCaptionsDataset,
    coco_paths,
    collate_captions,
    eval_transform,
    read_coco_captions,
    read_coco_captions_with_report,
    train_transform,
    validate_images,
)
from vitlab.data.synthetic.__main__ import main as synthetic_main
from vitlab.data.synthetic.coco_captions import (
    ASPECTS,
    PLURALS,
    SYNTHETIC_CLASSES,
    CocoCaptionsSyntheticSpec,
    _place_objects,
    generate_coco_captions,
)
from vitlab.data.synthetic.markers import is_complete
from vitlab.data.voc import (
    VOC2012_DIR,
    VOC_CLASSES,
    read_label_png,
    read_voc_split,
    voc_colormap,
    write_label_png,
)
from vitlab.errors import DatasetFormatError

SPEC = CocoCaptionsSyntheticSpec(seed=5, n_train=24, n_val=12, image_size=64)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return generate_coco_captions(tmp_path_factory.mktemp("coco") / "data", SPEC)


def _text_fn(caption: str, rng: random.Random) -> dict:
    """Stand-in for the caption labeler: two 'labels' drawn with the item's rng."""
    words = caption.lower().rstrip(".").split()
    return {
        "caption_tokens": torch.arange(4),
        "label_mask": torch.tensor([True, False]),
        "labels": [rng.choice(words), "<PAD>"],
    }


def _mentioned(caption: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {c for c in SYNTHETIC_CLASSES if c in words or PLURALS[c] in words}


def test_layout_and_read_back(coco):
    assert is_complete(coco)
    for split, n in (("train", SPEC.n_train), ("val", SPEC.n_val)):
        annotation_json, image_dir = coco_paths(coco, split)
        assert annotation_json == coco / "annotations" / f"captions_{split}2017.json"
        assert image_dir == coco / f"{split}2017"
        records, report = read_coco_captions_with_report(annotation_json, image_dir)
        assert len(records) == n == report.n_images
        assert report.skipped_no_captions == 0 and report.n_captions == 5 * n
        for r in records:
            assert len(r.captions) == 5 and len(set(r.captions)) == 5
            assert re.fullmatch(r"\d{12}\.jpg", r.path.name)
            with Image.open(r.path) as img:
                assert img.size == (r.width, r.height)
                assert min(img.size) == SPEC.image_size
    train_ids = {r.image_id for r in read_coco_captions(*coco_paths(coco, "train"))}
    val_ids = {r.image_id for r in read_coco_captions(*coco_paths(coco, "val"))}
    assert not train_ids & val_ids
    with pytest.raises(ValueError, match="split"):
        coco_paths(coco, "test")


def test_generation_is_deterministic(coco, tmp_path):
    again = generate_coco_captions(tmp_path / "again", SPEC)
    for rel in ("annotations/captions_train2017.json", "annotations/captions_val2017.json"):
        assert (again / rel).read_bytes() == (coco / rel).read_bytes()
    voc = VOC2012_DIR / "SegmentationClass"
    for path in sorted((coco / voc).iterdir())[:5]:
        assert (again / voc / path.name).read_bytes() == path.read_bytes()
    other = generate_coco_captions(
        tmp_path / "other", CocoCaptionsSyntheticSpec(seed=6, n_train=2, n_val=1)
    )
    assert (other / "annotations/captions_val2017.json").read_bytes() != (
        coco / "annotations/captions_val2017.json"
    ).read_bytes()


def test_voc_masks_match_captions(coco):
    val = read_coco_captions(*coco_paths(coco, "val"))
    samples = read_voc_split(coco / VOC2012_DIR, "val")
    assert [s.image_id for s in samples] == [f"2017_{r.image_id:06d}" for r in val]
    train = read_voc_split(coco / VOC2012_DIR, "train")
    trainval = read_voc_split(coco / VOC2012_DIR, "trainval")
    assert len(train) == SPEC.n_train and len(trainval) == SPEC.n_train + SPEC.n_val
    palette = voc_colormap().reshape(-1).tolist()
    object_ids = {VOC_CLASSES.index(c) for c in SYNTHETIC_CLASSES}
    seen: set[int] = set()
    for record, sample in zip(val, samples):
        assert sample.image_path.read_bytes() == record.path.read_bytes()  # same pictures
        with Image.open(sample.label_path) as png:
            assert png.mode == "P"
            assert png.getpalette()[: 3 * 21] == palette[: 3 * 21]
            assert png.size == (record.width, record.height)
        labels = read_label_png(sample.label_path)
        values = set(np.unique(labels).tolist())
        assert values <= {0, 255} | object_ids and {0, 255} <= values
        present = {VOC_CLASSES[v] for v in values - {0, 255}}
        assert present, "every picture has an object"
        seen |= present
        for caption in record.captions:
            assert _mentioned(caption) == present, (caption, present)
        # 255 is a thin band: it borders objects, it does not cover them
        objects = np.isin(labels, list(object_ids))
        assert (labels == 255).mean() < objects.mean()
    assert len(seen) >= 4


def _val_pictures(root) -> list[bytes]:
    val = read_coco_captions(*coco_paths(root, "val"))
    return [r.path.read_bytes() for r in val]


def test_generator_options_objects_scale_and_held_out_val(tmp_path):
    """min/max objects and object_scale shape every picture; the val pictures come from their
    own stream, so they stay the same whatever n_train is (and differ from the train ones)."""
    spec = CocoCaptionsSyntheticSpec(
        seed=3,
        n_train=10,
        n_val=6,
        image_size=64,
        min_objects=2,
        max_objects=2,
        object_scale=(0.5, 0.6),
    )
    rng = np.random.default_rng(0)
    for _ in range(30):
        objects = _place_objects(80, 64, spec, rng)
        assert 1 <= len(objects) <= 2  # a second object may find no free place
        for obj in objects:
            left, top, right, bottom = obj.box
            side = max(
                (right - left) / ASPECTS.get(obj.name, (1, 1))[0],
                (bottom - top) / ASPECTS.get(obj.name, (1, 1))[1],
            )
            assert 0.5 * 64 - 1e-6 <= side <= 0.6 * 64 + 1e-6
    assert any(len(_place_objects(80, 64, spec, rng)) == 2 for _ in range(5))
    root = generate_coco_captions(tmp_path / "a", spec)
    for record in read_coco_captions(*coco_paths(root, "train")):
        assert 1 <= len(_mentioned(record.captions[0])) <= 2
    more_train = replace(spec, n_train=14)
    again = generate_coco_captions(tmp_path / "b", more_train)
    assert _val_pictures(again) == _val_pictures(root)
    train = {r.path.read_bytes() for r in read_coco_captions(*coco_paths(root, "train"))}
    assert not train & set(_val_pictures(root))
    # a changed spec is a different dataset: the folder is regenerated, not reused
    assert is_complete(root, spec) and not is_complete(root, more_train)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"max_objects": 4}, "max_objects"),
        ({"object_scale": (0.6, 0.5)}, "object_scale"),
        ({"object_scale": (0.05, 0.5)}, "object_scale"),
    ],
)
def test_generator_option_checks(tmp_path, changes, message):
    spec = replace(CocoCaptionsSyntheticSpec(n_train=2, n_val=1), **changes)
    with pytest.raises(ValueError, match=message):
        generate_coco_captions(tmp_path / "x", spec)
    assert not (tmp_path / "x").exists()


def test_label_png_roundtrip_and_palette(tmp_path):
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert cmap[1].tolist() == [128, 0, 0] and cmap[15].tolist() == [192, 128, 128]
    assert cmap[255].tolist() == [224, 224, 192]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[20] == "tvmonitor"
    labels = np.array([[0, 8, 255], [3, 3, 0]], dtype=np.uint8)
    write_label_png(tmp_path / "m.png", labels)
    assert np.array_equal(read_label_png(tmp_path / "m.png"), labels)
    Image.new("RGB", (3, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetFormatError, match="rgb.png"):
        read_label_png(tmp_path / "rgb.png")
    with pytest.raises(DatasetFormatError, match="missing.png"):
        read_label_png(tmp_path / "missing.png")


def test_dataset_items_epochs_and_reproducibility(coco):
    records = read_coco_captions(*coco_paths(coco, "train"))
    ds = CocoCaptionsDataset(records, eval_transform(32), text_fn=_text_fn, seed=123)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["index"] == 3 and item["caption"] in records[3].captions
    assert set(item) >= {"caption_tokens", "label_mask", "labels"}

    def epoch_captions(dataset, epoch):
        dataset.set_epoch(epoch)
        return [dataset[i]["caption"] for i in range(len(dataset))], [
            dataset[i]["labels"] for i in range(len(dataset))
        ]

    first, labels0 = epoch_captions(ds, 0)
    assert epoch_captions(ds, 0) == (first, labels0)  # reproducible
    second, _ = epoch_captions(ds, 1)
    assert sum(a != b for a, b in zip(first, second)) > len(ds) // 2  # epochs differ
    same_seed = CocoCaptionsDataset(records, eval_transform(32), text_fn=_text_fn, seed=123)
    assert epoch_captions(same_seed, 0)[0] == first
    other_seed = CocoCaptionsDataset(records, eval_transform(32), text_fn=_text_fn, seed=7)
    assert epoch_captions(other_seed, 0)[0] != first
    # over a few epochs every image shows several of its captions
    seen = [set() for _ in records]
    for epoch in range(8):
        for i, c in enumerate(epoch_captions(ds, epoch)[0]):
            seen[i].add(c)
    assert np.mean([len(s) for s in seen]) > 3


def test_dataloader_workers_match_single_process_and_collate(coco):
    records = read_coco_captions(*coco_paths(coco, "val"))
    ds = CocoCaptionsDataset(records, train_transform(32, randaugment=True), _text_fn, seed=1)
    loader = DataLoader(
        ds, batch_size=5, num_workers=2, persistent_workers=True, collate_fn=collate_captions
    )
    by_epoch = []
    for epoch in range(2):
        ds.set_epoch(epoch)  # persistent workers see it: the epoch is in shared memory
        batches = list(loader)
        by_epoch.append([c for b in batches for c in b["caption"]])
        assert by_epoch[-1] == [ds[i]["caption"] for i in range(len(ds))]
    assert by_epoch[0] != by_epoch[1]
    batch = batches[0]
    assert batch["image"].shape == (5, 3, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["caption_tokens"].shape == (5, 4)
    assert batch["label_mask"].dtype == torch.bool and batch["label_mask"].shape == (5, 2)
    assert isinstance(batch["labels"], list) and all(
        isinstance(lab, list) and lab[1] == "<PAD>" for lab in batch["labels"]
    )
    assert [len(b["caption"]) for b in batches] == [5, 5, 2]


def test_transforms_normalise():
    img = Image.new("RGB", (80, 50), (124, 116, 104))  # ~ImageNet mean
    out = eval_transform(40)(img)
    assert out.shape == (3, 40, 40) and out.abs().max() < 0.05
    torch.manual_seed(0)
    out = train_transform(40, scale=(0.5, 1.0))(img)
    assert out.shape == (3, 40, 40)


def _write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _official(coco, split="val"):
    annotation_json, image_dir = coco_paths(coco, split)
    return json.loads(annotation_json.read_text()), image_dir


def test_bad_annotation_files(coco, tmp_path):
    data, image_dir = _official(coco)
    with pytest.raises(DatasetFormatError, match="not found"):
        read_coco_captions(tmp_path / "nope.json", image_dir)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="junk.json"):
        read_coco_captions(tmp_path / "junk.json", image_dir)

    no_key = _write_json(tmp_path / "a.json", {"images": data["images"]})
    with pytest.raises(DatasetFormatError, match=r"a\.json.*'annotations'"):
        read_coco_captions(no_key, image_dir)
    broken = json.loads(json.dumps(data))
    del broken["images"][2]["file_name"]
    with pytest.raises(DatasetFormatError, match=r"b\.json.*images\[2\].*file_name"):
        read_coco_captions(_write_json(tmp_path / "b.json", broken), image_dir)
    broken = json.loads(json.dumps(data))
    del broken["annotations"][0]["caption"]
    with pytest.raises(DatasetFormatError, match=r"annotations\[0\].*caption"):
        read_coco_captions(_write_json(tmp_path / "c.json", broken), image_dir)

    unknown = json.loads(json.dumps(data))
    unknown["annotations"].append({"image_id": 999_999_999, "id": 1, "caption": "a cat"})
    with pytest.raises(DatasetFormatError, match="unknown image id 999999999"):
        read_coco_captions(_write_json(tmp_path / "d.json", unknown), image_dir)

    empty = {"images": [], "annotations": []}
    with pytest.raises(DatasetFormatError, match=r"e\.json.*'images' is empty"):
        read_coco_captions(_write_json(tmp_path / "e.json", empty), image_dir)

    duplicate = json.loads(json.dumps(data))
    duplicate["images"].append(dict(duplicate["images"][0]))
    with pytest.raises(DatasetFormatError, match="listed twice"):
        read_coco_captions(_write_json(tmp_path / "f.json", duplicate), image_dir)

    missing_file = json.loads(json.dumps(data))
    missing_file["images"][0]["file_name"] = "000000000001.jpg"
    with pytest.raises(DatasetFormatError, match="000000000001.jpg"):
        read_coco_captions(_write_json(tmp_path / "g.json", missing_file), image_dir)


def test_images_without_captions_are_skipped_and_counted(coco, tmp_path):
    data, image_dir = _official(coco)
    dropped = {data["images"][0]["id"], data["images"][1]["id"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in dropped]
    data["annotations"][0]["caption"] = "  \n"
    path = _write_json(tmp_path / "captions.json", data)
    records, report = read_coco_captions_with_report(path, image_dir)
    assert report.skipped_no_captions == 2 and report.empty_captions == 1
    assert len(records) == SPEC.n_val - 2 and not dropped & {r.image_id for r in records}
    assert report.n_captions == 5 * (SPEC.n_val - 2) - 1
    assert len(read_coco_captions(path, image_dir)) == SPEC.n_val - 2


def test_corrupt_images(coco, tmp_path):
    src_json, src_dir = coco_paths(coco, "val")
    image_dir = tmp_path / "val2017"
    shutil.copytree(src_dir, image_dir)
    records = read_coco_captions(src_json, image_dir)
    truncated, garbage = records[1].path, records[4].path
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage.write_bytes(b"definitely not a jpeg")
    good, bad = validate_images(records, workers=4)
    assert sorted(bad) == sorted([truncated, garbage])
    assert len(good) == len(records) - 2 and truncated not in {r.path for r in good}
    assert validate_images(records, workers=1)[1] == bad
    ds = CocoCaptionsDataset(records, eval_transform(32))
    with pytest.raises(DatasetFormatError, match=truncated.name):
        ds[1]
    assert CocoCaptionsDataset(good, eval_transform(32))[1]["image"].shape == (3, 32, 32)


def test_cli_subcommand(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["coco_captions", str(out), "--seed", "2", "--n-train", "3", "--n-val", "2"]
    assert synthetic_main([*args, "--image-size", "48"]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(read_coco_captions(*coco_paths(out, "train"))) == 3
    val = read_coco_captions(*coco_paths(out, "val"))
    assert len(val) == 2 and min(val[0].height, val[0].width) == 48
    assert len(read_voc_split(out / VOC2012_DIR, "val")) == 2
