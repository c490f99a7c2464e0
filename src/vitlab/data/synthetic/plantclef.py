"""Synthetic PlantCLEF 2024 dataset in the official layout.

Species differ in colour (evenly spaced hues) and shape, so any working pipeline separates
them; quadrats are a jittered 3x3 arrangement of plants from 3-5 species on soil, so per-tile
classification recovers the plot's species set while the whole-image view blurs them together
(`quadrat_layout=scattered`: plants of random sizes at random places, off any grid).
Layout written (names are the dataset config's defaults):
    PlantCLEF2024_single_plant_training_metadata.csv    `;`-separated, official columns
                                                         (+ `metadata_rows`: rows listing images
                                                         not written, for a CSV of the official
                                                         size; train.py skips them as missing)
    images_max_side_800/<learn_tag>/<species_id>/<image_name>.jpg
    PlantCLEF2024test/<plot_id>.jpg                      multi-species quadrats
    test_ground_truth.csv                                submission format
    .vitlab-synthetic / .complete                        written first / last (markers.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from vitlab.data.plantclef import METADATA_COLUMNS, write_submission
from vitlab.data.synthetic.drawing import draw_plant, soil_background
from vitlab.data.synthetic.markers import claim_output_dir, mark_complete

METADATA_FILE = "PlantCLEF2024_single_plant_training_metadata.csv"
TRAIN_IMAGES_DIR = "images_max_side_800"
TEST_IMAGES_DIR = "PlantCLEF2024test"
GROUND_TRUTH_FILE = "test_ground_truth.csv"
ORGANS = ("leaf", "flower", "habit", "fruit", "bark")


@dataclass(frozen=True)
class PlantClefSyntheticSpec:
    seed: int = 0
    n_species: int = 12
    n_rare_species: int = 2  # below the quickstart's species filter on purpose
    max_images_per_species: int = 40
    min_images_per_species: int = 16
    rare_images: int = 4
    n_quadrats: int = 16
    quadrat_size: tuple[int, int] = (720, 960)
    species_per_quadrat: tuple[int, int] = (3, 5)
    train_fraction: float = 0.8
    val_fraction: float = 0.1
    # training image width and height, each drawn from [low, high) px (small: fast to write)
    image_side: tuple[int, int] = (220, 420)
    # rows of the metadata CSV: None = one per written image; more = pad it to this many rows
    # with rows (long-tailed over the species, same columns and learn_tag split) whose images are
    # not written, so the CSV has the official size (1,408,033 rows) without 1.4 M JPEGs. The
    # pipeline skips listed-but-absent images only up to dataset.max_missing_fraction: raise it.
    metadata_rows: int | None = None
    # grid: a jittered 3x3 arrangement (one plant per tile of the paper's 3x3 grid);
    # scattered: plants of random sizes (`plant_scale` x the quadrat's shorter side) at random
    # places over the soil, overlapping or leaving soil bare, not aligned with any grid
    quadrat_layout: str = "grid"
    plant_scale: tuple[float, float] = (0.16, 0.34)


def single_plant_image(
    species_index: int,
    n_species: int,
    rng: np.random.Generator,
    sides: tuple[int, int] = PlantClefSyntheticSpec.image_side,
) -> Image.Image:
    width, height = int(rng.integers(*sides)), int(rng.integers(*sides))
    img = soil_background(width, height, rng)
    side = min(width, height) * rng.uniform(0.75, 0.95)
    cx = width / 2 + rng.uniform(-0.05, 0.05) * width
    cy = height / 2 + rng.uniform(-0.05, 0.05) * height
    draw_plant(
        img,
        (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)),
        species_index,
        n_species,
        rng,
    )
    return img


def quadrat_image(
    species_indices: list[int], n_species: int, rng: np.random.Generator, size: tuple[int, int]
) -> tuple[Image.Image, list[int]]:
    """A plot: a jittered 3x3 arrangement of plants (each species at least once)."""
    width = int(rng.integers(size[0], size[1]))
    height = int(rng.integers(size[0], size[1]))
    img = soil_background(width, height, rng)
    cells = list(species_indices) + list(rng.choice(species_indices, 9 - len(species_indices)))
    rng.shuffle(cells)
    cw, ch = width / 3, height / 3
    for cell, species in enumerate(cells):
        r, c = divmod(cell, 3)
        jx, jy = rng.uniform(-0.08, 0.08) * cw, rng.uniform(-0.08, 0.08) * ch
        box = (int(c * cw + jx), int(r * ch + jy), int((c + 1) * cw + jx), int((r + 1) * ch + jy))
        draw_plant(img, box, int(species), n_species, rng)
    return img, sorted(set(int(s) for s in cells))


def scattered_quadrat_image(
    species_indices: list[int],
    n_species: int,
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = PlantClefSyntheticSpec.plant_scale,
) -> tuple[Image.Image, list[int]]:
    """A plot: each species once, plus 0-3 more plants of them, at random places and sizes."""
    width = int(rng.integers(size[0], size[1]))
    height = int(rng.integers(size[0], size[1]))
    img = soil_background(width, height, rng)
    extra = int(rng.integers(0, 4))
    plants = list(species_indices) + [int(s) for s in rng.choice(species_indices, extra)]
    rng.shuffle(plants)
    for species in plants:
        side = rng.uniform(*scale) * min(width, height)
        cx, cy = rng.uniform(side / 2, width - side / 2), rng.uniform(side / 2, height - side / 2)
        box = (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
        draw_plant(img, box, int(species), n_species, rng)
    return img, sorted(set(int(s) for s in plants))


QUADRAT_LAYOUTS = ("grid", "scattered")


def _species_counts(spec: PlantClefSyntheticSpec, rng: np.random.Generator) -> list[int]:
    """Long-tailed image counts: common species from max down to min, then the rare ones."""
    n_common = spec.n_species - spec.n_rare_species
    ranks = np.arange(n_common)
    counts = spec.max_images_per_species * (0.85**ranks)
    counts = np.maximum(counts, spec.min_images_per_species).astype(int)
    return [int(c) for c in counts] + [spec.rare_images] * spec.n_rare_species


def generate_plantclef(out_dir: str | Path, spec: PlantClefSyntheticSpec | None = None) -> Path:
    """Write the dataset into a new, empty or previously generated folder (see markers.py: a
    user's folder is refused, never touched). Returns the folder."""
    spec = spec or PlantClefSyntheticSpec()
    if spec.n_species - spec.n_rare_species < spec.species_per_quadrat[1]:
        raise ValueError("n_species - n_rare_species must be >= the species per quadrat")
    if spec.quadrat_layout not in QUADRAT_LAYOUTS:
        raise ValueError(
            f"quadrat_layout must be one of {list(QUADRAT_LAYOUTS)}, got {spec.quadrat_layout!r}"
        )
    if not 0 < spec.plant_scale[0] <= spec.plant_scale[1] <= 1:
        raise ValueError(f"plant_scale must be 0 < low <= high <= 1: {spec.plant_scale}")
    if not 8 <= spec.image_side[0] < spec.image_side[1]:
        raise ValueError(f"image_side must be [low, high) with 8 <= low < high: {spec.image_side}")
    out = claim_output_dir(out_dir)
    rng = np.random.default_rng(spec.seed)
    species_ids = sorted(
        int(s) for s in rng.choice(np.arange(1_300_000, 1_800_000), spec.n_species, replace=False)
    )
    rows = []
    for index, (species_id, count) in enumerate(zip(species_ids, _species_counts(spec, rng))):
        tags = rng.choice(
            ["train", "val", "test"],
            size=count,
            p=[spec.train_fraction, spec.val_fraction, 1 - spec.train_fraction - spec.val_fraction],
        )
        tags[:2] = "train"  # every species has training images
        for tag in tags:
            name = rng.bytes(20).hex() + ".jpg"
            folder = out / TRAIN_IMAGES_DIR / str(tag) / str(species_id)
            folder.mkdir(parents=True, exist_ok=True)
            image = single_plant_image(index, spec.n_species, rng, spec.image_side)
            image.save(folder / name, quality=92)
            rows.append(_metadata_row(name, species_id, index, str(tag), rng))
    frame = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    if spec.metadata_rows is not None and spec.metadata_rows > len(frame):
        absent = _absent_rows(spec.metadata_rows - len(frame), species_ids, spec)
        frame = pd.concat([frame, absent], ignore_index=True)
    frame.to_csv(out / METADATA_FILE, sep=";", index=False)

    test_dir = out / TEST_IMAGES_DIR
    test_dir.mkdir()
    n_common = spec.n_species - spec.n_rare_species
    truth: dict[str, list[int]] = {}
    for q in range(spec.n_quadrats):
        k = int(rng.integers(spec.species_per_quadrat[0], spec.species_per_quadrat[1] + 1))
        chosen = [int(i) for i in rng.choice(n_common, k, replace=False)]
        if spec.quadrat_layout == "scattered":
            img, present = scattered_quadrat_image(
                chosen, spec.n_species, rng, spec.quadrat_size, spec.plant_scale
            )
        else:
            img, present = quadrat_image(chosen, spec.n_species, rng, spec.quadrat_size)
        plot_id = f"SYNTH-QUADRAT-{q:04d}"
        img.save(test_dir / f"{plot_id}.jpg", quality=92)
        truth[plot_id] = [species_ids[i] for i in present]
    write_submission(truth, out / GROUND_TRUTH_FILE)
    mark_complete(out, spec)
    return out


def _metadata_row(
    name: str, species_id: int, index: int, tag: str, rng: np.random.Generator
) -> dict[str, object]:
    genus = f"Synthetica{index // 3}"
    return {
        "image_name": name,
        "organ": str(rng.choice(ORGANS)),
        "species_id": species_id,
        "obs_id": int(rng.integers(1_000_000_000, 2_000_000_000)),
        "license": "cc-by-sa",
        "partner": "",
        "author": "vitlab synthetic",
        "altitude": round(float(rng.uniform(0, 2000)), 1),
        "latitude": round(float(rng.uniform(36, 60)), 5),
        "longitude": round(float(rng.uniform(-10, 30)), 5),
        "gbif_species_id": species_id + 5_000_000,
        "species": f"{genus} species{index}",
        "genus": genus,
        "family": f"Syntheticaceae{index // 6}",
        "dataset": "plantnet",
        "publisher": "plantnet",
        "references": "",
        "url": "",
        "learn_tag": tag,
        "image_backup_url": "",
    }


def _absent_rows(n: int, species_ids: list[int], spec: PlantClefSyntheticSpec) -> pd.DataFrame:
    """`n` metadata rows of images that are not written (`metadata_rows`), built column-wise:
    species long-tailed (Zipf-like weights over a shuffled species order), learn tags split as
    the written images', unique image names (a separate random stream: the written part of the
    dataset is the same with or without them)."""
    rng = np.random.default_rng([spec.seed, 1])
    n_species = len(species_ids)
    weights = 1.0 / (1.0 + rng.permutation(n_species)) ** 0.8
    index = rng.choice(n_species, size=n, p=weights / weights.sum())
    ids = np.asarray(species_ids, dtype=np.int64)[index]
    hexes = rng.bytes(20 * n).hex()
    names = [hexes[40 * i : 40 * i + 40] + ".jpg" for i in range(n)]
    p_test = max(0.0, 1 - spec.train_fraction - spec.val_fraction)
    tags = rng.choice(
        np.array(["train", "val", "test"]),
        size=n,
        p=[spec.train_fraction, spec.val_fraction, p_test],
    )
    genus = np.char.add("Synthetica", (index // 3).astype(str))
    columns = {
        "image_name": names,
        "organ": np.asarray(ORGANS)[rng.integers(0, len(ORGANS), n)],
        "species_id": ids,
        "obs_id": rng.integers(1_000_000_000, 2_000_000_000, n),
        "license": "cc-by-sa",
        "partner": "",
        "author": "vitlab synthetic",
        "altitude": np.round(rng.uniform(0, 2000, n), 1),
        "latitude": np.round(rng.uniform(36, 60, n), 5),
        "longitude": np.round(rng.uniform(-10, 30, n), 5),
        "gbif_species_id": ids + 5_000_000,
        "species": np.char.add(np.char.add(genus, " species"), index.astype(str)),
        "genus": genus,
        "family": np.char.add("Syntheticaceae", (index // 6).astype(str)),
        "dataset": "plantnet",
        "publisher": "plantnet",
        "references": "",
        "url": "",
        "learn_tag": tags,
        "image_backup_url": "",
    }
    return pd.DataFrame(columns, columns=list(METADATA_COLUMNS))
