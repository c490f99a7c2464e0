"""PlantCLEF inputs that are wrong fail before any work, with a message naming the key, file
and line (issue 12: duplicates, the species filter, hardware, folders, encodings, the ground
truth); quadrats too small for the grid; how tiles are fitted to the backbone's input."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import compose_config
from tests.test_pipeline import FAST as PIPELINE_FAST
from vitlab.data.plantclef import read_training_metadata
from vitlab.errors import ConfigError, DatasetFormatError
from vitlab.pipelines.plantclef import train

REPO = Path(__file__).resolve().parents[1]
METADATA = "PlantCLEF2024_single_plant_training_metadata.csv"
TRUTH = "test_ground_truth.csv"
# the end-to-end tests' fast settings, one epoch
FAST = [
    *(o for o in PIPELINE_FAST if not o.startswith(("trainer.max_epochs", "head."))),
    "trainer.max_epochs=1",
]


@pytest.fixture
def data(tiny_plantclef, tmp_path) -> Path:
    """A private copy of the tiny synthetic dataset (images linked, CSVs copied)."""
    out = tmp_path / "data"
    out.mkdir()
    for item in tiny_plantclef.iterdir():
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    return out


def _train(tmp_path: Path, data: Path, *extra: str, fast=FAST):
    return train(compose_config("train", [*fast, f"dataset.root={data}", *extra], tmp_path))


def _fails_before_work(tmp_path, data, error, match, *extra, fast=FAST):
    with pytest.raises(error, match=match) as info:
        _train(tmp_path, data, *extra, fast=fast)
    assert not (tmp_path / "cache").exists(), "prepare started"
    assert not (tmp_path / "run").exists(), "the run started"
    return str(info.value)


def _metadata(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / METADATA, sep=";", dtype={"image_name": str})


def _write_metadata(data: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(data / METADATA, sep=";", index=False)


# -- item 3: duplicates ------------------------------------------------------------------------


def test_two_images_of_one_plot_fail_before_work(data, tmp_path):
    quadrat = sorted((data / "PlantCLEF2024test").glob("*.jpg"))[0]
    Image.open(quadrat).save(quadrat.with_suffix(".png"))
    message = _fails_before_work(tmp_path, data, DatasetFormatError, "more than one image")
    assert quadrat.stem in message and f"{quadrat.stem}.png" in message


@pytest.mark.parametrize("column", ["learn_tag", "species_id"])
def test_image_listed_twice_with_other_label_fails_naming_lines(data, tmp_path, column):
    frame = _metadata(data)
    row = frame[frame["learn_tag"] == "train"].iloc[[0]].copy()
    other = frame.loc[frame["species_id"] != row["species_id"].iloc[0], "species_id"].iloc[0]
    row[column] = "test" if column == "learn_tag" else other
    _write_metadata(data, pd.concat([frame, row], ignore_index=True))
    line = len(frame) + 2  # the appended row (line 1 is the header)
    message = _fails_before_work(tmp_path, data, DatasetFormatError, f"different {column}s")
    assert row["image_name"].iloc[0] in message and f"line {line}" in message
    assert METADATA in message


def test_exact_duplicate_rows_are_dropped_with_a_counted_warning(data, caplog):
    frame = _metadata(data)
    _write_metadata(data, pd.concat([frame, frame.iloc[:3]], ignore_index=True))
    read = read_training_metadata(data / METADATA)
    assert len(read) == len(frame)
    assert read.attrs["duplicate_rows"] == 3
    assert "3 duplicate row(s)" in caplog.text


# -- item 5: checks before work ----------------------------------------------------------------


def test_species_filter_is_checked_on_the_metadata_before_work(data, tmp_path):
    frame = _metadata(data)
    largest = int(frame.loc[frame["learn_tag"] == "train", "species_id"].value_counts().max())
    message = _fails_before_work(
        tmp_path,
        data,
        ConfigError,
        "dataset.min_images_per_species=1000 leaves no species",
        "dataset.min_images_per_species=1000",
    )
    assert f"the largest has {largest}" in message and f"0 of {frame.species_id.nunique()}" in (
        message
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_trainer_without_gpu_fails_before_work(data, tmp_path):
    _fails_before_work(tmp_path, data, ConfigError, "trainer.accelerator=gpu", "trainer=gpu")


def test_require_accelerator_counts_devices(monkeypatch):
    from vitlab import devices

    monkeypatch.setattr(devices, "_visible_gpus", lambda: (2, ""))
    devices.require_accelerator({"accelerator": "gpu", "devices": 2})
    devices.require_accelerator({"accelerator": "gpu", "devices": "auto"})
    devices.require_accelerator({"accelerator": "cpu", "devices": 8})
    with pytest.raises(ConfigError, match="trainer.devices=4 asks for 4 GPU"):
        devices.require_accelerator({"accelerator": "gpu", "devices": 4})
    with pytest.raises(ConfigError, match="trainer.devices"):
        devices.require_accelerator({"accelerator": "cuda", "devices": [0, 3]})
    monkeypatch.setattr(devices, "_visible_gpus", lambda: (0, "a CPU-only build"))
    with pytest.raises(ConfigError, match="no GPU: a CPU-only build"):
        devices.require_accelerator({"accelerator": "gpu", "devices": 1})


def test_backbone_classifier_without_class_mapping_fails_before_work(data, tmp_path):
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64, depth=2
    )
    ckpt = tmp_path / "weights" / "model_best.pth.tar"
    ckpt.parent.mkdir()
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, ckpt)
    message = _fails_before_work(
        tmp_path,
        data,
        ConfigError,
        "class_mapping",
        "predictor=backbone_classifier",
        f"+backbone.checkpoint_path={ckpt}",  # the tiny ViT's shape, a classifier, no mapping
    )
    assert "backbone.class_mapping" in message and str(ckpt) in message


@pytest.mark.parametrize(
    "override, match",
    [
        ("inference.grid_size=1.5", "inference.grid_size must be a whole number >= 1, got 1.5"),
        ("seed=abc", "seed must be a whole number"),
        ("+predict.center_crop=false", "predict.tile_fit"),
        ("predict.tile_fit=stretch", "predict.tile_fit='stretch' is not one of"),
        ("predict.test=sometimes", "predict.test"),
    ],
)
def test_bad_values_fail_before_work(data, tmp_path, override, match):
    _fails_before_work(tmp_path, data, ConfigError, match, override)


def test_every_wrong_folder_is_named_at_once(data, tmp_path):
    message = _fails_before_work(
        tmp_path,
        data,
        DatasetFormatError,
        "3 problems",
        f"dataset.train_images_dir={data / 'nope_train'}",
        f"dataset.test_images_dir={data / 'nope_test'}",
        f"dataset.metadata_csv={data / 'nope.csv'}",
    )
    for key in ("dataset.train_images_dir", "dataset.test_images_dir", "dataset.metadata_csv"):
        assert key in message


def test_training_folder_that_holds_other_images_fails_before_work(data, tmp_path):
    message = _fails_before_work(
        tmp_path,
        data,
        DatasetFormatError,
        "dataset.train_images_dir",
        f"dataset.train_images_dir={data / 'PlantCLEF2024test'}",
    )
    assert "none of the 4 images" in message


def test_non_utf8_metadata_fails_naming_file_and_line(data, tmp_path):
    frame = _metadata(data)
    frame.loc[4, "author"] = "Jos\xe9 Pe\xf1a"  # written below as Latin-1
    frame.to_csv(data / METADATA, sep=";", index=False, encoding="latin-1")
    message = _fails_before_work(tmp_path, data, DatasetFormatError, "not UTF-8")
    assert f"{data / METADATA}:6:" in message  # row 4 of the frame is line 6 of the file


def test_non_utf8_ground_truth_fails_naming_file_and_line(data, tmp_path):
    truth = data / TRUTH
    lines = truth.read_bytes().split(b"\n")
    lines[2] += b" \xff"
    truth.write_bytes(b"\n".join(lines))
    message = _fails_before_work(tmp_path, data, DatasetFormatError, "not UTF-8")
    assert f"{truth}:3:" in message


@pytest.mark.parametrize(
    "body, match",
    [
        ("plot_id;species_ids\nSYNTH-QUADRAT-0000;1, 2\n", ":2: species_ids must look like"),
        ("plot_id;species_ids\n", "lists no plot"),
        ("", "is empty"),
    ],
)
def test_bad_ground_truth_fails_before_work(data, tmp_path, body, match):
    (data / TRUTH).write_text(body)
    message = _fails_before_work(tmp_path, data, DatasetFormatError, match)
    assert "dataset.test_ground_truth" in message and TRUTH in message


def test_metrics_cli_refuses_an_empty_ground_truth(tmp_path):
    (tmp_path / "truth.csv").write_text("plot_id;species_ids\n")
    (tmp_path / "sub.csv").write_text("plot_id;species_ids\n")
    cmd = [sys.executable, "-m", "vitlab.metrics", "plantclef"]
    cmd += ["--truth", str(tmp_path / "truth.csv"), "--submission", str(tmp_path / "sub.csv")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and "truth.csv lists no plot" in out.stderr, out.stdout


def test_ground_truth_of_another_test_folder_fails_before_work(data, tmp_path):
    truth = (data / TRUTH).read_text().replace("SYNTH-QUADRAT-0001", "OTHER-0001")
    (data / TRUTH).write_text(truth)
    message = _fails_before_work(tmp_path, data, DatasetFormatError, "does not list 1 of")
    assert "SYNTH-QUADRAT-0001" in message


def test_ground_truth_sharing_no_species_with_the_training_data_fails(data, tmp_path):
    lines = (data / TRUTH).read_text().splitlines()
    body = [f"{line.split(';')[0]};[1, 2]" for line in lines[1:]]
    (data / TRUTH).write_text("\n".join([lines[0], *body]) + "\n")
    _fails_before_work(tmp_path, data, ConfigError, "none of its 2 species")


def test_cli_reports_all_wrong_folders_without_traceback(data, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *FAST,
            f"dataset.root={data}",
            f"dataset.train_images_dir={data / 'nope_train'}",
            f"dataset.test_images_dir={data / 'nope_test'}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "VITLAB_ROOT": str(tmp_path), "WANDB_MODE": "disabled"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    assert "dataset.train_images_dir" in text and "dataset.test_images_dir" in text


# -- quadrats too small for the grid; tile fitting ----------------------------------------------


class _Backbone:
    def __init__(self, size: int):
        from vitlab.models.backbones import InputSpec

        self.input_spec = InputSpec(size)


class _MeanColourPredictor:
    """Species 0 when the tile's left edge is red, else species 1; records the tiles seen."""

    def __init__(self, size: int = 16):
        self.backbone = _Backbone(size)
        self.species_ids = [100, 200]
        self.seen: list[torch.Tensor] = []

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen.append(pixels)
        red = (pixels[:, 0, :, :2].mean((1, 2)) > 1.0).float()
        return torch.stack([red, 1 - red], 1)


def test_quadrat_too_small_for_the_grid_gets_an_empty_prediction_and_is_listed(tmp_path):
    from vitlab.inference.plantclef import GridArgmax
    from vitlab.pipelines.plantclef.predict import predict_quadrats

    Image.new("RGB", (2, 2), (10, 200, 10)).save(tmp_path / "tiny.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "fine.png")
    paths = [tmp_path / "fine.png", tmp_path / "tiny.png"]
    result = predict_quadrats(paths, GridArgmax(3), _MeanColourPredictor())
    assert result.predictions == {"fine": [200], "tiny": []}
    report = result.report()
    assert report["skipped_images"] == 1
    assert "tiny.png" in report["skipped_examples"][0]
    assert "too small for a 3x3 grid" in report["skipped_examples"][0]


@pytest.mark.parametrize("tile_fit, sees_edge", [("center_crop", False), ("resize", True)])
def test_tile_fit_decides_what_the_model_sees(tmp_path, tile_fit, sees_edge):
    from vitlab.inference.plantclef import FullImageTopK
    from vitlab.pipelines.plantclef.predict import predict_quadrats

    pixels = np.full((40, 80, 3), (10, 200, 10), np.uint8)
    pixels[:, :16] = (250, 0, 0)  # a red band the centre square of this 2:1 image cuts off
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    predictor = _MeanColourPredictor()
    result = predict_quadrats(
        [tmp_path / "wide.png"], FullImageTopK(k=1), predictor, tile_fit=tile_fit
    )
    assert result.predictions["wide"] == ([100] if sees_edge else [200])
    assert result.report()["tile_fit"] == tile_fit


def test_pad_keeps_the_whole_box_with_mean_colour_bars():
    from vitlab.pipelines.plantclef.predict import fit_tile

    img = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))
    out = np.asarray(fit_tile(img, 16, "pad", fill=(1, 2, 3)))
    assert out.shape == (16, 16, 3)
    assert (out[0, 0] == (1, 2, 3)).all() and (out[-1, -1] == (1, 2, 3)).all()  # bars
    assert (out[8, :] == 200).all()  # the whole width is kept
    assert np.asarray(fit_tile(img, 16, "resize")).shape == (16, 16, 3)
    with pytest.raises(ConfigError, match="predict.tile_fit"):
        fit_tile(img, 16, "stretch")
