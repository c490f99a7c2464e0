"""Issue 23: resuming from a checkpoint of another run fails before any stage (PlantCLEF) or
before the fit (every pipeline), naming ckpt_path and what differs, never exit 0 with all scores
0 or a traceback after prepare and embed."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import compose_config
from vitlab.errors import ConfigError
from vitlab.pipelines import load
from vitlab.safe_load import require_same_model
from vitlab.tasks.classification import EmbeddingClassifier

HEAD = {"_target_": "vitlab.models.heads.LinearHead"}
LOSS = {"_target_": "torch.nn.CrossEntropyLoss"}


def _module(species_ids: list[int], in_features: int = 4, context: dict | None = None):
    return EmbeddingClassifier(
        head=HEAD, loss=LOSS, in_features=in_features, species_ids=species_ids, context=context
    )


def _training_checkpoint(path: Path, module: EmbeddingClassifier) -> Path:
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "loops": {},
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def _context_of(cfg) -> dict:
    from vitlab.config import to_container

    return {
        "backbone": to_container(cfg.backbone),
        "features": to_container(cfg.features),
        "dataset": to_container(cfg.dataset),
    }


def test_a_checkpoint_of_another_dataset_is_refused_before_any_stage(tmp_path):
    trained = compose_config("train", ["dataset.root=/data/other_plots"], tmp_path / "a")
    checkpoint = _training_checkpoint(
        tmp_path / "last.ckpt", _module([1, 2, 3], context=_context_of(trained))
    )
    cfg = compose_config("train", [f"ckpt_path={checkpoint}"], tmp_path / "b")
    with pytest.raises(ConfigError, match=r"another dataset\.root \(/data/other_plots there"):
        load("plantclef").validate_train(cfg)
    same = compose_config(
        "train", [f"ckpt_path={checkpoint}", "dataset.root=/data/other_plots"], tmp_path / "c"
    )
    load("plantclef").validate_train(same)  # the same settings resume


def test_a_checkpoint_with_another_backbone_is_refused_before_any_stage(tmp_path):
    trained = compose_config("train", ["backbone.model_kwargs.depth=5"], tmp_path)
    checkpoint = _training_checkpoint(
        tmp_path / "last.ckpt", _module([1, 2], context=_context_of(trained))
    )
    cfg = compose_config("train", [f"ckpt_path={checkpoint}"], tmp_path)
    with pytest.raises(ConfigError, match=r"another backbone.model_kwargs.depth \(5 there, 4 here"):
        load("plantclef").validate_train(cfg)


def test_a_foreign_lightning_checkpoint_is_refused_before_any_stage(tmp_path):
    path = tmp_path / "fungi.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": {"lr": 0.1}}, path)
    cfg = compose_config("train", [f"ckpt_path={path}"], tmp_path)
    with pytest.raises(ConfigError, match="not a PlantCLEF training checkpoint"):
        load("plantclef").validate_train(cfg)


def test_mis_shaped_weights_are_named_before_the_fit():
    checkpoint = {"state_dict": _module([1, 2, 3], in_features=8).state_dict()}
    with pytest.raises(ConfigError, match=r"ckpt_path=x.*head\.\S+ has shape \[3, 8\]"):
        require_same_model(_module([1, 2, 3], in_features=4), checkpoint, "ckpt_path=x")
    foreign = {"state_dict": {"encoder.weight": torch.zeros(2)}}
    with pytest.raises(ConfigError, match="missing head.*unexpected encoder.weight"):
        require_same_model(_module([1, 2]), foreign, "ckpt_path=x")


def test_same_shapes_with_other_classes_are_refused():
    other = _module([7, 8, 9])
    checkpoint = {"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}
    with pytest.raises(ConfigError, match="other classes"):
        require_same_model(_module([1, 2, 3]), checkpoint, "ckpt_path=x")
    mine = _module([1, 2, 3])
    require_same_model(
        mine, {"state_dict": mine.state_dict(), "hyper_parameters": dict(mine.hparams)}, "x"
    )
