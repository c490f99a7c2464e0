import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from vitlab.metrics.classification import accuracy, macro_f1


@pytest.mark.parametrize("seed", range(20))
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    truth = rng.integers(0, 8, n)
    pred = rng.integers(0, 10, n)  # includes classes never in truth
    assert accuracy(truth, pred) == pytest.approx(accuracy_score(truth, pred))
    assert macro_f1(truth, pred) == pytest.approx(
        f1_score(truth, pred, average="macro", zero_division=0)
    )
