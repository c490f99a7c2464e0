import math

import numpy as np
import pandas as pd
import pytest

from vitlab.data.fungiclef import (
    aggregate_by_observation,
    read_metadata,
    split_df21,
    stratified_observation_folds,
)
from vitlab.data.metadata import MetadataEncoder, cyclic, geohash, geohash_levels
from vitlab.data.synthetic.fungiclef import (
    POISON_CSV,
    TRAIN_CSV,
    VAL_CSV,
    FungiSyntheticSpec,
    generate_fungiclef,
)
from vitlab.errors import DatasetFormatError
from vitlab.metrics.fungiclef import read_poison_list


@pytest.fixture(scope="module")
def fungi(tmp_path_factory):
    return generate_fungiclef(tmp_path_factory.mktemp("fungi") / "data", FungiSyntheticSpec(seed=1))


def test_geohash_known_values():
    # reference values: the geohash article's example and two hand-checked cells
    assert geohash(57.64911, 10.40744, 11) == "u4pruydqqvj"
    assert geohash(0.0, 0.0, 5) == "s0000"
    assert geohash(-25.382708, -49.265506, 7) == "6gkzwgj"
    levels = geohash_levels(57.64911, 10.40744)
    assert levels == [
        GEO / 32 for GEO in ("0123456789bcdefghjkmnpqrstuvwxyz".index(c) for c in "4pru")
    ]


def test_cyclic_and_encoder_handles_unseen_and_missing():
    train = pd.DataFrame(
        {
            "month": [1, 7],
            "day": [1, 16],
            "Substrate": ["soil", "wood"],
            "MetaSubstrate": ["soil", "wood"],
            "Habitat": ["bog", "park"],
            "Latitude": [56.0, 55.5],
            "Longitude": [10.0, 12.0],
        }
    )
    enc = MetadataEncoder().fit(train)
    test = pd.DataFrame(
        {
            "month": [4, None],
            "day": [None, 31],
            "Substrate": ["moss", None],
            "MetaSubstrate": ["soil", "wood"],
            "Habitat": [None, "park"],
            "Latitude": [None, 56.0],
            "Longitude": [10.0, 10.0],
        }
    )
    x, missing = enc.transform(test)
    assert x.shape == (2, enc.dim) and enc.dim == 8 + 3 * 3
    np.testing.assert_allclose(x[0, :2], cyclic(4, 12), atol=1e-6)
    np.testing.assert_allclose(x[1, :2], cyclic(1, 12), atol=1e-6)  # missing month -> 1
    np.testing.assert_allclose(
        x[1, 2:4], [math.sin(2 * math.pi * 30 / 31), math.cos(2 * math.pi * 30 / 31)], atol=1e-6
    )
    assert (x[0, 4:8] == 0).all() and x[1, 4:8].tolist() == pytest.approx(
        geohash_levels(56.0, 10.0)
    )
    s0, s1 = enc.groups["substrate"]
    substrate = x[:, s0 : s0 + 3]
    assert substrate[0].tolist() == [0, 0, 1]  # unseen "moss" -> other slot
    assert substrate[1].tolist() == [0, 0, 0]  # missing -> zeros
    assert missing == {
        "month": 1,
        "day": 1,
        "Latitude": 1,
        "Longitude": 0,
        "Substrate": 1,
        "MetaSubstrate": 0,
        "Habitat": 1,
    }
    again = MetadataEncoder.from_state(enc.state())
    np.testing.assert_array_equal(again.transform(test)[0], x)


def test_folds_are_stratified_reproducible_and_keep_observations_together(fungi):
    df21 = read_metadata(fungi / VAL_CSV)
    split = split_df21(df21, n_folds=3, seed=7)
    assert split.equals(split_df21(df21, n_folds=3, seed=7))
    assert not split.equals(split_df21(df21, n_folds=3, seed=8))
    assert set(split) == {"test", "fold1", "fold2"}
    assert (df21.assign(s=split).groupby("observationID")["s"].nunique() == 1).all()
    obs = df21.assign(s=split).groupby("observationID").first()
    per_class = obs.groupby("class_id")["s"].value_counts().unstack(fill_value=0)
    assert (per_class.max(axis=1) - per_class.min(axis=1) <= 1).all()  # as even as possible


def test_stratified_folds_balance():
    obs = pd.DataFrame({"class_id": [0] * 9 + [1] * 4})
    folds = stratified_observation_folds(obs, 3, seed=0)
    assert np.bincount(folds[:9], minlength=3).tolist() == [3, 3, 3]
    assert sorted(np.bincount(folds[9:], minlength=3).tolist()) == [1, 1, 2]


def test_reading_and_bad_input(fungi, tmp_path):
    df20 = read_metadata(fungi / TRAIN_CSV)
    assert df20["class_id"].min() >= 0 and df20.groupby("observationID").size().max() <= 3
    assert read_poison_list(fungi / POISON_CSV) and -1 not in read_poison_list(fungi / POISON_CSV)
    bad = tmp_path / "bad.csv"
    df20.drop(columns=["class_id"]).to_csv(bad, index=False)
    with pytest.raises(DatasetFormatError, match="class_id"):
        read_metadata(bad)
    df20.assign(class_id="x").to_csv(bad, index=False)
    with pytest.raises(DatasetFormatError, match=":2: class_id"):
        read_metadata(bad)


def test_aggregate_by_observation():
    ids, mean = aggregate_by_observation([5, 3, 5], np.array([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0]]))
    assert ids.tolist() == [3, 5]
    np.testing.assert_allclose(mean, [[0.2, 0.8], [0.5, 0.5]])
