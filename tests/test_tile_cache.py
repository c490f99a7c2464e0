"""Test tiles are a cached stage (issue 16): the cached path predicts what the direct path
predicts, a rerun or a head-only change does no backbone forward, the key follows what the
embeddings depend on (files, boxes, tile fit, backbone, features) and nothing else, batches are
filled across quadrats, a killed stage resumes, and sweep trials skip the test set unless the
objective needs it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.pipelines.plantclef.tiles as tiles_module
from tests.conftest import TINY_PLANTCLEF_RUN, compose_config
from vitlab.errors import ConfigError
from vitlab.inference.plantclef import FullImageTopK, GridArgmax, GridTopK
from vitlab.models.backbones import create_backbone
from vitlab.models.features import ClsToken
from vitlab.pipelines.base import build_backbone
from vitlab.pipelines.plantclef import train
from vitlab.pipelines.plantclef.predict import EmbeddingHeadPredictor, predict_quadrats
from vitlab.pipelines.plantclef.tiles import embed_test_tiles, predict_from_tiles, tiles_key
from vitlab.stages.embed import torch_threads
from vitlab.sweep_driver import trial_predicts_test

TINY = {"img_size": 32, "depth": 1}


def _backbone():
    return create_backbone(
        "timm", name="vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, input_size=32
    )


def _quadrats(folder: Path, n: int = 5) -> list[Path]:
    """n random quadrats, one too small for a 3x3 grid and one corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"plot{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 90, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    Image.new("RGB", (2, 2)).save(folder / "small.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return sorted([*paths, folder / "small.png", folder / "broken.jpg"])


class _CountingBackbone:
    """Counts the tiles of every backbone forward (wraps the instance's forward_tokens)."""

    def __init__(self, backbone):
        self.batches: list[int] = []
        original = backbone.forward_tokens

        def counted(pixels):
            self.batches.append(len(pixels))
            return original(pixels)

        backbone.forward_tokens = counted


def test_cached_tiles_predict_what_the_direct_path_predicts(tmp_path):
    images = _quadrats(tmp_path / "test")
    backbone, features = _backbone(), ClsToken()
    torch.manual_seed(0)
    head = torch.nn.Linear(192, 4)
    species = [11, 22, 33, 44]
    for strategy in (GridArgmax(3), GridTopK(2, k_per_tile=3, top_l=2), FullImageTopK(2)):
        direct = predict_quadrats(
            images, strategy, EmbeddingHeadPredictor(backbone, features, head, species), 5
        )
        stage, embedded = embed_test_tiles(
            images, tmp_path / "test", strategy, backbone, features, tmp_path / "cache"
        )
        cached = predict_from_tiles(stage, strategy, head, species)
        assert embedded == len(images)
        assert cached.predictions == direct.predictions
        assert list(cached.predictions) == [p.stem for p in images]  # in file order
        assert cached.tile_count == direct.tile_count
        assert cached.skipped == direct.skipped and "broken.jpg" in cached.skipped[0]


def test_rerun_and_head_changes_do_no_forward_and_the_key_follows_the_inputs(tmp_path):
    images = _quadrats(tmp_path / "test")
    root = tmp_path / "test"
    backbone, features = _backbone(), ClsToken()
    counter = _CountingBackbone(backbone)
    with torch_threads(1):  # one forward per batch (2 threads: each batch split in two)
        first, embedded = embed_test_tiles(
            images, root, GridTopK(3, top_l=5), backbone, features, tmp_path / "c", batch_size=8
        )
    assert embedded == len(images)
    assert sum(counter.batches) == 9 * 5  # five 3x3 quadrats; the 2 skipped ones: none
    assert all(b == 8 for b in counter.batches[:-1]), counter.batches  # filled across quadrats
    counter.batches.clear()
    # a rerun, and another aggregation of the same boxes: no forward
    again, embedded = embed_test_tiles(
        images, root, GridTopK(3, top_l=2), backbone, features, tmp_path / "c", batch_size=8
    )
    assert (again.key, embedded, counter.batches) == (first.key, 0, [])
    key = first.key

    def other(**change):
        args = {
            "images": images,
            "root": root,
            "strategy": GridArgmax(3),
            "tile_fit": "center_crop",
            "backbone": backbone,
            "features": features,
        }
        return tiles_key(**{**args, **change})

    assert other() == key  # GridArgmax(3) has the same boxes as GridTopK(3)
    assert other(strategy=GridArgmax(4)) != key
    assert other(strategy=FullImageTopK()) != key
    assert other(tile_fit="pad") != key
    assert other(images=images[:-1]) != key
    os.utime(images[0], ns=(1, 1))  # a replaced/touched quadrat
    assert other() != key


def test_a_killed_tile_stage_resumes_with_the_missing_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(tiles_module, "QUADRATS_PER_SHARD", 2)
    images = _quadrats(tmp_path / "test")  # 7 files: shards of 2, 2, 2, 1
    backbone, features = _backbone(), ClsToken()
    original = tiles_module.TileEmbedTask.run
    calls = []

    def dies_on_third_shard(self, loaded, progress):
        calls.append(len(calls))
        if len(calls) == 3:  # while shard 2 is on the device (shard 3 loading ahead)
            raise KeyboardInterrupt
        return original(self, loaded, progress)

    monkeypatch.setattr(tiles_module.TileEmbedTask, "run", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        embed_test_tiles(images, tmp_path / "test", GridArgmax(2), backbone, features, tmp_path)
    monkeypatch.setattr(tiles_module.TileEmbedTask, "run", original)
    counter = _CountingBackbone(backbone)
    stage, embedded = embed_test_tiles(
        images, tmp_path / "test", GridArgmax(2), backbone, features, tmp_path, batch_size=64
    )
    assert embedded == 3  # shards 2 and 3 only
    assert sum(counter.batches) == 3 * 4  # plot3, plot4, small.png (2x2 px: 4 tiles of 1 px)
    assert stage.complete and len(stage.shard_indices()) == 4


def _train(tmp_path, data, *extra):
    fast = ["trainer.max_epochs=2", "logger=csv", "runtime.threads=1"]
    overrides = [*TINY_PLANTCLEF_RUN, *fast, f"dataset.root={data}", *extra]
    return train(compose_config("train", overrides, tmp_path))


def test_a_head_only_rerun_predicts_from_the_cache(tiny_plantclef, tmp_path):
    first = _train(tmp_path / "a", tiny_plantclef)
    report = first["predict_report"]
    assert report["quadrats_embedded"] == report["plots"] > 0
    shutil.copytree(tmp_path / "a" / "cache", tmp_path / "b" / "cache")
    second = _train(tmp_path / "b", tiny_plantclef, "optimizer.lr=0.01", "inference=grid_topk")
    assert second["predict_report"]["quadrats_embedded"] == 0
    assert second["cache_keys"]["tiles"] == first["cache_keys"]["tiles"]
    assert second["predict_report"]["tiles"] == report["tiles"]
    assert "test/macro_f1_per_plot" in second["metrics"]


def test_predict_test_false_skips_the_test_set(tiny_plantclef, tmp_path):
    summary = _train(tmp_path, tiny_plantclef, "predict.test=false")
    assert summary["predict_report"] == {"skipped": "predict.test=false"}
    assert "embed_tiles" not in summary["stage_seconds"]
    assert not (tmp_path / "run" / "submission.csv").exists()
    assert not (tmp_path / "cache" / "tiles").exists()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["status"] == "completed" and "val_images/macro_f1" in saved["metrics"]


@pytest.mark.parametrize(
    "choice, metric, expected",
    [
        ("auto", "val_images/macro_f1", False),
        ("auto", "test/macro_f1_per_plot", True),
        (True, "val_images/macro_f1", True),
        (False, "test/macro_f1_per_plot", False),
    ],
)
def test_sweep_trials_predict_the_test_set_only_when_asked(choice, metric, expected):
    from omegaconf import OmegaConf

    assert trial_predicts_test(OmegaConf.create({"predict_test": choice}), metric) is expected


def test_a_bad_predict_test_value_names_the_key():
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="sweep.predict_test"):
        trial_predicts_test(OmegaConf.create({"predict_test": "sometimes"}), "x")


def test_the_backbone_is_built_once_per_process_until_its_files_change(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(_backbone().model.state_dict(), weights)
    node = {
        "_target_": "vitlab.models.backbones.create_backbone",
        "kind": "timm",
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "checkpoint_path": str(weights),
        "model_kwargs": TINY,
        "input_size": 32,
    }
    first = build_backbone(node)
    assert build_backbone(dict(node)) is first
    assert build_backbone({**node, "input_size": 32, "seed": 1}) is not first
    again = build_backbone(node)
    os.utime(weights, ns=(5, 5))  # new weights in the same file
    assert build_backbone(node) is not again


def test_the_cache_cli_lists_and_removes_tile_stages(tmp_path, capsys):
    from vitlab.cli import main as vitlab_cli

    images = _quadrats(tmp_path / "test")
    stage, _ = embed_test_tiles(
        images, tmp_path / "test", GridArgmax(2), _backbone(), ClsToken(), tmp_path / "cache"
    )
    assert vitlab_cli(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    listing = capsys.readouterr().out
    assert "tiles" in listing and stage.key in listing and "7 quadrats" in listing
    assert vitlab_cli(["cache", "rm", "--cache-dir", str(tmp_path / "cache"), "--stage", "tiles",
                       "--all"]) == 0  # fmt: skip
    assert not stage.directory.exists()
