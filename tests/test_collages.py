"""Training collages: what each holds, split hygiene, determinism, caching, the mixed sampler."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from vitlab.errors import ConfigError
from vitlab.pipelines.plantclef.collages import (
    CollageParams,
    build_collages,
    compose_collage,
    plan_collages,
)
from vitlab.pipelines.plantclef.fit_multilabel import MixedSampler, multi_hot_collate
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.prepare import PrepareParams


def _labels(rng, n=60):
    return pd.DataFrame(
        {
            "species_id": rng.choice([11, 12, 13, 14, 15], n),
            "learn_tag": rng.choice(["train", "val", "test"], n, p=[0.6, 0.3, 0.1]),
        }
    )


def test_a_collage_takes_distinct_species_of_one_split_only():
    labels = _labels(np.random.default_rng(0))
    params = CollageParams(species=(2, 3), per_image=2.0)
    plan = plan_collages(labels, shard=4, params=params)
    tags = labels["learn_tag"].to_numpy()
    assert {tag for _, tag, _, _ in plan} == {"train", "val"}  # test images are never used
    for name, tag, rows, species in plan:
        assert all(tags[r] == tag for r in rows)  # no image crosses splits
        assert sorted(labels["species_id"].to_numpy()[rows].tolist()) == species
        assert len(set(species)) == len(species) and 2 <= len(species) <= 3
        assert name.startswith(f"collage-{tag}-00004-")
    n_train = int((tags == "train").sum())
    assert sum(tag == "train" for _, tag, _, _ in plan) == 2 * n_train
    assert plan == plan_collages(labels, shard=4, params=params)  # deterministic
    assert plan != plan_collages(labels, shard=5, params=params)


def test_bare_soil_collages_have_no_species():
    labels = _labels(np.random.default_rng(1))
    plan = plan_collages(labels, 0, CollageParams(species=(0, 1), per_image=3.0))
    empty = [rows for _, _, rows, species in plan if not species]
    assert empty and all(rows == [] for rows in empty)
    assert all(len(species) <= 1 for _, _, _, species in plan)


def test_composition_is_deterministic_and_sized():
    from PIL import Image

    red, blue = Image.new("RGB", (50, 40), (220, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 220))
    first = compose_collage([red, blue], 64, (0.4, 0.6), "soil", np.random.default_rng(3))
    again = compose_collage([red, blue], 64, (0.4, 0.6), "soil", np.random.default_rng(3))
    assert first.size == (64, 64) and np.array_equal(np.asarray(first), np.asarray(again))
    pixels = np.asarray(first).reshape(-1, 3)
    assert (pixels[:, 0] > 180).any() and (pixels[:, 2] > 180).any()  # both plants are there
    blurred = compose_collage([red], 64, (0.3, 0.3), "blur", np.random.default_rng(3))
    assert blurred.size == (64, 64)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"species": [3, 1]}, "species"),
        ({"species": [0, 0]}, "at least one"),
        ({"scale": [0.0, 0.5]}, "scale"),
        ({"fill": "grass"}, "fill"),
        ({"proportion": 1.5}, "proportion"),
        ({"per_image": 0}, "per_image"),
        ({"colour": 1}, "colour"),
    ],
)
def test_bad_collage_settings_name_the_key(values, match):
    with pytest.raises(ConfigError, match=f"collages: .*{match}"):
        CollageParams.from_config(values)


def test_collages_are_cached_and_a_mixing_change_recomputes_nothing(tiny_plantclef, tmp_path):
    params = PrepareParams(image_size=48, shard_size=40)
    prepared = prepare_training_images(
        tiny_plantclef / "PlantCLEF2024_single_plant_training_metadata.csv",
        tiny_plantclef / "images_max_side_800",
        tmp_path,
        params,
    )
    settings = CollageParams(enabled=True, per_image=0.5, species=(1, 2))
    first = build_collages(prepared, tmp_path, settings, 48)
    table = first.read_table()
    assert set(table.column("learn_tag").to_pylist()) <= {"train", "val"}
    assert (
        len(table)
        == first.manifest["report"]["collages_train"] + first.manifest["report"]["collages_val"]
    )
    again = build_collages(prepared, tmp_path, replace(settings, proportion=0.9), 48)
    assert again.key == first.key  # how collages are mixed in is not in the key
    other = build_collages(prepared, tmp_path, CollageParams(per_image=0.5, species=(2, 2)), 48)
    assert other.key != first.key
    assert other.read_table().column("image").to_pylist() != table.column("image").to_pylist()


def test_the_mixed_sampler_draws_the_proportion_and_repeats_per_epoch():
    sampler = MixedSampler(n_single=30, n_collage=10, proportion=0.75, seed=0)
    order = list(sampler)
    assert len(order) == 40 and sum(i >= 30 for i in order) == 30  # 0.75 of 40 from collages
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert sum(i >= 30 for i in MixedSampler(30, 0, 0.75, 0)) == 0  # no collages: singles only


def test_label_sets_become_multi_hot_rows():
    x, y = multi_hot_collate(4)(
        [
            (np.ones(2, np.float32), np.array([1, 3])),
            (np.zeros(2, np.float32), np.array([], np.int64)),
        ]
    )
    assert torch.equal(y, torch.tensor([[0.0, 1, 0, 1], [0, 0, 0, 0]]))
    assert x.shape == (2, 2)
