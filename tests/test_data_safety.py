"""The project deletes or overwrites only what it created: synthetic generators and the
`dataset.root` of a synthetic dataset group never touch a user's folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_entry_point
from vitlab.data.segmentation import ensure_synthetic_voc
from vitlab.data.synthetic.__main__ import main as synthetic_main
from vitlab.data.synthetic.coco_captions import CocoCaptionsSyntheticSpec, generate_coco_captions
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.data.synthetic.markers import (
    COMPLETE_MARKER,
    OWNER_MARKER,
    ForeignFolderError,
    is_complete,
)
from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef
from vitlab.errors import ConfigError
from vitlab.pipelines.base import ensure_generated

REPO = Path(__file__).resolve().parents[1]
SMALL_PLANT = PlantClefSyntheticSpec(
    seed=1, n_species=6, n_rare_species=1, max_images_per_species=4, min_images_per_species=3,
    n_quadrats=1, quadrat_size=(120, 150),
)  # fmt: skip
SMALL_COCO = CocoCaptionsSyntheticSpec(seed=1, n_train=2, n_val=1, image_size=40)
SMALL_FUNGI = FungiSyntheticSpec(
    seed=1, n_species=4, n_unknown=1, n_poisonous=1, max_observations=3, min_observations=2,
    image_size=(40, 60),
)  # fmt: skip
GENERATORS = {
    "plantclef": (generate_plantclef, PlantClefSyntheticSpec, SMALL_PLANT),
    "fungiclef": (generate_fungiclef, FungiSyntheticSpec, SMALL_FUNGI),
    "coco_captions": (generate_coco_captions, CocoCaptionsSyntheticSpec, SMALL_COCO),
}


def _user_folder(path: Path) -> dict[str, bytes]:
    """A folder holding a user's files (what `dataset.root=/my/data` might point at)."""
    (path / "images").mkdir(parents=True)
    files = {"notes.txt": b"my field notes", "images/a.jpg": b"\xff\xd8 not really a jpeg"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def _dataset_config(root: Path, spec) -> OmegaConf:
    """A synthetic dataset group's config as Hydra composes it (tuples become lists)."""
    return OmegaConf.create({"root": str(root), "synthetic": dataclasses.asdict(spec)})


def _assert_untouched(path: Path, files: dict[str, bytes]) -> None:
    found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert found == sorted(files), "the generator wrote into or deleted from a user folder"
    for name, data in files.items():
        assert (path / name).read_bytes() == data


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generator_refuses_a_user_folder(name, tmp_path):
    generate, _, spec = GENERATORS[name]
    files = _user_folder(tmp_path / "mine")
    with pytest.raises(ForeignFolderError, match="dataset=plantclef"):
        generate(tmp_path / "mine", spec)
    _assert_untouched(tmp_path / "mine", files)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generator_writes_new_or_empty_folder_and_replaces_its_own(name, tmp_path):
    generate, spec_type, spec = GENERATORS[name]
    (tmp_path / "empty").mkdir()
    out = generate(tmp_path / "empty", spec)
    assert (out / OWNER_MARKER).is_file() and is_complete(out, spec)
    (out / "stray.txt").write_text("from an earlier generation")
    generate(out, spec)  # ours: replaced
    assert not (out / "stray.txt").exists() and is_complete(out, spec)
    # a killed generator leaves the owner marker without the completion marker: ours, redone
    (out / COMPLETE_MARKER).unlink()
    ensure_generated(_dataset_config(out, spec), generate, spec_type, name)
    assert is_complete(out, spec)


def test_synthetic_dataset_group_refuses_user_root(tmp_path):
    """`ensure_generated` (train.py / infer.py) names the key and the real dataset groups."""
    files = _user_folder(tmp_path / "mine")
    config = OmegaConf.create({"root": str(tmp_path / "mine"), "synthetic": {"seed": 0}})
    with pytest.raises(ConfigError, match=r"dataset.root=.*dataset=plantclef\|fungiclef"):
        ensure_generated(config, generate_plantclef, PlantClefSyntheticSpec, "PlantCLEF")
    _assert_untouched(tmp_path / "mine", files)


def test_changed_spec_regenerates_own_folder_only(tmp_path):
    out = generate_plantclef(tmp_path / "syn", SMALL_PLANT)
    other = PlantClefSyntheticSpec(**{**vars(SMALL_PLANT), "n_quadrats": 2})
    assert is_complete(out, SMALL_PLANT) and not is_complete(out, other)
    config = _dataset_config(out, other)
    ensure_generated(config, generate_plantclef, PlantClefSyntheticSpec, "PlantCLEF")
    assert is_complete(out, other)
    assert len(list((out / "PlantCLEF2024test").glob("*.jpg"))) == 2


def test_synthetic_voc_refuses_user_voc_root(tmp_path):
    files = _user_folder(tmp_path / "data")
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    cfg = {"name": "synthetic_voc", "root": str(root), "synthetic": vars(SMALL_COCO)}
    with pytest.raises(ForeignFolderError):
        ensure_synthetic_voc(cfg)
    _assert_untouched(tmp_path / "data", files)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generator_cli_refuses_user_folder(name, tmp_path, capsys):
    files = _user_folder(tmp_path / "mine")
    assert synthetic_main([name, str(tmp_path / "mine")]) == 2
    assert "left untouched" in capsys.readouterr().err
    _assert_untouched(tmp_path / "mine", files)


@pytest.mark.parametrize("entry", ["train.py", "infer.py"])
def test_entry_point_with_user_root_exits_2_and_keeps_data(entry, tmp_path):
    """The reported data loss: `python train.py dataset.root=/my/data` with the default
    (synthetic) dataset group used to rmtree /my/data and regenerate synthetic data there."""
    files = _user_folder(tmp_path / "mydata")
    out = run_entry_point(entry, [f"dataset.root={tmp_path / 'mydata'}"], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "dataset=plantclef" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    _assert_untouched(tmp_path / "mydata", files)


def test_folders_from_before_the_owner_marker_are_still_ours(tmp_path):
    out = generate_plantclef(tmp_path / "old", SMALL_PLANT)
    (out / OWNER_MARKER).unlink()
    (out / COMPLETE_MARKER).write_text("seed=1\n")  # what earlier versions wrote
    generate_plantclef(out, SMALL_PLANT)
    assert (out / OWNER_MARKER).is_file()
    files = _user_folder(tmp_path / "mine")
    (tmp_path / "mine" / COMPLETE_MARKER).write_text("done\n")  # a user's own marker file
    with pytest.raises(ForeignFolderError):
        generate_plantclef(tmp_path / "mine", SMALL_PLANT)
    assert (tmp_path / "mine" / "notes.txt").read_bytes() == files["notes.txt"]
