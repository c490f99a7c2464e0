import json
import socket

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader, TensorDataset

from tests._ddp_macro_f1 import worker
from vitlab.metrics.classification import MacroF1, accuracy, macro_f1, macro_f1_from_counts
from vitlab.tasks.classification import EmbeddingClassifier


def _sklearn_macro_f1(truth, pred) -> float:
    """The project's convention, spelled out: sklearn macro F1 over the labels in truth ∪
    prediction (reference/plantclef.md, reference/fungiclef.md)."""
    labels = np.union1d(truth, pred)
    return f1_score(truth, pred, labels=labels, average="macro", zero_division=0)


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
    assert macro_f1(truth, pred) == pytest.approx(_sklearn_macro_f1(truth, pred), abs=1e-12)


def test_arbitrary_labels_and_edge_cases():
    truth, pred = np.array([-1, 5, 5, 1604, 7]), np.array([-1, 5, 7, 3, 7])
    assert macro_f1(truth, pred) == pytest.approx(_sklearn_macro_f1(truth, pred), abs=1e-12)
    assert macro_f1([], []) == 0.0
    assert macro_f1([2, 2], [2, 2]) == 1.0
    with pytest.raises(ValueError, match="truth has 2 labels but pred has 3"):
        macro_f1([1, 2], [1, 2, 3])


def test_hand_computed_absent_classes_do_not_count():
    """Classes 0..9, of which only 1, 2 and 3 occur: truth [1, 1, 2], pred [1, 3, 2].
    F1(1) = 2/3, F1(2) = 1, F1(3) = 0 (only predicted): mean 5/9, not diluted by 0..9."""
    truth, pred = torch.tensor([1, 1, 2]), torch.tensor([1, 3, 2])
    metric = MacroF1(10)
    metric.update(pred, truth)
    assert metric.compute().item() == pytest.approx(5 / 9)
    assert macro_f1(truth.numpy(), pred.numpy()) == pytest.approx(5 / 9)
    assert macro_f1_from_counts(np.zeros(3), np.zeros(3), np.zeros(3)) == 0.0


@pytest.mark.parametrize("seed", range(10))
def test_metric_over_batches_matches_sklearn(seed):
    """Accumulated batch by batch with many classes absent from both truth and prediction,
    some only in truth and some only predicted: the same value as sklearn on all rows."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(5, 300))
    used = rng.choice(num_classes, size=max(2, num_classes // 3), replace=False)
    n = int(rng.integers(1, 500))
    truth = rng.choice(used, n)
    pred = np.where(rng.random(n) < 0.5, truth, rng.choice(used, n))
    metric = MacroF1(num_classes)
    for chunk in np.array_split(np.arange(n), int(rng.integers(1, 6))):
        metric.update(torch.as_tensor(pred[chunk]), torch.as_tensor(truth[chunk]))
    expected = _sklearn_macro_f1(truth, pred)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)  # float32 result
    metric.reset()
    metric.update(
        torch.nn.functional.one_hot(torch.as_tensor(pred), num_classes).float(),
        torch.as_tensor(truth),
    )  # scores: argmax taken
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_metric_refuses_out_of_range_classes():
    metric = MacroF1(3)
    with pytest.raises(ValueError, match="predicted class 5 is out of range for 3"):
        metric.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        MacroF1(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metric_is_summed_across_ddp_ranks(tmp_path):
    """Two gloo processes, each with half the rows: both compute the macro F1 of all rows."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 30, 400)
    pred = np.where(rng.random(400) < 0.4, truth, rng.integers(0, 40, 400))
    mp.spawn(worker, args=(2, _free_port(), truth, pred, str(tmp_path)), nprocs=2, join=True)
    expected = _sklearn_macro_f1(truth, pred)
    for rank in (0, 1):
        value = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert value == pytest.approx(expected, abs=1e-6)
    local = _sklearn_macro_f1(truth[::2], pred[::2])
    assert abs(local - expected) > 1e-3  # (one rank alone would have logged another value)


def test_classifier_logs_synced_epoch_metrics_and_keeps_its_state_dict():
    torch.manual_seed(0)
    species = list(range(100, 140))  # 40 classes, of which the validation set uses few
    module = EmbeddingClassifier(
        head={"_target_": "vitlab.models.heads.LinearHead", "log_softmax": True},
        loss={"_target_": "torch.nn.NLLLoss"},
        in_features=8,
        species_ids=species,
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
    )
    assert not any("val_" in k for k in module.state_dict())  # old checkpoints still load
    x, y = torch.randn(90, 8), torch.randint(0, 12, (90,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for _ in range(2):  # the second epoch is not polluted by the first one's counts
        (logged,) = trainer.validate(module, loader, verbose=False)
    pred = module.predict_labels(x.numpy())
    assert logged["val/macro_f1"] == pytest.approx(_sklearn_macro_f1(y.numpy(), pred), abs=1e-6)
    assert logged["val/acc"] == pytest.approx(accuracy_score(y.numpy(), pred), abs=1e-6)
