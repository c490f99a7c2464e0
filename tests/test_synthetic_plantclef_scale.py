"""The synthetic PlantCLEF generator's scale options (benchmarks/scale_rehearsal.py): small
training images (`image_side`) and a metadata CSV padded to a given row count with rows whose
images are not written (`metadata_rows`), in the official layout and columns."""

from __future__ import annotations

import dataclasses

import pandas as pd
from PIL import Image

from vitlab.data.plantclef import METADATA_COLUMNS, index_images, read_training_metadata
from vitlab.data.synthetic.plantclef import (
    METADATA_FILE,
    TRAIN_IMAGES_DIR,
    PlantClefSyntheticSpec,
    generate_plantclef,
)

SPEC = PlantClefSyntheticSpec(
    seed=5, n_species=6, n_rare_species=0, max_images_per_species=3, min_images_per_species=3,
    n_quadrats=1, quadrat_size=(120, 150), image_side=(20, 30),
)  # fmt: skip


def test_image_side_and_padded_metadata(tmp_path):
    plain = generate_plantclef(tmp_path / "plain", SPEC)
    padded_spec = dataclasses.replace(SPEC, metadata_rows=500)
    padded = generate_plantclef(tmp_path / "padded", padded_spec)
    images = index_images(padded / TRAIN_IMAGES_DIR)
    assert len(images) == 18  # 6 species x 3: the padding writes no image
    for path in images.values():
        assert all(20 <= side < 30 for side in Image.open(path).size)
    frame = read_training_metadata(padded / METADATA_FILE)  # unique names, known tags
    assert len(frame) == 500
    raw = pd.read_csv(padded / METADATA_FILE, sep=";")
    assert tuple(raw.columns) == METADATA_COLUMNS
    species = set(pd.read_csv(plain / METADATA_FILE, sep=";")["species_id"])
    assert set(frame["species_id"]) <= species  # padding rows use the dataset's species
    assert set(frame["learn_tag"]) == {"train", "val", "test"}

    # the written part is the same with or without padding (its own random stream)
    def text(root):
        return pd.read_csv(root / METADATA_FILE, sep=";", dtype=str, keep_default_na=False)

    written = text(plain)
    assert text(padded).head(len(written)).equals(written)
    assert (plain / "test_ground_truth.csv").read_text() == (
        padded / "test_ground_truth.csv"
    ).read_text()
