"""Multi-label losses against values computed by hand from the papers' formulas and against
independent implementations (torch's BCE, torchvision's sigmoid focal loss)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from vitlab.config import instantiate_node
from vitlab.losses import AsymmetricLoss, BCEWithLogits, FocalBCE, LabelStats, build_loss
from vitlab.losses.multilabel import asymmetric_loss, is_multilabel, multi_hot


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_asl_matches_the_paper_formula_computed_by_hand():
    # one row, two classes: a positive at logit 0, a negative at logit 2
    gamma_pos, gamma_neg, m = 1.0, 2.0, 0.1
    p0, p1 = _sigmoid(0.0), _sigmoid(2.0)
    positive = (1 - p0) ** gamma_pos * math.log(p0)  # L+ = (1-p)^γ+ log p
    p_m = max(p1 - m, 0.0)
    negative = p_m**gamma_neg * math.log(1 - p_m)  # L- = p_m^γ- log(1 - p_m)
    by_hand = -(positive + negative)
    assert by_hand == pytest.approx(0.3465736 + 0.9252918, abs=1e-6)  # the numbers, written out
    loss = AsymmetricLoss(gamma_pos, gamma_neg, m)(torch.tensor([[0.0, 2.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_asl_margin_discards_easy_negatives_and_rows_average():
    # a negative with p = sigmoid(-3) = 0.047 < m = 0.05 contributes nothing
    logits = torch.tensor([[4.0, -3.0], [-1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rows = []
    for z, y in zip(logits.tolist(), target.tolist()):
        total = 0.0
        for zi, yi in zip(z, y):
            p = _sigmoid(zi)
            if yi:
                total -= (1 - p) ** 0.5 * math.log(p)
            else:
                p_m = max(p - 0.05, 0.0)
                total -= p_m**3 * math.log(1 - p_m)
        rows.append(total)
    expected = sum(rows) / 2
    got = asymmetric_loss(logits, target, gamma_pos=0.5, gamma_neg=3.0, margin=0.05)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_asl_without_focusing_or_margin_is_bce_and_bce_matches_torch():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5), (torch.rand(6, 5) > 0.6).float()
    reference = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 6
    assert BCEWithLogits()(logits, target).item() == pytest.approx(reference.item(), rel=1e-5)
    asl = asymmetric_loss(logits, target, gamma_pos=0.0, gamma_neg=0.0, margin=0.0)
    assert asl.item() == pytest.approx(reference.item(), rel=1e-4)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_bce_matches_torchvision(alpha):
    torch.manual_seed(1)
    logits, target = torch.randn(8, 4) * 3, (torch.rand(8, 4) > 0.5).float()
    reference = sigmoid_focal_loss(
        logits, target, alpha=-1 if alpha is None else alpha, gamma=2.0, reduction="sum"
    )
    got = FocalBCE(gamma=2.0, alpha=alpha)(logits, target)
    assert got.item() == pytest.approx(reference.item() / 8, rel=1e-5)


def test_class_indices_are_one_hot_rows():
    logits = torch.randn(3, 4)
    indices = torch.tensor([2, 0, 3])
    assert torch.equal(multi_hot(indices, 4), F.one_hot(indices, 4).float())
    for loss in (BCEWithLogits(), AsymmetricLoss(), FocalBCE()):
        assert loss(logits, indices).item() == pytest.approx(
            loss(logits, F.one_hot(indices, 4).float()).item()
        )
    with pytest.raises(ValueError, match="5 columns for 4"):
        multi_hot(torch.zeros(2, 5), 4)


@pytest.mark.parametrize("name", ["bce", "asl", "focal_bce"])
def test_the_loss_configs_build_multilabel_losses(name):
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    cfg = OmegaConf.load(REPO / "configs" / "loss" / f"{name}.yaml")
    loss = build_loss(cfg, LabelStats.dummy())
    assert is_multilabel(loss)
    assert torch.isfinite(loss(torch.randn(2, 4), torch.tensor([1, 3])))


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"_target_": "vitlab.losses.AsymmetricLoss", "gamma_neg": -1.0}, "gamma"),
        ({"_target_": "vitlab.losses.AsymmetricLoss", "margin": 1.0}, "margin"),
        ({"_target_": "vitlab.losses.FocalBCE", "alpha": 2.0}, "alpha"),
    ],
)
def test_bad_loss_settings_are_refused(cfg, match):
    with pytest.raises(Exception, match=match):
        instantiate_node(cfg, "loss")
