import numpy as np
import pytest
import wandb
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score

from vitlab.data.plantclef import read_species_names
from vitlab.pipelines.plantclef.score import per_species_f1_support, plot_per_species_f1
from vitlab.reports import (
    embedding_map_png,
    f1_distribution_png,
    per_class_f1,
    poison_confusion,
    project_2d,
    rank_classes,
)


def test_poison_confusion_matches_sklearn():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(-1, 6, 200), rng.integers(-1, 6, 200)
    poisonous = {1, 4}
    ours = poison_confusion(truth, pred, poisonous)
    ref = confusion_matrix(np.isin(truth, [1, 4]), np.isin(pred, [1, 4]), labels=[False, True])
    np.testing.assert_array_equal(ours, ref)


def test_per_class_f1_matches_sklearn():
    rng = np.random.default_rng(1)
    truth, pred = rng.integers(0, 5, 100), rng.integers(0, 7, 100)
    labels = np.union1d(truth, pred)
    ref = f1_score(truth, pred, labels=labels, average=None, zero_division=0)
    ours = per_class_f1(truth, pred)
    np.testing.assert_allclose([ours[int(k)][0] for k in labels], ref)
    assert ours[0][1] == int((truth == 0).sum())


def test_embedding_map_png(tmp_path):
    rng = np.random.default_rng(2)
    emb = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(5, 1, (20, 8))])
    xy = project_2d(emb, "pca")
    assert xy.shape == (40, 2) and abs(xy[:20, 0].mean() - xy[20:, 0].mean()) > 3
    path = embedding_map_png(emb, np.repeat([7, 9], 20), tmp_path / "map.png", "pca")
    assert path.is_file() and path.stat().st_size > 1000


def _synthetic_scores(n_classes: int, seed: int = 0) -> dict[int, tuple[float, int]]:
    rng = np.random.default_rng(seed)
    f1 = np.where(rng.random(n_classes) < 0.35, 0.0, rng.beta(1.2, 3, n_classes))
    f1[rng.random(n_classes) < 0.01] = 1.0
    support = rng.integers(0, 500, n_classes)
    return {1_300_000 + i: (float(f1[i]), int(support[i])) for i in range(n_classes)}


@pytest.mark.parametrize("n_classes", [0, 1, 6, 30, 31, 800, 7806])
def test_f1_chart_has_a_fixed_size_at_any_number_of_classes(tmp_path, n_classes):
    """It used to grow 0.25 in per species: a 20000 px strip at 800 species."""
    scores = _synthetic_scores(n_classes)
    names = {c: f"Helianthemum nummularium subsp. obscurum {c}" for c in list(scores)[::2]}
    path = f1_distribution_png(scores, tmp_path / "f1.png", names, k=15)
    with Image.open(path) as img:
        assert img.size == (1300, 750)
    assert wandb.Image(str(path)).image.size == (1300, 750)  # what RunTracker.log_image sends


def test_rank_classes_breaks_ties_by_support():
    f1 = np.array([0.0, 0.5, 1.0, 0.0, 1.0, 0.0])
    support = np.array([3, 9, 2, 7, 5, 0])
    best, worst = rank_classes(f1, support)
    assert best.tolist()[:3] == [4, 2, 1]  # F1 = 1 with support 5 before support 2
    assert worst.tolist()[:3] == [3, 0, 5]  # never right: the most frequent first


def test_plantclef_chart_and_species_names(tmp_path, tiny_plantclef):
    truth = {"a": [1, 2, 3], "b": [2, 4], "c": [5]}
    pred = {"a": [1, 2], "b": [4, 6], "c": []}
    scores = per_species_f1_support(truth, pred)
    assert scores == {
        1: (1.0, 1),
        2: (2 / 3, 2),
        3: (0.0, 1),
        4: (1.0, 1),
        5: (0.0, 1),
        6: (0.0, 0),
    }
    path = plot_per_species_f1(truth, pred, tmp_path / "chart.png", {1: "Bellis perennis"})
    with Image.open(path) as img:
        assert img.size == (1300, 750)

    names = read_species_names(tiny_plantclef / "PlantCLEF2024_single_plant_training_metadata.csv")
    assert names and all(isinstance(k, int) and v for k, v in names.items())
    assert read_species_names(tmp_path / "absent.csv") == {} == read_species_names(None)
    (tmp_path / "no_names.csv").write_text("image_name;species_id\nx.jpg;1\n")
    assert read_species_names(tmp_path / "no_names.csv") == {}
