"""Multi-label aggregation: pooling, the decision rule, threshold choice on validation rows."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from vitlab.config import instantiate_node
from vitlab.inference.multilabel import (
    PooledThreshold,
    choose_thresholds,
    decide,
    pool,
    pseudo_plots,
    samples_f1,
)
from vitlab.inference.plantclef import GridArgmax

TILES = np.array([[0.9, 0.1, 0.2], [0.2, 0.6, 0.1], [0.1, 0.5, 0.3]])


def test_pooling_by_hand():
    assert pool(TILES, "max") == pytest.approx([0.9, 0.6, 0.3])
    assert pool(TILES, "mean") == pytest.approx([0.4, 0.4, 0.2])
    # noisy-OR: 1 - prod(1 - p)
    assert pool(TILES, "noisy_or") == pytest.approx(
        [1 - 0.1 * 0.8 * 0.9, 1 - 0.9 * 0.4 * 0.5, 1 - 0.8 * 0.9 * 0.7]
    )
    with pytest.raises(ValueError, match="pooling"):
        pool(TILES, "median")


def test_decision_rule_threshold_cap_and_fallback():
    scores = np.array([0.9, 0.6, 0.3, 0.7])
    assert decide(scores, 0.5, None, 1) == [0, 3, 1]
    assert decide(scores, 0.5, 2, 1) == [0, 3]  # top-K cap keeps the best
    assert decide(scores, np.array([0.95, 0.5, 0.2, 0.8]), None, 1) == [1, 2]  # per species
    assert decide(scores, 0.99, None, 1) == [0]  # nothing reaches it: the best one
    assert decide(scores, 0.99, None, 0) == []


def test_samples_f1_is_sklearns_samples_average():
    rng = np.random.default_rng(0)
    truth, predicted = rng.random((30, 6)) > 0.6, rng.random((30, 6)) > 0.5
    truth[:, 0] |= ~truth.any(1)  # sklearn's samples F1 needs a label per row here
    expected = f1_score(truth, predicted, average="samples", zero_division=0)
    assert samples_f1(truth, predicted).mean() == pytest.approx(expected)
    assert samples_f1(np.zeros((1, 3), bool), np.zeros((1, 3), bool)) == pytest.approx([1.0])


def test_thresholds_are_chosen_where_validation_f1_peaks():
    rng = np.random.default_rng(1)
    truth = rng.random((200, 4)) > 0.7
    # positives score in [0.6, 1), negatives in [0, 0.4): any threshold in between separates
    probs = np.where(truth, 0.6 + 0.4 * rng.random(truth.shape), 0.4 * rng.random(truth.shape))
    decision = choose_thresholds(probs, truth)
    assert 0.4 <= decision["global"] <= 0.6 and decision["global_val_f1"] == 1.0
    assert all(0.4 <= t <= 0.6 for t in decision["per_species"])
    # a species with fewer than 3 validation positives keeps the global threshold
    truth[:, 3] = False
    truth[:2, 3] = True
    rare = choose_thresholds(probs, truth)
    assert rare["per_species"][3] == rare["global"]


def test_pooled_threshold_boxes_and_cache_key():
    one = PooledThreshold(grid_sizes=[3])
    assert one.boxes(90, 60) == GridArgmax(3).boxes(90, 60)
    assert one.box_params() == GridArgmax(3).box_params()  # the same cached tiles
    multi = PooledThreshold(grid_sizes=[2, 3], full_image=True)
    assert len(multi.boxes(90, 60)) == 4 + 9 + 1
    assert multi.box_params() != one.box_params()
    whole = PooledThreshold(grid_sizes=[], full_image=True)
    assert whole.boxes(90, 60) == [(0, 0, 90, 60)]


def test_auto_thresholds_come_from_the_training_decision():
    made_for = {"pooling": "max", "boxes_per_plot": 1}
    decision = {"global": 0.55, "per_species": [0.8, 0.2, 0.5], **made_for}
    rule = PooledThreshold(threshold="auto", grid_sizes=[1])
    with pytest.raises(ValueError, match="no thresholds chosen"):
        rule.aggregate(TILES, [10, 11, 12])
    assert rule.with_thresholds(decision).aggregate(TILES, [10, 11, 12]) == [10, 11]
    per_species = PooledThreshold(grid_sizes=[1], per_species=True).with_thresholds(decision)
    assert per_species.aggregate(TILES, [10, 11, 12]) == [10, 11]
    # thresholds chosen for another pooling or box count are refused, naming the keys
    for other in (PooledThreshold(grid_sizes=[1], pooling="mean"), PooledThreshold()):
        with pytest.raises(ValueError, match="inference.pooling, inference.grid_sizes"):
            other.with_thresholds(decision)
    fixed = PooledThreshold(threshold=0.25, pooling="mean")
    assert fixed.aggregate(TILES, [10, 11, 12]) == [10, 11]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid_sizes": [], "full_image": False}, "no boxes"),
        ({"grid_sizes": [0]}, "grid_sizes"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.5, "per_species": True}, "per_species"),
        ({"top_k": 0}, "top_k"),
        ({"pooling": "sum"}, "pooling"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PooledThreshold(**kwargs)


def test_the_config_instantiates():
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    cfg = OmegaConf.load(REPO / "configs" / "inference" / "pooled_threshold.yaml")
    rule = instantiate_node(cfg, "inference")
    assert rule.grid_sizes == (3,) and rule.needs_thresholds


def test_pseudo_plots_hold_only_their_species_and_soil():
    truth = np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], bool
    )
    plots = pseudo_plots(truth, boxes=9, plots=200, species=(1, 2), seed=0)
    assert len(plots) == 200 and all(len(rows) == 9 for rows in plots)
    for rows in plots:
        assert truth[rows].any(0).sum() <= 2  # never more species than drawn
    assert plots[0].tolist() == pseudo_plots(truth, 9, 200, (1, 2), seed=0)[0].tolist()


def test_calibration_raises_the_max_pooling_threshold_over_more_boxes():
    """Max over many boxes lifts the noise of the negatives: the chosen threshold rises with
    the box count, where a per-box choice would keep it (and add false positives)."""
    rng = np.random.default_rng(2)
    truth = rng.random((400, 8)) > 0.85
    probs = np.where(truth, rng.beta(6, 2, truth.shape), rng.beta(2, 8, truth.shape))
    one = PooledThreshold(grid_sizes=[1], plot_species=[2, 3]).calibrate(probs, truth)
    sixteen = PooledThreshold(grid_sizes=[4], plot_species=[2, 3]).calibrate(probs, truth)
    assert sixteen["global"] > one["global"]
    assert sixteen["pooling"] == "max" and sixteen["boxes_per_plot"] == 16
    rule = PooledThreshold(grid_sizes=[4]).with_thresholds(sixteen)
    assert rule.thresholds(8) == sixteen["global"]
