"""Every option of every config group a classification pipeline composes either runs (one
epoch of one batch, then predict and score) or is refused before the first stage with a
ConfigError naming the key. Options are listed from configs/<group>/*.yaml, so a new option is
tested automatically: it must run, or be added to REFUSED with the key its error names.

All cases share one stage cache (prepare/embed run once per backbone/features), and cases that
compose the same config (each group's default option) run once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from tests.conftest import REPO, compose_config
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.errors import USER_ERRORS, ConfigError
from vitlab.pipelines import load

CONFIGS = REPO / "configs"
GROUPS = {
    "plantclef": (
        "loss",
        "head",
        "inference",
        "features",
        "backbone",
        "trainer",
        "engine",
        "logger",
        "optimizer",
        "scheduler",
    ),
    "fungiclef": (
        "loss",
        "head",
        "features",
        "backbone",
        "trainer",
        "engine",
        "logger",
        "optimizer",
        "scheduler",
    ),
}
ONE_BATCH = [
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "fit.early_stopping_patience=0",
    "prepare.image_size=64",
    "dataset.synthetic=null",
]
TINY_BACKBONE = [  # only for backbone=tiny_vit (the default)
    "backbone.model_kwargs.img_size=64",
    "backbone.input_size=64",
    "backbone.model_kwargs.depth=2",
]
BASE = {
    "plantclef": ["experiment=quickstart_plantclef", "dataset.min_images_per_species=6"],
    "fungiclef": [
        "experiment=quickstart_fungiclef",
        "head.model.hidden=64",
        "ensemble.open_set_threshold=null",
        "report.embedding_map=none",
    ],
}
GPU = "trainer.accelerator"
VISIBLE_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TRAINER_DEVICES = {"gpu": 1, "gpu_amp": 1, "gpu_ddp": 4}  # configs/trainer/<option>.yaml


def gpu_refusal(option: str) -> str | None:
    """What a GPU trainer option is refused for on this machine (None: it runs): no GPU at
    all, or fewer than the option's `devices`."""
    if VISIBLE_GPUS == 0:
        return GPU
    return "trainer.devices" if TRAINER_DEVICES[option] > VISIBLE_GPUS else None


HUB = "backbone.model_id"
MULTILABEL_LOSSES = ("bce", "asl", "focal_bce")
# (pipeline, group, option) -> the key its ConfigError names. Everything else must run.
REFUSED = {
    ("plantclef", "loss", "seesaw_poison"): "loss",  # PlantCLEF has no poison list
    ("plantclef", "head", "fungi_mlp"): "head.model",
    ("plantclef", "head", "fungi_transformer"): "head.model",
    ("fungiclef", "loss", "nll"): "loss",  # FungiCLEF heads output logits
    # multi-label losses need a head without log-softmax (experiment=plantclef_multilabel)
    **{("plantclef", "loss", name): "head.model.log_softmax" for name in MULTILABEL_LOSSES},
    **{("fungiclef", "loss", name): "loss" for name in MULTILABEL_LOSSES},  # one species each
    # thresholds chosen on validation data need a multi-label loss
    ("plantclef", "inference", "pooled_threshold"): "inference.threshold",
    ("fungiclef", "head", "linear"): "head",
    ("fungiclef", "head", "mlp"): "head",  # takes no observation metadata
    **{
        (pipeline, "trainer", option): gpu_refusal(option)
        for pipeline in GROUPS
        for option in TRAINER_DEVICES
        if gpu_refusal(option)
    },
    **{
        (pipeline, "backbone", option): key
        for pipeline in GROUPS
        for option, key in {
            "dinov2_small": HUB,  # offline: not in the (empty) hub cache
            "dinov2_base": HUB,
            "dinov2_large": HUB,
            "timm": "backbone.name",  # mandatory (???)
            "timm_dinov2_large_reg4": "backbone.name",  # pretrained weights from the hub
            "vit_base_patch14_dinov2": "backbone.name",
            "plantnet_dinov2_finetuned": "backbone.checkpoint_path",  # mandatory (???)
        }.items()
    },
}
SKIPPED = {
    ("engine", "spark"): "a Spark session takes ~15 s to start: tests/test_engines.py runs "
    "prepare and embed on Spark; here the option is only built",
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


CASES = [
    pytest.param(pipeline, group, option, id=f"{pipeline}-{group}={option}")
    for pipeline, groups in GROUPS.items()
    for group in groups
    for option in options(group)
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_plantclef):
    root = tmp_path_factory.mktemp("every_option")
    fungi = generate_fungiclef(
        root / "fungi",
        FungiSyntheticSpec(
            seed=2, n_species=6, n_unknown=1, max_observations=8, min_observations=5
        ),
    )
    return {
        "cache": root / "cache",
        "data": {"plantclef": tiny_plantclef, "fungiclef": fungi},
        "results": {},  # composed config -> outcome, so identical cases run once
    }


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No download can start: the hub library is offline with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("pipeline, group, option", CASES)
def test_option_runs_or_is_refused_before_any_stage(
    pipeline, group, option, shared, tmp_path, offline_hub
):
    overrides = [*BASE[pipeline], *ONE_BATCH, f"dataset.root={shared['data'][pipeline]}"]
    overrides.append(f"{group}={option}")
    if group != "backbone" or option == "tiny_vit":
        overrides += TINY_BACKBONE
    cfg = compose_config("train", overrides, tmp_path)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(shared["cache"])
    spec = load(pipeline)
    if (group, option) in SKIPPED:
        spec.validate_train(cfg)
        from vitlab.config import instantiate_node

        instantiate_node(cfg.engine, "engine")
        pytest.skip(SKIPPED[group, option])

    key = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k not in ("paths", "hydra")})
    refused = REFUSED.get((pipeline, group, option))
    if refused is None and key in shared["results"]:
        assert shared["results"][key] == "ran"
        return
    before = listing(shared["cache"])
    start = time.perf_counter()
    try:
        summary = spec.train(cfg)
    except USER_ERRORS as err:  # ConfigError, or omegaconf's MissingMandatoryValue for ???
        assert refused, f"{group}={option} must run in pipeline={pipeline}, got: {err}"
        assert refused in str(err), f"the error must name {refused}: {err}"
        assert time.perf_counter() - start < 10, "refused, but only after slow work"
        assert listing(shared["cache"]) == before, "refused after a stage wrote to the cache"
        assert not (tmp_path / "run" / "summary.json").exists(), "refused after the run began"
        return
    assert not refused, f"{group}={option} in pipeline={pipeline} must fail naming {refused}"
    assert summary["metrics"], summary
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["status"] == "completed"
    shared["results"][key] = "ran"


def test_deprecated_class_counts_still_read(shared, tmp_path):
    """`loss.class_counts=accumulate|train` (before counts_from) keeps working, with a warning."""
    cfg = compose_config(
        "train", [*BASE["fungiclef"], "loss=seesaw", "loss.class_counts=train"], tmp_path
    )
    with pytest.warns(FutureWarning, match="loss.counts_from=train"):
        load("fungiclef").validate_train(cfg)


def test_groupvit_model_and_trainer_options_validate(tmp_path, offline_hub):
    """GroupViT composes its own groups: every groupvit/model option and every trainer passes
    validate or is refused naming its key (the run itself is tests/test_groupvit_options.py's)."""
    spec = load("groupvit")
    for option in options("groupvit/model"):
        cfg = compose_config(
            "train", ["experiment=quickstart_groupvit", f"groupvit/model={option}"], tmp_path
        )
        if OmegaConf.is_missing(cfg.groupvit.model, "source"):  # nvlabs: the file must be given
            with pytest.raises(ConfigError, match="groupvit.model.source is not set"):
                spec.validate_train(cfg)
        else:
            spec.validate_train(cfg)  # weights are loaded when the run starts, not in validate
    for option in options("trainer"):
        cfg = compose_config(
            "train", ["experiment=quickstart_groupvit", f"trainer={option}"], tmp_path
        )
        if option.startswith("gpu") and gpu_refusal(option):
            with pytest.raises(ConfigError, match=gpu_refusal(option)):
                spec.validate_train(cfg)
        else:
            spec.validate_train(cfg)
