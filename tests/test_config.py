from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, compose_config
from vitlab.config import instantiate_node
from vitlab.data.segmentation import spec_from_config
from vitlab.errors import ConfigError
from vitlab.pipelines import load
from vitlab.pipelines.groupvit import validate_groupvit
from vitlab.pipelines.plantclef import train, validate
from vitlab.pipelines.segmentation import segmentation_settings

ALL_EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# segment_* recipes are for infer.py (pipeline=segmentation); the others for train.py
SEGMENT_EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e.startswith("segment_")]
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e not in SEGMENT_EXPERIMENTS]
REAL_DATA = ["dataset.root=/data/PlantCLEF2024", "backbone.checkpoint_path=/ckpt/model.pth.tar"]


def _resolve_all(cfg):
    """Every interpolation of our config resolves (Hydra's own node needs a running job)."""
    for key in cfg:
        if key != "hydra":
            node = cfg[key]
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)


def test_there_are_experiments():
    assert "quickstart_plantclef" in EXPERIMENTS and len(EXPERIMENTS) >= 5


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    overrides = [f"experiment={experiment}"]
    if OmegaConf.is_missing(cfg.dataset, "root"):
        overrides.append(REAL_DATA[0])
    backbone = cfg.get("backbone")  # GroupViT composes no backbone group
    if (
        backbone
        and "checkpoint_path" in backbone.keys()  # `in backbone` is False for ???
        and OmegaConf.is_missing(backbone, "checkpoint_path")
    ):
        overrides.append(REAL_DATA[1])
    cfg = compose_config("train", overrides, tmp_path)
    _resolve_all(cfg)
    if cfg.pipeline == "groupvit":  # trains end to end: no backbone/features/inference stages
        validate_groupvit(cfg)
        return
    load(cfg.pipeline).validate_train(cfg)  # each pipeline's own checks (FungiCLEF's heads differ)
    instantiate_node(cfg.features, "features")
    instantiate_node(cfg.inference, "inference")


@pytest.mark.parametrize("experiment", SEGMENT_EXPERIMENTS)
def test_segmentation_experiments_compose_for_infer(experiment, tmp_path):
    overrides = [f"experiment={experiment}", "ckpt_path=x.pt", "dataset.root=/voc"]
    cfg = compose_config("infer", overrides, tmp_path)
    _resolve_all(cfg)
    assert cfg.pipeline == "segmentation"
    settings = segmentation_settings(cfg.segmentation, spec_from_config(cfg.dataset))
    assert settings.crop >= settings.stride > 0


def test_infer_config_composes(tmp_path):
    cfg = compose_config("infer", ["ckpt_path=x.ckpt", "inference=grid_topk"], tmp_path)
    _resolve_all(cfg)
    assert cfg.inference.top_l == 5


@pytest.mark.parametrize(
    "override, key",
    [
        ("inference.grid_size=0", "inference.grid_size"),
        ("features=dct", None),  # valid; paired with the next case
        ("optimizer._target_=torch.optim.RMSpropp", "optimizer"),
        ("+optimizer.gamma=2", "optimizer"),
        ("scheduler=plateau", None),  # valid with PlantCLEF (follows fit.monitor)
        ("scheduler=cosine_warm_restarts scheduler.T_0=0", "scheduler"),
        ("+head.lr=1e-3", "head.lr"),  # renamed: names optimizer.lr
        ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
        ("fit.mode=biggest", "fit.mode"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("predictor=oracle", "predictor"),
        ("prepare.image_size=2", "prepare.image_size"),
        ("head.model.log_softmax=false", "head.model.log_softmax"),
    ],
)
def test_invalid_values_fail_before_any_work_naming_the_key(override, key, tmp_path):
    cfg = compose_config("train", [*override.split(), "logger=wandb"], tmp_path)
    if key is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "data").exists()


def test_dct_bad_token_set_names_key(tmp_path):
    cfg = compose_config("train", ["features=dct", "features.tokens=cls"], tmp_path)
    with pytest.raises(ConfigError, match=r"features\.tokens"):
        train(cfg)


def test_unknown_group_option_lists_choices(tmp_path):
    with pytest.raises(MissingConfigException, match="backbone"):
        compose_config("train", ["backbone=vit_gigantic"], tmp_path)


def test_real_dataset_needs_root(tmp_path):
    cfg = compose_config("train", ["dataset=plantclef"], tmp_path)
    with pytest.raises(ConfigError, match=r"dataset\.root is not set .*dataset\.root=/path"):
        train(cfg)


def test_mandatory_backbone_keys_are_named(tmp_path):
    cfg = compose_config("train", ["backbone=timm"], tmp_path)
    with pytest.raises(ConfigError, match=r"backbone\.name is not set .*backbone\.name=vit"):
        train(cfg)
    cfg = compose_config("train", ["backbone=plantnet_dinov2_finetuned"], tmp_path)
    with pytest.raises(ConfigError, match=r"backbone\.checkpoint_path is not set"):
        train(cfg)


@pytest.mark.parametrize("trainer", ["gpu", "gpu_ddp", "gpu_amp"])
def test_gpu_trainers_and_slurm_launcher_compose(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}", "hydra/launcher=slurm_gpu"], tmp_path)
    assert cfg.trainer.accelerator == "gpu"
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.gpus_per_node == cfg.trainer.devices == launcher.tasks_per_node


def test_sweep_config_composes(tmp_path):
    cfg = compose_config("train", ["sweep=quickstart_head"], tmp_path)
    assert cfg.sweep.study_name == "quickstart_plantclef_head"
    assert cfg.sweep.storage.startswith("sqlite:///")
    assert set(cfg.sweep.params) >= {"optimizer.lr", "optimizer.weight_decay"}


@pytest.mark.parametrize(
    "overrides, pipeline, own_keys",
    [
        ([], "plantclef", {"predictor", "predict"}),
        (["pipeline=fungiclef"], "fungiclef", {"aux_targets", "sampler", "report", "ensemble"}),
        (
            ["experiment=quickstart_fungiclef"],
            "fungiclef",
            {"aux_targets", "sampler", "report", "ensemble"},
        ),
        (["experiment=quickstart_groupvit"], "groupvit", {"groupvit"}),
    ],
)
def test_pipeline_group_brings_only_its_own_keys(overrides, pipeline, own_keys, tmp_path):
    """configs/pipeline/<name>.yaml sets `pipeline` and that pipeline's keys; no other
    pipeline's keys are composed (GroupViT composes none of the embedding pipelines' groups)."""
    cfg = compose_config("train", overrides, tmp_path)
    assert cfg.pipeline == pipeline
    others = {"predictor", "predict", "aux_targets", "sampler", "report", "ensemble", "groupvit"}
    assert own_keys <= set(cfg) and not (others - own_keys) & set(cfg)
    if pipeline == "groupvit":
        embedding_groups = {"backbone", "features", "head", "loss", "inference", "engine"}
        assert not embedding_groups & set(cfg)


@pytest.mark.parametrize("override", ["pipeline=segmentation", "task=segmentation"])
def test_infer_selects_segmentation_by_pipeline_or_its_older_name_task(override, tmp_path):
    cfg = compose_config("infer", [override], tmp_path)
    assert cfg.pipeline == "segmentation" and "predictor" not in cfg
    assert cfg.segmentation.crop == 448
