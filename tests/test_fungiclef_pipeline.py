"""FungiCLEF: ensembles, open set, sampler weights, and the quickstart end to end."""

import json

import numpy as np
import pytest
import torch
from scipy.special import softmax

from tests.conftest import compose_config
from vitlab.data.synthetic.fungiclef import FungiSyntheticSpec, generate_fungiclef
from vitlab.inference.fungiclef import (
    ensemble_probabilities,
    entropy,
    predict_with_open_set,
    tune_entropy_threshold,
)
from vitlab.metrics.fungiclef import read_fungiclef_csv
from vitlab.models.heads import MetadataMLPHead, MetadataTransformerHead
from vitlab.pipelines.fungiclef import train_fungiclef, validation_matching_weights


def test_ensemble_averages():
    a = np.array([[2.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 2.0], [0.0, 3.0]])
    np.testing.assert_allclose(
        ensemble_probabilities([a, b], "probs"), (softmax(a, axis=1) + softmax(b, axis=1)) / 2
    )
    np.testing.assert_allclose(
        ensemble_probabilities([a, b], "logits"), softmax((a + b) / 2, axis=1)
    )
    with pytest.raises(ValueError, match="ensemble.average"):
        ensemble_probabilities([a], "votes")


def test_open_set_rule_and_tuning():
    probs = np.array([[0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.1, 0.8, 0.1]])
    ids = [10, 11, 12]
    assert predict_with_open_set(probs, ids, None).tolist() == [10, 10, 11]
    h = entropy(probs)
    assert h[1] == pytest.approx(-sum(p * np.log(p) for p in probs[1]))
    assert predict_with_open_set(probs, ids, float(h[1] - 1e-6)).tolist() == [10, -1, 11]
    threshold, error = tune_entropy_threshold(probs, ids, np.array([10, -1, 11]))
    assert error == 0.0 and h[2] <= threshold < h[1]


def test_validation_matching_sampler_weights():
    train = np.array([0, 0, 0, 1])
    val = np.array([0, 1])
    w = validation_matching_weights(train, val, num_classes=2)
    # sampled class mass matches validation: 3 * w0 == 1 * w1
    assert 3 * w[0] == pytest.approx(w[3])


@pytest.mark.parametrize("head_cls", [MetadataMLPHead, MetadataTransformerHead])
def test_heads_shapes_and_metadata_switch(head_cls):
    groups = {"date": (0, 4), "geo": (4, 8), "substrate": (8, 12)}
    kwargs = dict(
        embed_dim=16,
        meta_groups=groups,
        num_classes=5,
        hidden=32,
        aux_outputs={"poisonous": 1, "genus": 3},
    )
    if head_cls is MetadataTransformerHead:
        kwargs.update(heads=4, layers=1)
    head = head_cls(**kwargs).eval()
    emb, meta = torch.randn(2, 16), torch.randn(2, 12)
    out = head(emb, meta)
    assert out["species"].shape == (2, 5) and out["poisonous"].shape == (2, 1)
    assert out["genus"].shape == (2, 3)
    assert not torch.allclose(head(emb, meta)["species"], head(emb, meta * 0)["species"])
    blind = head_cls(**{**kwargs, "use_metadata": False}).eval()
    torch.testing.assert_close(blind(emb, meta)["species"], blind(emb, meta * 0)["species"])


@pytest.fixture(scope="module")
def tiny_fungi(tmp_path_factory):
    spec = FungiSyntheticSpec(
        seed=2, n_species=8, n_unknown=2, max_observations=14, min_observations=5
    )
    return generate_fungiclef(tmp_path_factory.mktemp("fungi") / "data", spec)


FAST = [
    "experiment=quickstart_fungiclef",
    "logger=csv",
    "dataset.synthetic=null",
    "trainer.max_epochs=15",
    "prepare.image_size=64",
    "backbone.model_kwargs.img_size=64",
    "backbone.input_size=64",
    "backbone.model_kwargs.depth=2",
    "head.model.hidden=128",
]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "head=fungi_transformer",
            "head.model.hidden=64",
            "head.model.layers=1",
            "optimizer.lr=1e-3",
            "head.batch_size=64",
            "loss=weighted_ce",
            "aux_targets.genus=0.3",
            "aux_targets.poisonous=0.3",
            "sampler=val_distribution",
            "ensemble.average=logits",
            "ensemble.open_set_threshold=null",
            "scheduler=plateau",
        ],
    ],
)
def test_quickstart_end_to_end(tiny_fungi, tmp_path, extra):
    cfg = compose_config("train", [*FAST, f"dataset.root={tiny_fungi}", *extra], tmp_path)
    summary = train_fungiclef(cfg)
    run = tmp_path / "run"
    assert set(summary["folds"]) == {"fold1", "fold2"}
    assert set(summary["held_out_scores"]) == {"fold1", "fold2", "ensemble"}
    submission = read_fungiclef_csv(run / "submission.csv")
    truth = read_fungiclef_csv(tiny_fungi / "test_ground_truth.csv")
    assert set(submission) == set(truth)  # every test observation, once
    scores = json.loads((run / "scores.json").read_text())
    assert set(scores) >= {"track1", "track2", "track3", "track4", "macro_f1", "accuracy"}
    # metadata carries the species signal on this data: a working pipeline is far above chance
    assert scores["accuracy"] > 0.5, scores
    assert summary["metadata_missing"]["DF20"]["month"] > 0  # missing values were counted


def test_corrupt_images_are_skipped_and_every_observation_still_predicted(tiny_fungi, tmp_path):
    import shutil

    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(tiny_fungi, data)
    test = pd.read_csv(data / "FungiCLEF2023_public_test_metadata_PRODUCTION.csv")
    lonely = test.groupby("observationID").filter(lambda g: len(g) == 1).iloc[0]
    (data / "DF21_300" / lonely["image_path"]).write_bytes(b"not a jpeg")
    train_image = sorted((data / "DF20_300").glob("*.JPG"))[0]
    train_image.write_bytes(train_image.read_bytes()[:64])
    cfg = compose_config(
        "train", [*FAST, f"dataset.root={data}", "trainer.max_epochs=2"], tmp_path / "run_root"
    )
    summary = train_fungiclef(cfg)
    assert summary["prepare_report"]["corrupt_images"] == 2
    assert summary["test_observations_without_images"]["examples"] == [int(lonely["observationID"])]
    submission = read_fungiclef_csv(tmp_path / "run_root" / "run" / "submission.csv")
    assert submission[int(lonely["observationID"])] == -1
    assert set(submission) == set(read_fungiclef_csv(data / "test_ground_truth.csv"))
