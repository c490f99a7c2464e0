"""Faulty user inputs that used to be accepted silently (or crashed with a traceback): FungiCLEF
metadata CSVs and the GroupViT COCO captions JSON must fail naming file, line and column, or
skip with a counted warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_entry_point
from vitlab.data.coco_captions import read_coco_captions
from vitlab.data.fungiclef import read_metadata
from vitlab.data.metadata import MetadataEncoder
from vitlab.data.synthetic.fungiclef import TRAIN_CSV, FungiSyntheticSpec, generate_fungiclef
from vitlab.errors import DatasetFormatError

HEADER = "observationID,month,day,Substrate,Latitude,Longitude,image_path,class_id"
# line 2..5 of a small, valid metadata CSV: observation 10 has two images (a shared
# observationID is not a duplicate), month/day/coordinates may be empty, months may read "3.0"
GOOD_ROWS = [
    "10,3.0,6,soil,56.1,10.2,10-0.JPG,0",
    "10,3.0,6,soil,56.1,10.2,10-1.JPG,0",
    "11,,,wood,,,11-0.JPG,1",
    "12,12,31,wood,-55.5,-12.25,12-0.JPG,-1",
]


def _csv(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "meta.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _with_line(line: int, row: str) -> list[str]:
    """GOOD_ROWS with `row` placed so that it is line `line` of the file (header = line 1)."""
    rows = list(GOOD_ROWS)
    rows.insert(line - 2, row)
    return rows


# ------------------------------------------------------------------ FungiCLEF metadata CSVs


def test_valid_rows_read_with_missing_dates_kept_as_unknown(tmp_path):
    frame = read_metadata(_csv(tmp_path, GOOD_ROWS))
    assert frame["observationID"].tolist() == [10, 10, 11, 12]
    assert frame["class_id"].tolist() == [0, 0, 1, -1]
    assert frame["month"].isna().tolist() == [False, False, True, False]
    assert frame["month"].tolist()[:2] == [3, 3] and frame.attrs["duplicate_rows"] == 0
    x, missing = MetadataEncoder().fit(frame).transform(frame)
    assert missing["month"] == 1 and missing["day"] == 1 and x.shape[0] == 4


def test_image_listed_with_two_classes_names_both_lines_and_classes(tmp_path):
    path = _csv(tmp_path, [*GOOD_ROWS, "13,4,2,soil,56.0,10.0,10-1.JPG,5"])
    with pytest.raises(DatasetFormatError) as err:
        read_metadata(path)
    message = str(err.value)
    assert str(path) in message and "10-1.JPG" in message
    assert "class_id 0 on line 3" in message and "and 5 on line 6" in message


def test_image_listed_in_two_observations_fails(tmp_path):
    path = _csv(tmp_path, [*GOOD_ROWS, "13,3.0,6,soil,56.1,10.2,10-0.JPG,0"])
    conflict = r"10-0\.JPG.*observationID 10 on line 2 and 13 on line 6"
    with pytest.raises(DatasetFormatError, match=conflict):
        read_metadata(path)


def test_unlabelled_csv_with_image_in_two_observations_fails(tmp_path):
    header = "observationID,month,image_path"
    path = _csv(tmp_path, ["1,3,a.JPG", "2,3,a.JPG"], header)
    conflict = r"a\.JPG is listed with observationID 1 on line 2 and 2 on line 3"
    with pytest.raises(DatasetFormatError, match=conflict):
        read_metadata(path, labelled=False)


def test_exact_duplicate_rows_are_dropped_counted_and_warned(tmp_path, caplog):
    path = _csv(tmp_path, [*GOOD_ROWS, GOOD_ROWS[0], GOOD_ROWS[2], GOOD_ROWS[0]])
    with caplog.at_level(logging.WARNING, logger="vitlab.data.fungiclef"):
        frame = read_metadata(path)
    assert frame["image_path"].tolist() == ["10-0.JPG", "10-1.JPG", "11-0.JPG", "12-0.JPG"]
    assert frame.attrs["duplicate_rows"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(path) in warned[0] and "3 duplicate row(s)" in warned[0]
    assert "[6, 7, 8]" in warned[0]  # the lines dropped


def test_same_image_same_class_other_metadata_is_not_a_duplicate(tmp_path):
    path = _csv(tmp_path, [*GOOD_ROWS, "10,4.0,6,soil,56.1,10.2,10-0.JPG,0"])
    with pytest.raises(DatasetFormatError, match=r"10-0\.JPG.*month 3 on line 2 and 4 on line 6"):
        read_metadata(path)


@pytest.mark.parametrize(
    "column, position, value, allowed",
    [
        ("month", 2, "March", "1-12"),
        ("month", 2, "13", "1-12"),
        ("month", 2, "0", "1-12"),
        ("month", 2, "2.5", "1-12"),
        ("day", 3, "32", "1-31"),
        ("day", 3, "first", "1-31"),
        ("Latitude", 5, "north", "-90 to 90"),
        ("Latitude", 5, "95", "-90 to 90"),
        ("Longitude", 6, "200", "-180 to 180"),
    ],
)
def test_bad_optional_metadata_value_names_file_line_column_and_range(
    tmp_path, column, position, value, allowed
):
    fields = "14,5,7,soil,56.0,10.0,14-0.JPG,2".split(",")
    fields[position - 1] = value
    path = _csv(tmp_path, _with_line(4, ",".join(fields)))
    with pytest.raises(DatasetFormatError) as err:
        read_metadata(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: {column} (column {position})"), message
    assert repr(value) in message and allowed in message


@pytest.mark.parametrize("value", ["abc", "1.5", "", "inf"])
def test_bad_observation_id_names_file_line_column(tmp_path, value):
    path = _csv(tmp_path, _with_line(3, f"{value},5,7,soil,56.0,10.0,14-0.JPG,2"))
    with pytest.raises(DatasetFormatError) as err:
        read_metadata(path)
    assert str(err.value).startswith(f"{path}:3: observationID (column 1) must be an integer")


def test_bad_observation_id_in_unlabelled_csv(tmp_path):
    path = _csv(tmp_path, ["1,3,a.JPG", "x1,3,b.JPG"], "observationID,month,image_path")
    with pytest.raises(DatasetFormatError, match=r":3: observationID \(column 1\)"):
        read_metadata(path, labelled=False)


def test_fractional_class_id_is_not_truncated(tmp_path):
    path = _csv(tmp_path, _with_line(5, "14,5,7,soil,56.0,10.0,14-0.JPG,1.5"))
    with pytest.raises(DatasetFormatError, match=r":5: class_id \(column 8\) .*'1\.5'"):
        read_metadata(path)


def test_empty_image_path_names_the_line(tmp_path):
    path = _csv(tmp_path, _with_line(2, "14,5,7,soil,56.0,10.0,,2"))
    with pytest.raises(DatasetFormatError, match=r":2: image_path \(column 7\) is empty"):
        read_metadata(path)


def test_encoder_refuses_months_and_days_it_cannot_encode():
    frame = pd.DataFrame({"month": [3, 13], "day": [1, 2]})
    encoder = MetadataEncoder().fit(frame)
    with pytest.raises(ValueError, match=r"month.*1-12.*13"):
        encoder.transform(frame)
    with pytest.raises(ValueError, match=r"day.*1-31.*0"):
        encoder.transform(pd.DataFrame({"month": [3, None], "day": [0, None]}))


def test_train_py_exits_2_with_one_line_naming_the_bad_month(tmp_path):
    spec = FungiSyntheticSpec(seed=4, n_species=4, n_unknown=2, max_observations=6)
    data = generate_fungiclef(tmp_path / "data", spec)
    csv_path = data / TRAIN_CSV
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    fields = lines[3].split(",")  # line 4: no quoted commas in the first columns
    fields[header.index("month")] = "March"
    lines[3] = ",".join(fields)
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = run_entry_point(
        "train.py",
        [
            "experiment=quickstart_fungiclef",
            "dataset.synthetic=null",
            "prepare.image_size=64",
            "backbone.model_kwargs.img_size=64",
            "backbone.input_size=64",
            "backbone.model_kwargs.depth=2",
            f"dataset.root={data}",
        ],
        tmp_path,
    )
    printed = out.stdout + out.stderr  # Hydra's logging prints the error on stdout
    assert out.returncode == 2, printed[-2000:]
    assert "Traceback" not in printed
    error = [line for line in printed.splitlines() if "month" in line]
    assert len(error) == 1, printed[-2000:]
    assert "DatasetFormatError" in error[0]
    assert f"{csv_path}:4: month (column 2)" in error[0] and "'March'" in error[0]
    assert not (tmp_path / ".cache").exists()  # refused before any stage ran


# ------------------------------------------------------------------------ COCO captions JSON


def test_coco_image_file_under_two_ids_names_json_file_and_both_ids(tmp_path):
    image_dir = tmp_path / "val2017"
    image_dir.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 6)).save(image_dir / name)
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 6, "width": 8},
        {"id": 2, "file_name": "b.jpg", "height": 6, "width": 8},
        {"id": 7, "file_name": "a.jpg", "height": 6, "width": 8},
    ]
    annotations = [{"id": n, "image_id": i, "caption": "a cat"} for n, i in enumerate((1, 2, 7))]
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(DatasetFormatError) as err:
        read_coco_captions(path, image_dir)
    message = str(err.value)
    assert str(path) in message and "a.jpg" in message
    assert "image ids 1 and 7" in message, message
