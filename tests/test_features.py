import numpy as np
import pytest
import torch
from scipy.fft import dctn

from vitlab.models.features import ClsToken, DctFeatures, MeanPatchTokens, dct2_corner


@pytest.mark.parametrize("shape", [(257, 768), (5, 9), (65, 192)])
def test_dct_corner_matches_scipy(shape):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, *shape)).astype(np.float32)
    ours = dct2_corner(torch.from_numpy(tokens), 4 if min(shape) < 8 else 8).numpy()
    block = ours.shape[-1]
    for b in range(2):
        ref = dctn(tokens[b].astype(np.float64), type=2)[:block, :block]
        np.testing.assert_allclose(ours[b], ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_dct_token_sets():
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.normal(size=(3, 17, 32)).astype(np.float32))
    all_tokens = DctFeatures(block=8, tokens="all")(tokens, num_prefix_tokens=1)
    patches = DctFeatures(block=8, tokens="patches")(tokens, num_prefix_tokens=1)
    assert all_tokens.shape == patches.shape == (3, 64)
    ref_all = dctn(tokens[0].double().numpy(), type=2)[:8, :8].reshape(-1)
    ref_patches = dctn(tokens[0, 1:].double().numpy(), type=2)[:8, :8].reshape(-1)
    np.testing.assert_allclose(all_tokens[0].numpy(), ref_all, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(patches[0].numpy(), ref_patches, rtol=1e-4, atol=1e-3)


def test_dct_rejects_bad_token_set():
    with pytest.raises(ValueError, match="features.tokens"):
        DctFeatures(tokens="cls")


def test_cls_and_mean_patch():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert torch.equal(ClsToken()(tokens, 1), tokens[:, 0])
    assert torch.allclose(MeanPatchTokens()(tokens, 2), tokens[:, 2:].mean(1))
    with pytest.raises(ValueError, match="mean_patch"):
        ClsToken()(tokens, 0)
