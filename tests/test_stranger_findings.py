"""Inputs a new user tried that used to print a traceback or mislead (exit 2 with a message now)."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from vitlab.cli import default_cache_dir
from vitlab.data.fungiclef import read_metadata
from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef
from vitlab.errors import ConfigError, DatasetFormatError
from vitlab.pipelines.base import ensure_generated
from vitlab.pipelines.plantclef import load_head_module


def test_latin1_fungiclef_metadata_names_file_and_line(tmp_path):
    csv = tmp_path / "FungiCLEF2023_train_metadata_PRODUCTION.csv"
    csv.write_bytes(
        "observationID,image_path,class_id\n1,a.JPG,3\n2,Tr\xe6.JPG,4\n".encode("latin-1")
    )
    with pytest.raises(
        DatasetFormatError, match=r"metadata_PRODUCTION.csv:3: not UTF-8 \(byte 0xE6\)"
    ):
        read_metadata(csv, labelled=False)


def test_infer_refuses_a_checkpoint_of_another_module(tmp_path):
    """A FungiCLEF fold checkpoint given to infer.py: a ConfigError, not a TypeError."""
    path = tmp_path / "best.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"head": {}, "embed_dim": 8, "species_ids": [1, 2]},
            "pytorch-lightning_version": "2.6.6",
        },
        path,
    )
    with pytest.raises(ConfigError, match="not a PlantCLEF head checkpoint"):
        load_head_module(path)


def test_cache_cli_looks_where_train_py_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("VITLAB_CACHE", raising=False)
    monkeypatch.setenv("VITLAB_ROOT", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "vitlab"
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"


def test_refused_folder_is_not_announced_as_being_generated(tmp_path, caplog):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    config = OmegaConf.create({"root": str(tmp_path / "mine"), "synthetic": {"seed": 0}})
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError, match="left untouched"):
        ensure_generated(config, generate_plantclef, PlantClefSyntheticSpec, "PlantCLEF")
    assert "generating" not in caplog.text


@pytest.mark.parametrize(
    ("config", "overrides", "key"),
    [
        ("infer", ["dataset=plantclef"], "dataset.root"),
        ("infer", ["predictor=backbone_classifier", "backbone=timm"], "backbone.name"),
        ("infer", ["pipeline=segmentation", "dataset=pascal_voc"], "dataset.root"),
        (
            "train",
            ["experiment=groupvit_finetune_baseline", "groupvit/model=nvlabs", "dataset.root=/d"],
            "groupvit.model.source",
        ),
    ],
)
def test_unset_mandatory_keys_are_named_in_every_pipeline(config, overrides, key, tmp_path):
    from tests.conftest import compose_config
    from vitlab.pipelines import load

    cfg = compose_config(config, ["logger=csv", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=rf"{key} is not set \(\?\?\? in its config\): set"):
        pipeline = load(cfg.pipeline)
        (pipeline.validate_train if config == "train" else pipeline.infer)(cfg)
