import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlab.losses.contrastive import (
    TextMemoryBank,
    clip_contrastive_loss,
    gather_for_contrast,
    gather_objects,
    multi_label_contrastive_loss,
    multi_label_positives,
    non_noisy_multi_label_loss,
    non_noisy_positives,
    soft_cross_entropy,
    soft_target_multi_label_loss,
)
from vitlab.losses.entropy import entropy, group_entropy, label_entropy, segment_entropy


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=-1)


def _np_log_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _np_softmax(z, axis=-1):
    return np.exp(_np_log_softmax(z, axis))


def _np_entropy(p, axis=-1):
    p = np.asarray(p, dtype=np.float64)
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=axis)


def _np_soft_ce(z, t):
    return float(-(t * _np_log_softmax(z)).sum(-1).mean())


def _np_multi_label(img, lab, scale, mask, extra=None):
    """GroupViT multi-label loss written out row by row, masked labels dropped."""
    cols, owner = [], []
    for i in range(lab.shape[0]):
        for k in range(lab.shape[1]):
            if mask[i, k]:
                cols.append(lab[i, k])
                owner.append(i)
    cols, owner = np.array(cols), np.array(owner)
    texts = cols if extra is None else np.concatenate([cols, extra])
    img_losses = []
    for i in range(img.shape[0]):
        own = owner == i
        if not own.any():
            continue
        t = np.zeros(len(texts))
        t[: len(cols)][own] = 1.0 / own.sum()
        img_losses.append(-(t * _np_log_softmax(scale * texts @ img[i])).sum())
    txt_losses = [-_np_log_softmax(scale * img @ cols[j])[owner[j]] for j in range(len(cols))]
    return 0.5 * (np.mean(img_losses) + np.mean(txt_losses))


# --- entropy -------------------------------------------------------------------------------------


def test_entropy_uniform_and_one_hot():
    for n in (1, 2, 5, 8):
        assert entropy(torch.full((n,), 1.0 / n)).item() == pytest.approx(math.log(n))
    assert entropy(torch.tensor([0.0, 1.0, 0.0])).item() == 0.0
    p = torch.tensor([[0.5, 0.25], [0.5, 0.75]])
    np.testing.assert_allclose(entropy(p, dim=0).numpy(), _np_entropy(p.numpy(), axis=0))


def test_group_entropy_uniform_hard_and_random():
    assert group_entropy(torch.full((2, 7, 8), 1 / 8)).item() == pytest.approx(math.log(8))
    hard = F.one_hot(torch.randint(0, 8, (2, 7), generator=_gen(1)), 8).double()
    assert group_entropy(hard).item() == 0.0
    attn = torch.rand(3, 5, 4, generator=_gen(2), dtype=torch.float64).softmax(-1)
    assert group_entropy(attn).item() == pytest.approx(_np_entropy(attn.numpy()).mean())


def _np_label_entropy(attn, logits, mask):
    per_image = []
    for b in range(attn.shape[0]):
        if not mask[b].any():
            continue
        probs = _np_softmax(logits[b][:, mask[b]])  # the reduced tensor: valid labels only
        per_image.append(_np_entropy(attn[b] @ probs).mean())
    return np.mean(per_image)


def test_label_entropy_hand_built():
    # one patch fully on group 0, one split evenly; group 0 is sure of label 0, group 1 uniform
    attn = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]], dtype=torch.float64)
    logits = torch.tensor([[[100.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    # patch 1: T = [1, 0] -> 0; patch 2: T = 0.5·[1, 0] + 0.5·[.5, .5] = [.75, .25]
    expected = 0.5 * (0.0 + _np_entropy([0.75, 0.25]))
    assert label_entropy(attn, logits).item() == pytest.approx(expected, abs=1e-12)


def test_label_entropy_random_and_masked_equals_reduced():
    attn = torch.rand(3, 6, 4, generator=_gen(3), dtype=torch.float64).softmax(-1)
    logits = torch.randn(3, 4, 5, generator=_gen(4), dtype=torch.float64)
    full = np.ones((3, 5), dtype=bool)
    assert label_entropy(attn, logits).item() == pytest.approx(
        _np_label_entropy(attn.numpy(), logits.numpy(), full)
    )
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=bool)
    got = label_entropy(attn, logits, torch.from_numpy(mask)).item()
    assert got == pytest.approx(_np_label_entropy(attn.numpy(), logits.numpy(), mask))
    # the masked label logits do not matter at all
    poisoned = logits.clone()
    poisoned[torch.from_numpy(~mask)[:, None, :].expand_as(logits)] = 1e4
    assert label_entropy(attn, poisoned, torch.from_numpy(mask)).item() == pytest.approx(got)
    # single image: equal to the unmasked computation on the reduced tensor
    keep = torch.from_numpy(mask[0])
    reduced = label_entropy(attn[:1], logits[:1, :, keep])
    assert label_entropy(attn[:1], logits[:1], torch.from_numpy(mask[:1])).item() == (
        pytest.approx(reduced.item())
    )


def _np_segment_entropy(logits, mask, wg=0.2, wl=0.1):
    groups, labels = [], []
    for b in range(logits.shape[0]):
        if not mask[b].any():
            continue
        z = logits[b][:, mask[b]]
        groups.append(_np_entropy(_np_softmax(z, axis=1), axis=1).mean())
        labels.append(_np_entropy(_np_softmax(z, axis=0), axis=0).mean())
    return wg * np.mean(groups) + wl * np.mean(labels)


def test_segment_entropy_hand_built():
    # G = 2, K = 2: row 0 uniform over labels, row 1 certain of label 1 (logit 100)
    logits = torch.tensor([[[0.0, 0.0], [0.0, 100.0]]], dtype=torch.float64)
    mean_groups = 0.5 * (math.log(2) + 0.0)
    # label 0 is uniform over groups; label 1 sits entirely on group 1
    mean_labels = 0.5 * (math.log(2) + 0.0)
    expected = 0.2 * mean_groups + 0.1 * mean_labels
    assert segment_entropy(logits).item() == pytest.approx(expected, abs=1e-12)
    assert segment_entropy(logits, group_weight=1.0, label_weight=0.0).item() == pytest.approx(
        mean_groups, abs=1e-12
    )


def test_segment_entropy_random_and_masked_equals_reduced():
    logits = torch.randn(3, 4, 5, generator=_gen(5), dtype=torch.float64) * 2
    full = np.ones((3, 5), dtype=bool)
    assert segment_entropy(logits).item() == pytest.approx(
        _np_segment_entropy(logits.numpy(), full)
    )
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=bool)
    got = segment_entropy(logits, torch.from_numpy(mask), 0.3, 0.7).item()
    assert got == pytest.approx(_np_segment_entropy(logits.numpy(), mask, 0.3, 0.7))
    keep = torch.from_numpy(mask[2])
    assert segment_entropy(logits[2:], torch.from_numpy(mask[2:])).item() == pytest.approx(
        segment_entropy(logits[2:, :, keep]).item()
    )


def test_entropy_gradients_finite_with_zeros_and_masks():
    attn = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]], requires_grad=True)
    group_entropy(attn).backward()
    assert torch.isfinite(attn.grad).all()

    logits = torch.randn(2, 3, 4, generator=_gen(6), requires_grad=True)
    attn = torch.rand(2, 5, 3, generator=_gen(7)).softmax(-1).requires_grad_()
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    loss = label_entropy(attn, logits, mask) + segment_entropy(logits, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.isfinite(attn.grad).all()
    assert (logits.grad[:, :, ~mask[0]] == 0).all() and (logits.grad[1] == 0).all()

    # no valid label anywhere: a graph-attached zero
    none = torch.zeros(2, 4, dtype=torch.bool)
    zero = label_entropy(attn, logits, none) + segment_entropy(logits, none)
    assert zero.item() == 0.0 and zero.requires_grad


# --- soft CE and CLIP ----------------------------------------------------------------------------


def test_soft_cross_entropy_matches_torch_and_ignores_neg_inf():
    z = torch.randn(4, 6, generator=_gen(8), dtype=torch.float64)
    t = torch.rand(4, 6, generator=_gen(9), dtype=torch.float64)
    t = t / t.sum(-1, keepdim=True)
    assert soft_cross_entropy(z, t).item() == pytest.approx(F.cross_entropy(z, t).item())
    z_inf = z.clone().requires_grad_()
    t0 = t.clone()
    t0[:, 0] = 0
    z_masked = z_inf.masked_fill(torch.arange(6) == 0, -torch.inf)
    loss = soft_cross_entropy(z_masked, t0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_inf.grad).all()
    assert loss.item() == pytest.approx(soft_cross_entropy(z[:, 1:], t0[:, 1:]).item())


def test_clip_loss_matches_independent_computation():
    img, txt = _unit(5, 8, seed=10), _unit(5, 8, seed=11)
    scale = torch.tensor(14.0, dtype=torch.float64)
    logits = (scale * img @ txt.T).numpy()
    diag = np.arange(5)
    expected = 0.5 * (
        -_np_log_softmax(logits)[diag, diag].mean() - _np_log_softmax(logits.T)[diag, diag].mean()
    )
    assert clip_contrastive_loss(img, txt, scale).item() == pytest.approx(expected)
    # asymmetric inputs: swapping image and text keeps the symmetric loss
    assert clip_contrastive_loss(txt, img, 14.0).item() == pytest.approx(expected)
    aligned = torch.eye(5, 8, dtype=torch.float64)
    assert clip_contrastive_loss(aligned, aligned, 1000.0).item() == pytest.approx(0.0, abs=1e-9)
    assert clip_contrastive_loss(aligned, aligned.roll(1, 0), 1000.0).item() > 100


def test_multi_label_with_one_label_is_clip():
    img, txt = _unit(6, 8, seed=12), _unit(6, 8, seed=13)
    clip = clip_contrastive_loss(img, txt, 10.0)
    multi = multi_label_contrastive_loss(img, txt[:, None, :], 10.0)
    assert multi.item() == pytest.approx(clip.item())


def test_multi_label_matches_row_by_row_reference_with_mask():
    img, lab = _unit(4, 8, seed=14), _unit(4, 3, 8, seed=15)
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=bool)
    scale = 7.0
    expected = _np_multi_label(img.numpy(), lab.numpy(), scale, np.ones((4, 3), dtype=bool))
    assert multi_label_contrastive_loss(img, lab, scale).item() == pytest.approx(expected)
    expected = _np_multi_label(img.numpy(), lab.numpy(), scale, mask)
    got = multi_label_contrastive_loss(img, lab, scale, torch.from_numpy(mask))
    assert got.item() == pytest.approx(expected)
    # masked label embeddings have no influence at all
    garbage = lab.clone()
    garbage[torch.from_numpy(~mask)] = 123.0
    again = multi_label_contrastive_loss(img, garbage, scale, torch.from_numpy(mask))
    assert again.item() == pytest.approx(got.item())


def test_multi_label_positives_give_soft_targets_summing_to_one():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    pos = multi_label_positives(mask)
    assert pos.shape == (3, 5)
    expected = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(pos, expected)
    rows = pos[pos.any(1)].double()
    img_targets = rows / rows.sum(-1, keepdim=True)
    txt_targets = pos.T.double() / pos.T.double().sum(-1, keepdim=True)
    assert torch.allclose(img_targets.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(txt_targets.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(img_targets[0], torch.tensor([0.5, 0.5, 0, 0, 0], dtype=torch.float64))


def test_non_noisy_positives_match_strings():
    labels = [["dog", "grass", "<pad>"], ["cat", "dog", "sofa"], ["grass", "sky", "<pad>"]]
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    pos = non_noisy_positives(labels, mask)
    # columns: dog grass | cat dog sofa | grass sky
    expected = torch.tensor(
        [
            [1, 1, 0, 1, 0, 1, 0],
            [1, 0, 1, 1, 1, 0, 0],
            [0, 1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(pos, expected)
    # a masked string never makes anything positive, even if it repeats
    assert not non_noisy_positives([["<pad>"], ["<pad>"]], torch.tensor([[False], [False]])).any()
    # no repeated strings across images: exactly GroupViT's positives
    plain = [["a", "b"], ["c", "d"]]
    assert torch.equal(
        non_noisy_positives(plain), multi_label_positives(torch.ones(2, 2, dtype=torch.bool))
    )


def test_non_noisy_loss_differs_exactly_when_strings_repeat():
    img, lab = _unit(3, 3, 8, seed=16)[:, 0], _unit(3, 3, 8, seed=17)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    distinct = [["a", "b", "x"], ["c", "d", "e"], ["f", "g", "x"]]  # "x" only under the mask
    plain = multi_label_contrastive_loss(img, lab, 9.0, mask)
    same = non_noisy_multi_label_loss(img, lab, 9.0, distinct, mask)
    assert same.item() == pytest.approx(plain.item())
    repeated = [["dog", "grass", "x"], ["cat", "dog", "sofa"], ["grass", "sky", "x"]]
    non_noisy = non_noisy_multi_label_loss(img, lab, 9.0, repeated, mask)
    assert abs(non_noisy.item() - plain.item()) > 1e-3
    # and it equals the core loss with the string-derived positives (checked by hand above)
    flat = lab.reshape(9, 8)[mask.reshape(-1)]
    core = soft_target_multi_label_loss(img, flat, non_noisy_positives(repeated, mask), 9.0)
    assert non_noisy.item() == pytest.approx(core.item())


def test_non_noisy_loss_matches_manual_soft_targets():
    img, lab = _unit(2, 8, seed=18), _unit(2, 2, 8, seed=19)
    labels = [["dog", "cat"], ["dog", "car"]]
    scale = 5.0
    im, lb = img.numpy(), lab.reshape(4, 8).numpy()
    t_img = np.array([[1, 1, 1, 0], [1, 0, 1, 1]]) / 3.0
    t_txt = np.array([[0.5, 0.5], [1, 0], [0.5, 0.5], [0, 1]])
    expected = 0.5 * (_np_soft_ce(scale * im @ lb.T, t_img) + _np_soft_ce(scale * lb @ im.T, t_txt))
    got = non_noisy_multi_label_loss(img, lab, scale, labels)
    assert got.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        non_noisy_multi_label_loss(img, lab, scale, [["dog", "cat"]])


def test_extra_negatives_are_zero_target_columns_and_raise_the_loss():
    img, lab = _unit(4, 2, 8, seed=20)[:, 0], _unit(4, 2, 8, seed=21)
    extra = _unit(6, 8, seed=22)
    base = multi_label_contrastive_loss(img, lab, 10.0)
    with_extra = multi_label_contrastive_loss(img, lab, 10.0, extra_text_negatives=extra)
    mask = np.ones((4, 2), dtype=bool)
    expected = _np_multi_label(img.numpy(), lab.numpy(), 10.0, mask, extra.numpy())
    assert with_extra.item() == pytest.approx(expected)
    assert with_extra.item() > base.item()
    empty = multi_label_contrastive_loss(img, lab, 10.0, extra_text_negatives=extra[:0])
    assert empty.item() == pytest.approx(base.item())


def test_contrastive_gradients_flow_without_nan():
    img = _unit(4, 8, seed=23).requires_grad_()
    lab = _unit(4, 3, 8, seed=24).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    labels = [["a", "b", "p"], ["p", "p", "p"], ["a", "p", "p"], ["c", "b", "a"]]
    bank = TextMemoryBank(5, 8)
    bank.enqueue(_unit(3, 8, seed=25), ["z", "a", "y"])
    loss = (
        clip_contrastive_loss(img, _unit(4, 8, seed=27), scale)
        + multi_label_contrastive_loss(img, lab, scale, mask)
        + non_noisy_multi_label_loss(
            img, lab, scale, labels, mask, bank.negatives(exclude={"a", "b", "c"})
        )
    )
    loss.backward()
    for g in (img.grad, lab.grad, scale.grad):
        assert g is not None and torch.isfinite(g).all()
    assert (lab.grad[~mask] == 0).all()
    # all labels padded: a graph-attached 0, not NaN
    zero = multi_label_contrastive_loss(img, lab, scale, torch.zeros(4, 3, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


# --- memory bank ---------------------------------------------------------------------------------


def test_memory_bank_fifo_wraparound_and_exclusion():
    bank = TextMemoryBank(size=4, dim=2)
    assert bank.negatives().shape == (0, 2) and len(bank) == 0
    rows = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    bank.enqueue(rows[:3], ["a", "b", "c"])
    assert torch.equal(bank.negatives(), rows[:3])
    bank.enqueue(rows[3:6], ["d", "e", "f"])  # overwrites the two oldest
    assert len(bank) == 4
    assert torch.equal(bank.negatives(), rows[2:6])
    assert bank.labels() == ["c", "d", "e", "f"]
    assert torch.equal(bank.negatives(exclude={"d", "f", "zzz"}), rows[[2, 4]])
    bank.enqueue(torch.zeros(0, 2))
    assert len(bank) == 4
    # more rows than the bank holds: only the newest survive; unnamed rows are never excluded
    big = torch.randn(7, 2, generator=_gen(26))
    bank.enqueue(big)
    assert torch.equal(bank.negatives(exclude={"c"}), big[-4:])
    grad_input = torch.randn(2, 2, requires_grad=True)
    bank.enqueue(grad_input * 2, ["x", "y"])
    assert not bank.negatives().requires_grad
    bank.reset()
    assert len(bank) == 0 and bank.labels() == []
    with pytest.raises(ValueError):
        bank.enqueue(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        bank.enqueue(torch.zeros(2, 2), ["only one"])


def test_memory_bank_state_dict_round_trip():
    bank = TextMemoryBank(size=3, dim=2)
    bank.enqueue(torch.ones(5, 2) * torch.arange(5.0)[:, None], list("abcde"))
    state = bank.state_dict()
    assert {"queue", "ptr", "filled"} <= set(state)
    restored = TextMemoryBank(size=3, dim=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.negatives(), bank.negatives())
    # strings are not checkpointed: restored entries are unknown, hence never excluded
    assert restored.labels() == [None, None, None]
    assert restored.negatives(exclude={"c", "d", "e"}).shape == (3, 2)
    model = torch.nn.Module()
    model.bank = bank
    assert "bank.queue" in model.state_dict()


# --- distributed helpers -------------------------------------------------------------------------


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_for_contrast(x) is x
    assert gather_objects(("a", "b")) == ["a", "b"]


def _ddp_worker(rank, world, init_file, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        x_img = torch.randn(4, 6, dtype=torch.float64)
        x_lab = torch.randn(4, 2, 6, dtype=torch.float64)
        labels = [["dog", "cat"], ["car", "dog"], ["sky", "sea"], ["cat", "sea"]]
        rows = slice(2 * rank, 2 * rank + 2)  # each rank holds half of the global batch

        def loss_of(img_in, lab_in, names, gather):
            img = F.normalize(img_in @ weight, dim=-1)
            lab = F.normalize(lab_in @ weight, dim=-1)
            if gather:
                img = gather_for_contrast(img)
                lab = gather_for_contrast(lab)
                names = gather_objects(names)
            return clip_contrastive_loss(img, lab[:, 0], 5.0) + non_noisy_multi_label_loss(
                img, lab, 5.0, names
            )

        loss = loss_of(x_img[rows], x_lab[rows], labels[rows], gather=True)
        loss.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)
        grad /= world  # what DDP's gradient averaging does
        weight.grad = None
        full = loss_of(x_img, x_lab, labels, gather=False)
        full.backward()
        torch.testing.assert_close(loss, full)
        torch.testing.assert_close(grad, weight.grad)
        open(os.path.join(result_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_gathered_loss_and_gradient_equal_the_global_batch(tmp_path):
    """Two gloo ranks: the gathered loss is the global-batch loss on every rank, and the
    DDP-averaged gradient equals the single-process gradient of the global loss."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
