"""Optimisers and schedulers as `_partial_` config nodes, one shape in every pipeline."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_config
from vitlab.config import to_container
from vitlab.errors import ConfigError
from vitlab.optim import (
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    check_optimization,
    follow_monitor,
    warmup_cosine_factor,
)
from vitlab.pipelines import load
from vitlab.tasks.classification import EmbeddingClassifier

OPTIMIZERS = sorted(p.stem for p in (REPO / "configs" / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (REPO / "configs" / "scheduler").glob("*.yaml"))
EXPERIMENTS = ("quickstart_plantclef", "quickstart_fungiclef", "groupvit_finetune_baseline")


def _param() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_builds_in_every_pipeline(experiment, optimizer, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"optimizer={optimizer}"], tmp_path)
    check_optimization(cfg)
    built = build_optimizer(cfg.optimizer, _param())
    assert built.param_groups[0]["lr"] == cfg.optimizer.lr  # the pipeline's lr, not the option's


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_builds_in_every_pipeline(experiment, scheduler, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"scheduler={scheduler}"], tmp_path)
    check_optimization(cfg)
    optimizer = build_optimizer(cfg.optimizer, _param())
    built = build_scheduler(cfg.scheduler, optimizer, {"total_steps": 20, "epochs": 2})
    if scheduler == "none":
        assert built is None
    else:
        assert built["interval"] in ("epoch", "step")
        assert isinstance(built["scheduler"], torch.optim.lr_scheduler.LRScheduler)
    if scheduler == "plateau":  # follows the run's monitored metric and its direction
        assert built["monitor"] == cfg.fit.monitor
        assert built["scheduler"].mode == cfg.fit.mode


def test_pipeline_defaults_keep_their_recipes(tmp_path):
    plant = compose_config("train", [], tmp_path)
    fungi = compose_config("train", ["experiment=quickstart_fungiclef"], tmp_path)
    group = compose_config("train", ["experiment=groupvit_finetune_baseline"], tmp_path)
    assert (plant.optimizer._target_, plant.optimizer.lr, plant.scheduler) == (
        "torch.optim.Adam",
        2e-3,
        None,
    )
    assert (fungi.optimizer._target_, fungi.optimizer.weight_decay) == ("torch.optim.AdamW", 1e-4)
    assert fungi.scheduler.T_0 == 10
    assert (group.optimizer.lr, group.optimizer.weight_decay) == (1.6e-5, 0.05)
    assert (group.scheduler._target_, group.scheduler.cycles) == ("vitlab.optim.WarmupCosine", 2)


def test_warmup_cosine_steps_like_the_reference_lambda():
    optimizer = torch.optim.SGD(_param(), lr=1.0)
    node = {
        "_target_": "vitlab.optim.WarmupCosine",
        "_partial_": True,
        "warmup_epochs": 1,
        "cycles": 2,
        "total_steps": "???",
        "epochs": "???",
        "interval": "step",
    }
    built = build_scheduler(node, optimizer, {"total_steps": 110, "epochs": 11})
    assert isinstance(built["scheduler"], WarmupCosine) and built["interval"] == "step"
    seen = []
    for _ in range(110):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        built["scheduler"].step()
    expected = [warmup_cosine_factor(s, 10, 110, cycles=2) for s in range(110)]
    assert seen == pytest.approx(expected)


def test_unknown_runtime_value_and_orphan_values_are_refused():
    optimizer = torch.optim.SGD(_param(), lr=1.0)
    node = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": "???"}
    with pytest.raises(ConfigError, match=r"scheduler\.step_size is not set"):
        build_scheduler(node, optimizer, {"total_steps": 1, "epochs": 1})
    with pytest.raises(ConfigError, match="without a _target_"):
        build_scheduler({"cycles": 1}, optimizer, {})
    with pytest.raises(ConfigError, match="interval"):
        build_scheduler(
            {
                "_target_": "torch.optim.lr_scheduler.StepLR",
                "_partial_": True,
                "step_size": 1,
                "interval": "batch",
            },
            optimizer,
            {},
        )


def test_groupvit_schedule_values_with_another_scheduler_fail_before_any_stage(tmp_path):
    cfg = compose_config("train", ["experiment=quickstart_groupvit", "scheduler=none"], tmp_path)
    with pytest.raises(ConfigError, match="scheduler"):
        load("groupvit").validate_train(cfg)


def test_plateau_follows_the_runs_actual_monitor():
    node = {"_target_": "x", "mode": "max", "monitor": "val/macro_f1", "factor": 0.5}
    assert follow_monitor(node, "train/loss", "min") == {
        **node,
        "monitor": "train/loss",
        "mode": "min",
    }
    cosine = {"_target_": "x", "T_0": 3}
    assert follow_monitor(cosine, "train/loss", "min") == cosine
    assert follow_monitor(None, "train/loss", "min") is None


def test_optimizer_from_outside_the_allowed_packages_is_refused():
    with pytest.raises(ConfigError, match="extra_target_prefixes"):
        build_optimizer({"_target_": "os.system", "_partial_": True}, _param())
    with pytest.raises(ConfigError, match="_partial_"):
        build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.1}, _param())


def test_checkpoint_written_before_the_optimizer_group_loads_but_cannot_train(tmp_path):
    """Older checkpoints store `optimizer: adam` with `lr`/`weight_decay` beside it."""
    module = EmbeddingClassifier(
        head={"_target_": "vitlab.models.heads.LinearHead", "log_softmax": True},
        loss={"_target_": "torch.nn.NLLLoss"},
        in_features=4,
        species_ids=[1, 2],
        optimizer="adam",
        lr=2e-3,
        weight_decay=0.0,
    )
    assert module(torch.randn(2, 4)).shape == (2, 2)
    with pytest.raises(ConfigError, match="older vitlab"):
        module.configure_optimizers()


def test_config_keeps_runtime_placeholders_until_the_run_fills_them(tmp_path):
    cfg = compose_config("train", ["experiment=quickstart_groupvit"], tmp_path)
    node = to_container(cfg.scheduler)
    assert node["total_steps"] == "???" and node["epochs"] == "???"
    assert OmegaConf.is_missing(cfg.scheduler, "total_steps")
