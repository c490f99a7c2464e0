import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from vitlab.reports import embedding_map_png, per_class_f1, poison_confusion, project_2d


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
