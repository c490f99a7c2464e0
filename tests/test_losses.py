import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from vitlab.config import instantiate_node
from vitlab.losses import (
    FocalLoss,
    SeesawLoss,
    SeesawPoisonLoss,
    WeightedCrossEntropy,
    cross_entropy,
    focal_loss,
    inverse_frequency_weights,
    poison_logit,
    seesaw_factors,
    seesaw_loss,
)


def _np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_seesaw_factors(z, y, counts, p, q, eps):
    """The paper's definition, element by element, in float64."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    sigma = np.exp(_np_log_softmax(z.astype(np.float64)))
    mitigation = np.ones(z.shape)
    compensation = np.ones(z.shape)
    for b, i in enumerate(y):
        for j in range(z.shape[1]):
            if j == i:
                continue
            if counts[j] < counts[i]:
                mitigation[b, j] = (counts[j] / counts[i]) ** p
            ratio = sigma[b, j] / max(sigma[b, i], eps)
            if ratio > 1:
                compensation[b, j] = ratio**q
    return mitigation, compensation


def _np_seesaw(z, y, counts, p=0.8, q=2.0, eps=1e-2):
    m, c = _np_seesaw_factors(z, y, counts, p, q, eps)
    modified = z.astype(np.float64) + np.log(m * c)
    return -_np_log_softmax(modified)[np.arange(len(y)), y].mean()


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# --- cross-entropy and class weights ---------------------------------------------------------


def test_cross_entropy_matches_torch():
    z, y = (
        torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 3] * 2),
    )
    smoothed = cross_entropy(z, y, label_smoothing=0.1)
    assert torch.allclose(smoothed, F.cross_entropy(z, y, label_smoothing=0.1))
    assert torch.allclose(cross_entropy(z, y), F.cross_entropy(z, y))


def test_inverse_frequency_weights_normalisation():
    counts = np.array([50, 5, 0, 20, 1])
    w = inverse_frequency_weights(counts).double().numpy()
    assert w[2] == 0
    present = counts > 0
    # proportional to 1/N: every present class carries the same total weight
    np.testing.assert_allclose(w[present] * counts[present], (w * counts)[0])
    # the average per-sample weight is 1
    assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w[present], counts.sum() / (4 * counts[present]), rtol=1e-6)
    raw = inverse_frequency_weights(list(counts), normalise=False).double().numpy()
    np.testing.assert_allclose(raw[present], 1 / counts[present], rtol=1e-6)
    with pytest.raises(ValueError):
        inverse_frequency_weights([0, 0, 0])


def test_weighted_cross_entropy_matches_torch_and_numpy():
    counts = [50, 5, 0, 20, 1]
    rng = np.random.default_rng(1)
    z = rng.normal(size=(12, 5)).astype(np.float32)
    y = rng.choice([0, 1, 3, 4], size=12)
    w = inverse_frequency_weights(counts)
    loss = WeightedCrossEntropy(counts)(_t(z, torch.float32), _t(y, torch.long))
    expected = F.cross_entropy(_t(z, torch.float32), _t(y, torch.long), weight=w)
    assert torch.allclose(loss, expected)
    per_sample = -_np_log_softmax(z.astype(np.float64))[np.arange(12), y]
    wy = w.double().numpy()[y]
    assert loss.item() == pytest.approx((wy * per_sample).sum() / wy.sum(), rel=1e-5)


# --- focal ----------------------------------------------------------------------------------


def test_focal_gamma_zero_is_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    z, y = torch.randn(16, 7, generator=gen), torch.randint(0, 7, (16,), generator=gen)
    assert torch.allclose(focal_loss(z, y, gamma=0.0), F.cross_entropy(z, y), atol=1e-7)
    assert torch.allclose(FocalLoss(gamma=0)(z, y), F.cross_entropy(z, y), atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("alpha", [None, 0.25, [0.5, 1.0, 2.0, 0.1]])
def test_focal_matches_numpy(gamma, alpha):
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(20, 4))
    y = rng.integers(0, 4, 20)
    p_t = np.exp(_np_log_softmax(z))[np.arange(20), y]
    per_sample = -((1 - p_t) ** gamma) * np.log(p_t)
    if alpha is not None:
        per_sample = per_sample * (np.asarray(alpha)[y] if isinstance(alpha, list) else alpha)
    loss = FocalLoss(gamma, alpha).double()(_t(z), _t(y, torch.long))
    # a list alpha is stored as a float32 buffer: 0.1 is rounded before `.double()`
    assert loss.item() == pytest.approx(per_sample.mean(), rel=1e-7)


# --- seesaw ---------------------------------------------------------------------------------


def _logits_with_softmax(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_seesaw_mitigation_by_hand():
    counts = torch.tensor([100, 10, 1])
    z = torch.zeros(3, 3, dtype=torch.float64)  # uniform σ: compensation is 1
    y = torch.tensor([0, 1, 2])
    m, c = seesaw_factors(z, y, counts, p=1.0, q=2.0)
    expected = [[1, 0.1, 0.01], [1, 1, 0.1], [1, 1, 1]]  # only rarer classes are mitigated
    torch.testing.assert_close(m, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(c, torch.ones(3, 3, dtype=torch.float64))
    m, _ = seesaw_factors(z, y, counts, p=0.5)
    torch.testing.assert_close(m[0], torch.tensor([1, 0.1**0.5, 0.01**0.5], dtype=torch.float64))


def test_seesaw_zero_counts_are_treated_as_one():
    counts = torch.tensor([0, 10, 4])
    z = torch.zeros(2, 3, dtype=torch.float64)
    m, _ = seesaw_factors(z, torch.tensor([0, 1]), counts, p=1.0)
    expected = torch.tensor([[1, 1, 1], [0.1, 1, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(m, expected)


def test_seesaw_compensation_by_hand():
    counts = torch.tensor([5, 5, 5])  # equal counts: mitigation is 1
    z = _logits_with_softmax([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.005, 0.9, 0.095]])
    y = torch.tensor([0, 1, 0])
    m, c = seesaw_factors(z, y, counts, q=2.0, eps=1e-2)
    expected = [
        [1, (0.5 / 0.2) ** 2, (0.3 / 0.2) ** 2],
        [1, 1, 1],  # the target has the top score: nothing to compensate
        [1, (0.9 / 0.01) ** 2, (0.095 / 0.01) ** 2],  # σ_i = 0.005 < eps: divided by eps
    ]
    torch.testing.assert_close(c, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(m, torch.ones(3, 3, dtype=torch.float64))


def test_seesaw_loss_on_hand_case_matches_formula():
    counts = [100, 10, 1]
    probs = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]
    z, y = _logits_with_softmax(probs), torch.tensor([0, 1])
    # sample 0: M = [1, .1, .01]^0.8, C = [1, 2.5^2, 1.5^2]; sample 1: M = [1, 1, .1^0.8],
    # C = [6^2, 1, 3^2]; the target logit is untouched.
    z0 = np.log(probs[0]) + np.log([1, 0.1**0.8 * 6.25, 0.01**0.8 * 2.25])
    z1 = np.log(probs[1]) + np.log([36, 1, 0.1**0.8 * 9])
    expected = -(_np_log_softmax(z0)[0] + _np_log_softmax(z1)[1]) / 2
    assert seesaw_loss(z, y, torch.tensor(counts)).item() == pytest.approx(expected, rel=1e-12)


def test_seesaw_equals_cross_entropy_when_both_factors_are_one():
    # the target is the rarest class (no mitigation) and has the top score (no compensation)
    z = _logits_with_softmax([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    y = torch.tensor([2, 0])
    counts = torch.tensor([3, 8, 3])
    m, c = seesaw_factors(z, y, counts)
    assert torch.equal(m * c, torch.ones_like(z))
    torch.testing.assert_close(seesaw_loss(z, y, counts), F.cross_entropy(z, y))


@pytest.mark.parametrize("seed", range(5))
def test_seesaw_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(32, 6))
    y = rng.integers(0, 6, 32)
    counts = rng.integers(0, 200, 6)
    for p, q, eps in [(0.8, 2.0, 1e-2), (0.0, 2.0, 1e-2), (1.5, 0.0, 1e-3)]:
        loss = seesaw_loss(_t(z), _t(y, torch.long), _t(counts, torch.long), p, q, eps)
        assert loss.item() == pytest.approx(_np_seesaw(z, y, counts, p, q, eps), rel=1e-10)
        m, c = seesaw_factors(_t(z), _t(y, torch.long), _t(counts, torch.long), p, q, eps)
        np_m, np_c = _np_seesaw_factors(z, y, counts, p, q, eps)
        np.testing.assert_allclose(m.numpy(), np_m, rtol=1e-10)
        np.testing.assert_allclose(c.numpy(), np_c, rtol=1e-10)


def test_seesaw_gradient_does_not_flow_through_sigma():
    rng = np.random.default_rng(7)
    z_np, y_np, counts = rng.normal(scale=3.0, size=(8, 5)), rng.integers(0, 5, 8), [40, 3, 9, 1, 7]
    y = _t(y_np, torch.long)
    z = _t(z_np).requires_grad_()
    seesaw_loss(z, y, torch.tensor(counts)).backward()
    # factors are constants: d/dz CE(z + log(MC)) = (softmax(z + log(MC)) - onehot) / B
    m, c = _np_seesaw_factors(z_np, y_np, counts, 0.8, 2.0, 1e-2)
    assert (c > 1).any()  # compensation is active, so detaching matters
    manual = np.exp(_np_log_softmax(z_np + np.log(m * c)))
    manual[np.arange(8), y_np] -= 1
    np.testing.assert_allclose(z.grad.numpy(), manual / 8, rtol=1e-10, atol=1e-14)

    # the same loss with σ left attached has a different gradient
    z_attached = _t(z_np).requires_grad_()
    sigma = torch.softmax(z_attached, -1)
    sigma_i = sigma.gather(1, y[:, None]).clamp(min=1e-2)
    own = F.one_hot(y, 5).bool()
    ratio = (sigma / sigma_i).masked_fill(own, 1.0)
    comp = torch.where(ratio > 1, ratio**2, torch.ones_like(ratio))
    F.cross_entropy(z_attached + _t(np.log(m)) + comp.log(), y).backward()
    assert not torch.allclose(z_attached.grad, z.grad, atol=1e-4)


def test_seesaw_accumulates_counts_over_training_batches():
    loss_fn = SeesawLoss(num_classes=5)
    assert loss_fn.accumulate and torch.equal(
        loss_fn.class_counts, torch.zeros(5, dtype=torch.long)
    )
    gen = torch.Generator().manual_seed(0)
    y1, y2 = torch.tensor([0, 0, 1, 3]), torch.tensor([3, 3, 4, 0, 2, 3])
    z1, z2 = torch.randn(4, 5, generator=gen), torch.randn(6, 5, generator=gen)
    first = loss_fn(z1, y1)
    # counts are updated before the loss: the first batch is scored with its own histogram
    torch.testing.assert_close(first, seesaw_loss(z1, y1, torch.tensor([2, 1, 0, 1, 0])))
    loss_fn(z2, y2)
    assert loss_fn.class_counts.tolist() == [3, 1, 1, 4, 1]  # the label histogram
    assert "class_counts" in loss_fn.state_dict()

    loss_fn.eval()  # validation batches do not leak into the prior
    loss_fn(z2, y2)
    assert loss_fn.class_counts.tolist() == [3, 1, 1, 4, 1]


def test_seesaw_fixed_counts_are_not_updated():
    counts = [10, 20, 30, 40]
    loss_fn = SeesawLoss(num_classes=4, class_counts=counts)
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 3])
    loss = loss_fn(z, y)
    assert not loss_fn.accumulate and loss_fn.class_counts.tolist() == counts
    torch.testing.assert_close(loss, seesaw_loss(z, y, torch.tensor(counts)))


def test_seesaw_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SeesawLoss(num_classes=3, class_counts=[1, 2])
    with pytest.raises(ValueError):
        SeesawLoss(num_classes=3, eps=0.0)
    with pytest.raises(ValueError, match="num_classes=3"):
        SeesawLoss(num_classes=3)(torch.randn(2, 3), torch.tensor([0, 3]))


# --- seesaw + poison ------------------------------------------------------------------------


def _np_poison_bce(z, y, poisonous):
    probs = np.exp(_np_log_softmax(z))
    p_poison = probs[:, poisonous].sum(axis=1)
    is_poisonous = np.isin(y, poisonous)
    return -np.where(is_poisonous, np.log(p_poison), np.log(1 - p_poison)).mean(), p_poison


def test_poison_logit_is_log_odds_of_poisonous_probability():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(10, 6))
    mask = torch.tensor([False, True, False, False, True, False])
    _, p_poison = _np_poison_bce(z, np.zeros(10, dtype=int), [1, 4])
    expected = np.log(p_poison / (1 - p_poison))
    np.testing.assert_allclose(poison_logit(_t(z), mask).numpy(), expected, rtol=1e-10)


def test_seesaw_poison_loss_terms():
    rng = np.random.default_rng(5)
    z, y = rng.normal(scale=2.0, size=(16, 6)), rng.integers(0, 6, 16)
    counts, poisonous = [30, 2, 9, 14, 5, 1], [1, 4]
    zt, yt = _t(z), _t(y, torch.long)
    seesaw = seesaw_loss(zt, yt, torch.tensor(counts))
    no_poison = SeesawPoisonLoss(6, poisonous, alpha=0.0, class_counts=counts)
    torch.testing.assert_close(no_poison(zt, yt), seesaw)

    composite = SeesawPoisonLoss(6, poisonous, alpha=0.3, class_counts=counts)(zt, yt)
    bce, _ = _np_poison_bce(z, y, poisonous)
    assert (composite - seesaw).item() == pytest.approx(0.3 * bce, rel=1e-10)


def test_seesaw_poison_loss_accumulates_like_seesaw():
    gen = torch.Generator().manual_seed(1)
    z, y = torch.randn(8, 4, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    composite, plain = SeesawPoisonLoss(4, [2], alpha=0.0), SeesawLoss(4)
    torch.testing.assert_close(composite(z, y), plain(z, y))
    assert torch.equal(composite.class_counts, torch.bincount(y, minlength=4))


@pytest.mark.parametrize("poisonous", [[], [0, 1, 2], [3], [-1]])
def test_seesaw_poison_loss_rejects_degenerate_class_sets(poisonous):
    with pytest.raises(ValueError):
        SeesawPoisonLoss(3, poisonous)


def test_losses_instantiate_from_yaml_lists():
    node = OmegaConf.create(
        {
            "_target_": "vitlab.losses.SeesawPoisonLoss",
            "num_classes": 4,
            "poisonous_classes": [1, 3],
            "alpha": 0.1,
            "class_counts": [5, 1, 7, 2],
        }
    )
    loss_fn = instantiate_node(node, "loss")
    assert loss_fn.poisonous.tolist() == [False, True, False, True]
    assert loss_fn.class_counts.tolist() == [5, 1, 7, 2]
    weighted = instantiate_node(
        OmegaConf.create(
            {"_target_": "vitlab.losses.WeightedCrossEntropy", "class_counts": [4, 1]}
        ),
        "loss",
    )
    torch.testing.assert_close(weighted.weight, inverse_frequency_weights([4, 1]))
    focal = instantiate_node(
        OmegaConf.create({"_target_": "vitlab.losses.FocalLoss", "alpha": [1.0, 2.0]}), "loss"
    )
    assert focal.alpha.tolist() == [1.0, 2.0]


# --- the factory ----------------------------------------------------------------------------


def test_build_loss_takes_counts_from_their_source():
    from vitlab.errors import ConfigError
    from vitlab.losses import LabelStats, build_loss

    stats = LabelStats(4, class_counts=[5, 1, 7, 2], poisonous_classes=[1, 3])
    seesaw = {"_target_": "vitlab.losses.SeesawLoss", "p": 0.8}
    fixed = build_loss({**seesaw, "counts_from": "train"}, stats)
    assert not fixed.accumulate and fixed.class_counts.tolist() == [5, 1, 7, 2]
    assert build_loss({**seesaw, "counts_from": "batches"}, stats).accumulate
    assert build_loss(seesaw, stats).accumulate  # seesaw's default source: the batches
    poison = build_loss(
        {"_target_": "vitlab.losses.SeesawPoisonLoss", "counts_from": "train"}, stats
    )
    assert poison.poisonous.tolist() == [False, True, False, True]
    weighted = build_loss({"_target_": "vitlab.losses.WeightedCrossEntropy"}, stats)
    torch.testing.assert_close(weighted.weight, inverse_frequency_weights([5, 1, 7, 2]))
    assert isinstance(build_loss({"_target_": "torch.nn.NLLLoss"}, stats), torch.nn.NLLLoss)
    with pytest.warns(FutureWarning, match="counts_from=batches"):  # the old key still reads
        assert build_loss({**seesaw, "class_counts": "accumulate"}, stats).accumulate
    for cfg, key in [
        ({**seesaw, "counts_from": "epochs"}, "loss.counts_from"),
        ({**seesaw, "class_counts": [1, 2, 3, 4]}, "loss.class_counts"),
        (
            {"_target_": "vitlab.losses.WeightedCrossEntropy", "counts_from": "batches"},
            "counts_from",
        ),
        ({"_target_": "vitlab.losses.FocalLoss", "counts_from": "train"}, "takes no class counts"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build_loss(cfg, stats)
    with pytest.raises(ConfigError, match="poison list"):
        build_loss({"_target_": "vitlab.losses.SeesawPoisonLoss"}, LabelStats(4, [1, 1, 1, 1]))
    with pytest.raises(ConfigError, match="class counts"):
        build_loss({**seesaw, "counts_from": "train"}, LabelStats(4))


def test_nll_needs_log_probabilities():
    from vitlab.errors import ConfigError
    from vitlab.losses import check_loss_input

    logits = torch.randn(3, 5)
    check_loss_input({"_target_": "torch.nn.NLLLoss"}, torch.log_softmax(logits, -1))
    check_loss_input({"_target_": "vitlab.losses.SeesawLoss"}, logits)
    with pytest.raises(ConfigError, match="loss=nll expects log-probabilities"):
        check_loss_input({"_target_": "torch.nn.NLLLoss"}, logits)
