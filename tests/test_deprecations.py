"""The one table of renamed / deprecated keys (`vitlab.deprecations`): every entry is honoured
where users meet it, and the loss-inputs table finds a loss class by any import path of it."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import compose_config
from vitlab.data.segmentation import DATASETS, spec_from_config
from vitlab.deprecations import DEPRECATIONS, REMOVED_IN, VERSION, renamed_keys
from vitlab.errors import ConfigError
from vitlab.inference.segmentation import SegmentationSettings
from vitlab.losses import LOSS_INPUTS, LabelStats, build_loss
from vitlab.losses.factory import loss_inputs
from vitlab.pipelines import load
from vitlab.pipelines.base import RENAMED_KEYS, prepare_run
from vitlab.pipelines.segmentation import segmentation_settings
from vitlab.sweep_driver import check_params

ROOT = Path(__file__).resolve().parents[1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_versions_follow_pyproject():
    """The table's version is the package's, and every entry goes in a later one (time to remove
    it when this fails after a release)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert VERSION == project["version"]
    assert all(_version(d.removed_in) > _version(VERSION) for d in DEPRECATIONS.values())
    assert RENAMED_KEYS == renamed_keys()  # base's name for the refused keys reads the table


def _new_key(old: str) -> str:
    """The new key's name as messages spell it (before `=`, `,`, ` `)."""
    return re.split(r"[=, ]", DEPRECATIONS[old].new)[0]


def _class_counts(tmp_path):
    seesaw = {"_target_": "vitlab.losses.SeesawLoss", "class_counts": "accumulate"}
    assert build_loss(seesaw, LabelStats(4, [1, 2, 3, 4])).accumulate  # read as batches


def _bg_threshold(tmp_path):
    assert spec_from_config({"name": "pascal_voc", "bg_threshold": 0.5}).bg_threshold == 0.5


def _task_group(tmp_path):
    cfg = compose_config("infer", ["task=segmentation", "dataset=synthetic_voc"], tmp_path)
    assert cfg.pipeline == "segmentation"
    prepare_run(cfg)


STILL_READ = {"loss.class_counts": _class_counts, "dataset.bg_threshold": _bg_threshold}
GROUPS = {"task": _task_group}


@pytest.mark.parametrize("old", sorted(DEPRECATIONS))
def test_every_entry_is_honoured(old, tmp_path):
    """A refused key stops the run (and a sweep naming it) with a ConfigError naming the new
    key; a still-read key or an older group name works with a FutureWarning naming the new one."""
    entry, new = DEPRECATIONS[old], re.escape(_new_key(old))
    if not entry.still_read:
        cfg = compose_config("train", [f"+{old}=1"], tmp_path)
        refused = rf"{re.escape(old)} was renamed: use {new}"
        with pytest.raises(ConfigError, match=refused):
            prepare_run(cfg)
        params = {old: {"type": "float", "low": 0.0, "high": 1.0}}
        with pytest.raises(ConfigError, match=rf"sweep\.params\.{re.escape(old)}: {refused}"):
            check_params(params, lambda key: "sweep", lambda overrides: None)
        return
    exercise = (GROUPS if entry.group else STILL_READ).get(old)
    assert exercise is not None, f"add a case for the new entry {old}"
    warned = rf"{re.escape(old)}=\S+ is deprecated \(removed in {REMOVED_IN}\): use {new}="
    with pytest.warns(FutureWarning, match=warned):
        exercise(tmp_path)


def test_predict_center_crop_refused_by_plantclef_validate(tmp_path):
    """PlantCLEF's own check (a `predict.center_crop` key, even null) reads the same entry."""
    cfg = compose_config("train", ["+predict.center_crop=null"], tmp_path)
    with pytest.raises(
        ConfigError, match=r"predict\.center_crop was renamed: use predict\.tile_fit"
    ):
        load("plantclef").validate_train(cfg)


def test_still_read_keys_keep_a_null_placeholder():
    """`key=value` (without `+`) composes for a still-read key: its configs hold it as null."""
    for name in ("seesaw", "seesaw_poison", "weighted_ce"):
        assert (
            yaml.safe_load((ROOT / f"configs/loss/{name}.yaml").read_text())["class_counts"] is None
        )
    for name, spec in DATASETS.items():
        cfg = yaml.safe_load((ROOT / f"configs/dataset/{name}.yaml").read_text())
        assert cfg.get("bg_threshold", "absent") == (None if spec.has_background else "absent")


@pytest.mark.parametrize(
    "target",
    [
        "vitlab.losses.SeesawPoisonLoss",
        "vitlab.losses.classification.SeesawPoisonLoss",
        "vitlab.losses.factory.SeesawPoisonLoss",
    ],
)
def test_loss_inputs_follow_the_class_not_the_path(target):
    """Any import path of a listed class finds its entry, and builds the same loss."""
    from vitlab.losses import SeesawPoisonLoss

    assert loss_inputs({"_target_": target}) is LOSS_INPUTS[SeesawPoisonLoss]
    stats = LabelStats(4, [5, 1, 7, 2], poisonous_classes=[1, 3])
    built = build_loss({"_target_": target, "counts_from": "train"}, stats)
    assert isinstance(built, SeesawPoisonLoss) and built.poisonous.tolist() == [0, 1, 0, 1]
    assert built.class_counts.tolist() == [5, 1, 7, 2]


def test_loss_inputs_of_other_targets():
    assert all(isinstance(key, type) for key in LOSS_INPUTS)
    assert loss_inputs({"_target_": "torch.nn.modules.loss.NLLLoss"}).expects == "log_probs"
    for target in ("vitlab.losses.NoSuchLoss", "os.system", None):  # names nothing, or refused
        assert loss_inputs({"_target_": target}) == loss_inputs({})


def test_segmentation_settings_one_constructor(tmp_path):
    """The pipeline's settings are `SegmentationSettings.for_dataset`'s: the dataset's threshold
    unless `segmentation.bg_threshold` overrides it."""
    cfg = compose_config("infer", ["pipeline=segmentation", "dataset=pascal_context"], tmp_path)
    spec = spec_from_config(cfg.dataset)
    settings = segmentation_settings(cfg.segmentation, spec)
    assert settings.bg_threshold == DATASETS["pascal_context"].bg_threshold == 0.35
    sizes = {k: getattr(settings, k) for k in ("short_side", "crop", "stride", "top_k")}
    same = SegmentationSettings.for_dataset(spec, crops_per_batch=settings.crops_per_batch, **sizes)
    assert same == settings
    cfg.segmentation.bg_threshold = 0.99
    assert segmentation_settings(cfg.segmentation, spec).bg_threshold == 0.99
