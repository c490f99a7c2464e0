"""The one zero-shot evaluator (`inference.segmentation.evaluate_zero_shot`) and the rules its
two callers (`infer.py pipeline=segmentation`, `python -m vitlab.analysis compare`) share:
`is_local_checkpoint_path` and `resolve_device`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.conftest import compose_config
from vitlab.data.segmentation import DATASETS, dataset_samples, read_label_map
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec, generate_coco_captions
from vitlab.devices import resolve_device
from vitlab.errors import ConfigError, DatasetFormatError
from vitlab.inference.segmentation import (
    SegmentationSettings,
    class_text_embeddings,
    evaluate_zero_shot,
    segment_image,
)
from vitlab.metrics.segmentation import ConfusionMatrixAccumulator
from vitlab.models.groupvit.checkpoints import (
    CheckpointError,
    is_local_checkpoint_path,
    resolve_checkpoint_source,
)
from vitlab.models.groupvit.model import GroupViT, tiny_spec
from vitlab.pipelines.segmentation import validate_segmentation

SYNTHETIC = CocoCaptionsSyntheticSpec(seed=3, n_train=2, n_val=4, image_size=48)
SETTINGS = SegmentationSettings(short_side=48, crop=48, stride=24, crops_per_batch=8)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forward passes: one thread is faster on a busy machine
    root = tmp_path_factory.mktemp("evaluator")
    data = generate_coco_captions(root / "data", SYNTHETIC)
    torch.manual_seed(0)
    model = GroupViT(tiny_spec()).eval()
    spec = DATASETS["synthetic_voc"]
    yield {
        "root": data / "VOCdevkit" / "VOC2012",
        "model": model,
        "spec": spec,
        "text": class_text_embeddings(model, spec.prompt_names),
    }
    torch.set_num_threads(threads)


def test_evaluator_scores_every_image_and_hands_each_to_the_hook(voc):
    samples = dataset_samples("synthetic_voc", voc["root"], "val")
    seen = []
    result = evaluate_zero_shot(
        voc["model"],
        voc["spec"],
        samples,
        voc["text"],
        SETTINGS,
        on_sample=lambda sample, image, pred, truth: seen.append((sample, image, pred, truth)),
    )
    assert [s for s, *_ in seen] == samples
    assert result["n_images"] == len(samples) and result["skipped_images"] == 0
    assert result["dataset"] == "synthetic_voc" and len(result["iou"]) == 21
    # the hook's predictions and raw truths rebuild exactly the scores reported
    accumulator = ConfusionMatrixAccumulator(**voc["spec"].metric_kwargs())
    for sample, image, pred, truth in seen:
        assert pred.shape == truth.shape == (image.size[1], image.size[0])
        np.testing.assert_array_equal(truth, read_label_map(sample.label_path, voc["spec"]))
        np.testing.assert_array_equal(
            pred, segment_image(voc["model"], image, voc["text"], SETTINGS)
        )
        accumulator.update(pred, truth)
    assert accumulator.summary(list(voc["spec"].class_names))["miou"] == result["miou"]


def test_evaluator_skips_unreadable_images_and_refuses_when_none_is_left(voc, tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc["root"], root)
    samples = dataset_samples("synthetic_voc", root, "val")
    samples[0].image_path.write_bytes(b"not a jpeg")
    result = evaluate_zero_shot(voc["model"], voc["spec"], samples, voc["text"], SETTINGS)
    assert result["skipped_images"] == 1 and result["n_images"] == len(samples) - 1
    assert samples[0].sample_id in result["skipped"][0]
    for sample in samples[1:]:
        sample.image_path.write_bytes(b"")
    with pytest.raises(DatasetFormatError, match="none of the 4 image"):
        evaluate_zero_shot(voc["model"], voc["spec"], samples, voc["text"], SETTINGS)


@pytest.mark.parametrize(
    "source, kind, local",
    [
        ("nvidia/groupvit-gcc-yfcc", "auto", False),
        ("nvidia/groupvit-gcc-yfcc", "transformers", False),
        ("groupvit", "auto", False),  # a hub id without owner
        ("nvidia/groupvit-gcc-yfcc", "nvlabs", True),  # vitlab / nvlabs kinds are files
        ("model.pth", "auto", True),
        ("run/groupvit.pt", "auto", True),
        ("weights.safetensors", "auto", True),
        ("last.CKPT", "auto", True),
        ("/abs/dir", "auto", True),
        ("./dir", "auto", True),
        ("../dir", "auto", True),
        (".hidden", "auto", True),
        ("~/models/g", "auto", True),
        ("outputs/train/run/export", "auto", True),  # more than owner/name
        ("C:\\models\\g", "auto", True),
    ],
)
def test_one_rule_tells_local_paths_from_hub_ids(source, kind, local):
    assert is_local_checkpoint_path(source, kind) is local


def test_resolve_checkpoint_source_expands_and_names_a_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "g.pt").write_bytes(b"")
    assert resolve_checkpoint_source("~/g.pt") == str(tmp_path / "g.pt")
    assert resolve_checkpoint_source("nvidia/groupvit-gcc-yfcc") == "nvidia/groupvit-gcc-yfcc"
    with pytest.raises(CheckpointError, match="checkpoint not found: ~/missing.pt"):
        resolve_checkpoint_source("~/missing.pt")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint_source("owner/name", kind="vitlab")


def test_resolve_device_auto_and_refusals():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")


def test_pipeline_refuses_a_bad_device_before_any_work(tmp_path):
    cfg = compose_config(
        "infer", ["experiment=segment_synthetic_voc", "segmentation.device=gpu"], tmp_path
    )
    with pytest.raises(ConfigError, match="segmentation.device"):
        validate_segmentation(cfg)


def test_crops_batched_across_images_give_the_one_crop_at_a_time_labels(voc):
    """`segment_batched` puts the crops of consecutive images in one forward and sums them on
    the device: the labels are those of one crop per forward (float reordering aside)."""
    from dataclasses import replace

    samples = dataset_samples("synthetic_voc", voc["root"], "val")
    labels = {}
    for per_batch in (1, 7):
        settings = replace(SETTINGS, crops_per_batch=per_batch)
        labels[per_batch] = []
        evaluate_zero_shot(
            voc["model"],
            voc["spec"],
            samples,
            voc["text"],
            settings,
            on_sample=lambda sample, image, pred, truth, into=labels[per_batch]: into.append(pred),
        )
    agree = [(a == b).mean() for a, b in zip(labels[1], labels[7])]
    assert len(agree) == len(samples) and min(agree) >= 0.999
