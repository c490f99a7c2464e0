"""Issue 23, item 1: a `_target_` is judged by the object Hydra would build, not by its string.
Attribute chains (`vitlab.safe_load.torch.load` is `torch.load`), vitlab functions that are not
config factories, Hydra's own callbacks, configs read from checkpoints and `+` typos are all
refused before any stage, and a checkpoint cannot opt itself in to a full unpickle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import run_entry_point
from vitlab.config import added_top_level_keys, instantiate_node, target_refusal
from vitlab.errors import ConfigError
from vitlab.pipelines.plantclef import load_head_predictor
from vitlab.safe_load import distrusted
from vitlab.tasks.classification import EmbeddingClassifier


class RunsCode:
    """Unpickling this runs `os.mkdir(path)`: a harmless stand-in for a crafted payload."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _crafted_pickle(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "payload.pt"
    torch.save({"x": RunsCode(marker)}, path)
    return path, marker


BYPASSES = [
    "vitlab.safe_load.torch.load",  # an attribute chain out of an allowed module
    "torch.nn.modules.module.torch.load",
    "vitlab.atomic.atomic_write_text",  # a vitlab function that writes any file
    "torch.nn.functional.relu",
    "pytorch_lightning.cli.LightningCLI",  # builds whatever its own config names
    "vitlab.pipelines.plantclef.load_head_predictor",
]
ALLOWED = [
    "vitlab.models.backbones.create_backbone",
    "vitlab.engines.create_engine",
    "vitlab.inference.plantclef.GridArgmax",
    "torch.nn.CrossEntropyLoss",
    "torch.optim.AdamW",
    "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "pytorch_lightning.Trainer",
    "pytorch_lightning.callbacks.EarlyStopping",
    "pytorch_lightning.plugins.TorchCheckpointIO",
    "vitlab.safe_load.torch.nn.Linear",  # a chain to a harmless class is still that class
]


@pytest.mark.parametrize("target", BYPASSES)
def test_targets_that_passed_the_prefix_check_are_refused(target):
    assert target_refusal(target) is not None


@pytest.mark.parametrize("target", ALLOWED)
def test_what_the_shipped_configs_build_is_allowed(target):
    assert target_refusal(target) is None


def test_torch_load_through_a_vitlab_module_never_runs(tmp_path):
    payload, marker = _crafted_pickle(tmp_path)
    node = {"_target_": "vitlab.safe_load.torch.load", "f": str(payload), "weights_only": False}
    with pytest.raises(ConfigError, match=r"callbacks\.x\._target_.*torch\.serialization\.load"):
        instantiate_node(node, "callbacks.x")
    assert not marker.exists()


def _head_checkpoint(tmp_path: Path, context: dict) -> Path:
    module = EmbeddingClassifier(
        head={"_target_": "vitlab.models.heads.LinearHead"},
        loss={"_target_": "torch.nn.CrossEntropyLoss"},
        in_features=4,
        species_ids=[1, 2],
        context=context,
    )
    path = tmp_path / "best.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def test_a_checkpoint_whose_features_name_torch_load_is_refused(tmp_path):
    payload, marker = _crafted_pickle(tmp_path)
    features = {"_target_": "vitlab.safe_load.torch.load", "f": str(payload)}
    backbone = {
        "_target_": "vitlab.models.backbones.create_backbone",
        "kind": "timm",
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "model_kwargs": {"img_size": 32, "depth": 1},
    }
    checkpoint = _head_checkpoint(tmp_path, {"backbone": backbone, "features": features})
    with pytest.raises(ConfigError, match=r"checkpoint features\._target_"):
        load_head_predictor(checkpoint)
    assert not marker.exists()


def test_a_checkpoint_cannot_trust_its_own_backbone_file(tmp_path):
    payload, marker = _crafted_pickle(tmp_path)
    backbone = {
        "_target_": "vitlab.models.backbones.create_backbone",
        "kind": "timm",
        "name": "vit_tiny_patch16_224",
        "checkpoint_path": str(payload),
        "trust_checkpoint": True,  # written by the crafter, not by the user running infer.py
        "model_kwargs": {"img_size": 32, "depth": 1},
    }
    features = {"_target_": "vitlab.models.features.ClsToken"}
    checkpoint = _head_checkpoint(tmp_path, {"backbone": backbone, "features": features})
    with pytest.raises(ConfigError, match=r"posix.mkdir.*backbone.trust_checkpoint=true"):
        load_head_predictor(checkpoint)
    assert not marker.exists()


def test_distrusted_sets_every_trust_key_to_the_runs_choice():
    tree = {"a": {"trust_checkpoint": True, "b": [{"trust_x": True, "c": 1}]}, "trust": "yes"}
    assert distrusted(tree) == {
        "a": {"trust_checkpoint": False, "b": [{"trust_x": False, "c": 1}]},
        "trust": False,
    }
    assert distrusted(tree, True)["a"]["trust_checkpoint"] is True


def test_added_top_level_keys_are_the_dotted_plus_overrides():
    overrides = ["+optimzer.lr=0.1", "++x.y=2", "+experiment=a", "loss=seesaw", "+optimzer.b=1"]
    assert added_top_level_keys(overrides) == {"optimzer": "+optimzer.lr=0.1", "x": "++x.y=2"}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            [
                "+hydra.callbacks.x._target_=vitlab.atomic.atomic_write_text",
                "+hydra.callbacks.x.path={victim}",
                "+hydra.callbacks.x.text=pwned",
            ],
            "hydra.callbacks.x._target_",
        ),
        (
            ["+callbacks.x._target_=vitlab.safe_load.torch.load", "+callbacks.x.f={victim}"],
            "callbacks.x._target_",
        ),
        (["+logger.x._target_=vitlab.atomic.atomic_write_text"], "logger.x._target_"),
        (
            ["+trainer.plugins._target_=torch.nn.modules.module.torch.load"],
            "trainer.plugins._target_",
        ),
        (["+optimzer.lr=0.1"], "did you mean optimizer"),
    ],
    ids=["hydra.callbacks", "callbacks", "logger", "trainer.plugins", "plus-typo"],
)
def test_refused_before_any_stage_with_exit_2(tmp_path, overrides, expected):
    victim = tmp_path / "victim"
    out = run_entry_point("train.py", [o.format(victim=victim) for o in overrides], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert expected in out.stdout + out.stderr
    assert not victim.exists()
    assert not (tmp_path / ".cache").exists(), "a stage ran before the refusal"
