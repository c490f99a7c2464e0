"""Synthetic FungiCLEF (Danish Fungi) dataset in the FungiCLEF 2023 production layout.

Species come in look-alike pairs: both members of a pair are drawn the same way (same colour and
shape), so the image alone confuses them, while their metadata differs (substrate, habitat,
season, location), so a metadata-aware head can tell them apart. Counts are long-tailed, a subset
is poisonous, observations have 1-3 images, DF21 adds species unseen in DF20 (class_id -1).
Written:
    FungiCLEF2023_train_metadata_PRODUCTION.csv, FungiCLEF2023_val_metadata_PRODUCTION.csv,
    FungiCLEF2023_public_test_metadata_PRODUCTION.csv (no labels), test_ground_truth.csv,
    poison_status_list.csv, DF20_300/, DF21_300/, .vitlab-synthetic + .complete (markers.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vitlab.data.fungiclef import CSV_COLUMNS, UNKNOWN
from vitlab.data.synthetic.drawing import draw_plant, soil_background
from vitlab.data.synthetic.markers import claim_output_dir, mark_complete

TRAIN_CSV = "FungiCLEF2023_train_metadata_PRODUCTION.csv"
VAL_CSV = "FungiCLEF2023_val_metadata_PRODUCTION.csv"
TEST_CSV = "FungiCLEF2023_public_test_metadata_PRODUCTION.csv"
POISON_CSV = "poison_status_list.csv"
GROUND_TRUTH = "test_ground_truth.csv"
SUBSTRATES = (
    "soil",
    "dead wood (including bark)",
    "leaf or needle litter",
    "wood",
    "bark",
    "mosses",
    "stems of herbs, grass etc",
    "cones",
    "fruits",
    "other substrate",
)
META_SUBSTRATES = ("soil", "wood", "litter", "bark", "moss", "other")
HABITATS = (
    "Deciduous woodland",
    "Mixed woodland (with coniferous and deciduous trees)",
    "coniferous woodland/plantation",
    "park/churchyard",
    "Bog",
    "roadside",
    "natural grassland",
    "garden",
    "heath",
    "lawn",
)


@dataclass(frozen=True)
class FungiSyntheticSpec:
    seed: int = 0
    n_species: int = 12  # known species (in DF20); pairs of look-alikes
    n_unknown: int = 2  # species only in DF21 / test (class_id -1)
    n_poisonous: int = 3
    max_observations: int = 24
    min_observations: int = 6
    df21_fraction: float = 0.5  # DF21 observations per species relative to DF20
    test_fraction: float = 0.3
    image_size: tuple[int, int] = (160, 300)
    missing_rate: float = 0.05
    metadata_signal: float = 0.5  # chance that substrate/habitat follow the species' preference


@dataclass(frozen=True)
class _Species:
    class_id: int
    look: int  # drawing index shared by a look-alike pair
    substrate: int
    habitat: int
    month: int
    lat: float
    lon: float
    poisonous: int


def _species(spec: FungiSyntheticSpec, rng: np.random.Generator) -> list[_Species]:
    total = spec.n_species + spec.n_unknown
    poisonous = set(rng.choice(spec.n_species, spec.n_poisonous, replace=False).tolist())
    out = []
    for i in range(total):
        class_id = i if i < spec.n_species else UNKNOWN
        out.append(
            _Species(
                class_id=class_id,
                look=i // 2,
                substrate=int(rng.integers(len(SUBSTRATES))),
                habitat=int(rng.integers(len(HABITATS))),
                month=int(rng.integers(1, 13)),
                lat=float(rng.uniform(54.8, 57.6)),
                lon=float(rng.uniform(8.2, 12.6)),
                poisonous=int(i in poisonous),
            )
        )
    # look-alike partners differ in every metadata group
    for a in range(0, total - 1, 2):
        b = out[a + 1]
        out[a + 1] = _Species(
            b.class_id,
            b.look,
            (out[a].substrate + 3) % len(SUBSTRATES),
            (out[a].habitat + 4) % len(HABITATS),
            (out[a].month + 5) % 12 + 1,
            out[a].lat + 1.2 if out[a].lat < 56 else out[a].lat - 1.2,
            out[a].lon + 2.0 if out[a].lon < 10.4 else out[a].lon - 2.0,
            b.poisonous,
        )
    return out


def _observation_rows(
    sp: _Species,
    obs_id: int,
    folder: str,
    n_looks: int,
    spec: FungiSyntheticSpec,
    rng: np.random.Generator,
    out_dir: Path,
) -> list[dict]:
    def maybe(value):
        return None if rng.random() < spec.missing_rate else value

    # metadata is informative, not decisive: each group is often off the species' preference
    keep = spec.metadata_signal
    substrate = sp.substrate if rng.random() < keep else int(rng.integers(len(SUBSTRATES)))
    habitat = sp.habitat if rng.random() < keep else int(rng.integers(len(HABITATS)))
    month = (sp.month - 1 + int(rng.integers(-2, 3))) % 12 + 1
    lat, lon = sp.lat + rng.normal(0, 0.6), sp.lon + rng.normal(0, 0.9)
    meta = {  # one observation: the same (possibly missing) metadata on each of its images
        "month": maybe(month),
        "day": maybe(int(rng.integers(1, 29))),
        "Substrate": maybe(SUBSTRATES[substrate]),
        "Habitat": maybe(HABITATS[habitat]),
        "MetaSubstrate": maybe(META_SUBSTRATES[substrate % len(META_SUBSTRATES)]),
        "Latitude": maybe(round(lat, 5)),
        "Longitude": maybe(round(lon, 5)),
    }
    rows = []
    for k in range(int(rng.integers(1, 4))):
        width, height = (int(rng.integers(*spec.image_size)) for _ in range(2))
        img = soil_background(width, height, rng)
        side = min(width, height) * rng.uniform(0.7, 0.95)
        cx, cy = width / 2, height / 2
        draw_plant(
            img,
            (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)),
            sp.look,
            n_looks,
            rng,
        )
        name = f"{obs_id}-{k}.JPG"
        img.save(out_dir / folder / name, quality=90)
        rows.append(
            {
                "observationID": obs_id,
                **meta,
                "countryCode": "DK",
                "locality": "",
                "level0Gid": "DNK",
                "level0Name": "Denmark",
                "level1Gid": "",
                "level1Name": "",
                "level2Gid": "",
                "level2Name": "",
                "CoorUncert": 10.0,
                "image_path": name,
                "class_id": sp.class_id,
                "poisonous": sp.poisonous,
                "species": f"Fungus species{sp.look}-{sp.class_id}",
                "genus": f"Fungus{sp.look}",
                "family": f"Fungaceae{sp.look // 2}",
                "order": "Agaricales",
                "class": "Agaricomycetes",
                "phylum": "Basidiomycota",
                "kingdom": "Fungi",
            }
        )
    return rows


def generate_fungiclef(out_dir: str | Path, spec: FungiSyntheticSpec | None = None) -> Path:
    """Write the dataset into a new, empty or previously generated folder (a user's folder is
    refused, never touched: markers.py); returns the folder."""
    spec = spec or FungiSyntheticSpec()
    out = claim_output_dir(out_dir)
    for folder in ("DF20_300", "DF21_300"):
        (out / folder).mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    species = _species(spec, rng)
    n_looks = (len(species) + 1) // 2
    ranks = np.arange(spec.n_species)
    counts = np.maximum(spec.max_observations * 0.85**ranks, spec.min_observations).astype(int)
    rng.shuffle(counts)  # the tail is not ordered by class id
    obs_id = 10_000
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for sp in species:
        n_train = int(counts[sp.class_id]) if sp.class_id != UNKNOWN else 0
        n_df21 = max(3, int(round((n_train or spec.max_observations * 0.4) * spec.df21_fraction)))
        n_test = max(1, int(round(n_df21 * spec.test_fraction / (1 - spec.test_fraction))))
        for split, n, folder in (
            ("train", n_train, "DF20_300"),
            ("val", n_df21, "DF21_300"),
            ("test", n_test, "DF21_300"),
        ):
            for _ in range(n):
                obs_id += int(rng.integers(1, 50))
                splits[split] += _observation_rows(sp, obs_id, folder, n_looks, spec, rng, out)
    columns = list(CSV_COLUMNS)
    pd.DataFrame(splits["train"], columns=columns).to_csv(out / TRAIN_CSV, index=False)
    pd.DataFrame(splits["val"], columns=columns).to_csv(out / VAL_CSV, index=False)
    test = pd.DataFrame(splits["test"], columns=columns)
    test.drop(columns=["class_id", "poisonous", *columns[-7:]]).to_csv(out / TEST_CSV, index=False)
    truth = test.groupby("observationID")["class_id"].first().reset_index()
    truth.to_csv(out / GROUND_TRUTH, index=False)
    poison = pd.DataFrame(
        {
            "class_id": [s.class_id for s in species if s.class_id != UNKNOWN],
            "poisonous": [s.poisonous for s in species if s.class_id != UNKNOWN],
        }
    )
    poison.to_csv(out / POISON_CSV, index=False)
    mark_complete(out, spec)
    return out
