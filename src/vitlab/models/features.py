"""Feature reducers: token matrix (B, T, D) -> one vector per image.

`cls` takes token 0; `mean_patch` averages the patch tokens; `dct` keeps the top-left
block x block corner of the unnormalised 2-D DCT-II of the token matrix (scipy's default
`dctn(type=2)`), over either all tokens (CLS + registers + patches, as the PlantCLEF team did on
DINOv2's 257 x 768 matrix) or the patch tokens only (as their paper describes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

TOKEN_SETS = ("all", "patches")


def dct2_basis(n: int, k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """First k rows of the unnormalised DCT-II matrix of size n:
    C[j, i] = 2 cos(pi j (2i + 1) / 2n)."""
    j = torch.arange(k, dtype=dtype).unsqueeze(1)
    i = torch.arange(n, dtype=dtype).unsqueeze(0)
    return 2.0 * torch.cos(math.pi * j * (2 * i + 1) / (2 * n))


def dct2_corner(matrices: torch.Tensor, block: int) -> torch.Tensor:
    """Top-left block x block of the 2-D DCT-II of each (T, D) matrix in a (B, T, D) batch,
    computed as C_T[:block] @ M @ C_D[:block]^T (no full transform needed)."""
    _, t, d = matrices.shape
    if block > min(t, d):
        raise ValueError(f"DCT block {block} larger than the token matrix {t}x{d}")
    work = matrices.to(torch.float64)
    rows = dct2_basis(t, block).to(work.device)
    cols = dct2_basis(d, block).to(work.device)
    return (rows @ work @ cols.T).to(matrices.dtype)


@dataclass(frozen=True)
class ClsToken:
    name: str = "cls"

    def __call__(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        if num_prefix_tokens < 1:
            raise ValueError(
                "features=cls needs a backbone with a CLS token; "
                "use features=mean_patch for this backbone"
            )
        return tokens[:, 0]

    def params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MeanPatchTokens:
    name: str = "mean_patch"

    def __call__(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        return tokens[:, num_prefix_tokens:].mean(dim=1)

    def params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DctFeatures:
    block: int = 8
    tokens: str = "all"
    name: str = "dct"

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_SETS:
            raise ValueError(f"features.tokens={self.tokens!r} is not one of {list(TOKEN_SETS)}")
        if self.block < 1:
            raise ValueError(f"features.block must be >= 1, got {self.block}")

    def __call__(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        if self.tokens == "patches":
            tokens = tokens[:, num_prefix_tokens:]
        return dct2_corner(tokens, self.block).flatten(1)

    def params(self) -> dict[str, Any]:
        return asdict(self)
