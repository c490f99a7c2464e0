"""JPEG decoding and tile cutting on a CUDA device (nvJPEG through torchvision), for the loader
threads of the embed and tile stages when `embed.decode` puts decoding on the GPU.

Measured on one H200 node (16 cores, benchmarks/gpu_check.py): 10,470 vs 2,318 img/s for 224 px
JPEGs and 6,820 vs 579 img/s for 1024x768 quadrats, nvJPEG batched vs the loader's 16 CPU
threads. nvJPEG's pixels differ from libjpeg-turbo's by a few levels (IDCT and chroma
upsampling), and the GPU's antialiased bicubic resize from PIL's by about as much: like the
device, the decoder is not part of a cache key (README "On a GPU node" states the tolerance).

Every function returns None (or raises nothing) where the GPU path cannot decode a blob, so the
caller falls back to the CPU path, which decodes what it can and names the culprit otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

JPEG_MAGIC = b"\xff\xd8"


def is_jpeg(blob: bytes) -> bool:
    return blob[:2] == JPEG_MAGIC


def decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor] | None:
    """JPEG blobs -> (3, H, W) uint8 tensors on `device`, decoded in one batched nvJPEG call
    on the current stream; None when any blob is not a JPEG nvJPEG decodes (a PNG, CMYK, a
    truncated file)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs or not all(is_jpeg(b) for b in blobs):
        return None
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        return None


def stack_same_size(images: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """(N, H, W, 3) uint8 view of same-size (3, H, W) images (the layout the CPU loader
    yields); None when their sizes differ."""
    if len({tuple(image.shape) for image in images}) != 1:
        return None
    return torch.stack(list(images)).permute(0, 2, 3, 1)


def resize_uint8(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 3, h, w) uint8 -> (..., 3, height, width) uint8, antialiased bicubic (PIL's
    BICUBIC); a batch of crops in one call."""
    if chw.shape[-2:] == (height, width):
        return chw
    batch = chw if chw.ndim == 4 else chw[None]
    pixels = F.interpolate(
        batch.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    out = pixels.round_().clamp_(0, 255).to(torch.uint8)
    return out if chw.ndim == 4 else out[0]


@dataclass(frozen=True)
class _Plan:
    """How one box becomes a tile: `crop` of the box resized to (height, width), placed at
    (top, left) of a size x size canvas filled with the mean colour (pad only)."""

    crop: torch.Tensor
    height: int
    width: int
    top: int = 0
    left: int = 0


def _plan(box: torch.Tensor, size: int, how: str) -> _Plan:
    """`pipelines.plantclef.predict.fit_tile`'s rule for one (3, h, w) box: center_crop
    (largest centred square), resize (squeezed), pad (fitted inside, mean-colour bars)."""
    _, height, width = box.shape
    if how == "center_crop":
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        return _Plan(box[:, top : top + side, left : left + side], size, size)
    if how == "resize":
        return _Plan(box, size, size)
    scale = size / max(width, height)
    inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
    return _Plan(box, inner_h, inner_w, (size - inner_h) // 2, (size - inner_w) // 2)


def fit_tiles(
    boxes: Sequence[torch.Tensor], size: int, how: str, fill: tuple[int, int, int]
) -> list[torch.Tensor]:
    """(3, h, w) uint8 boxes -> (3, size, size) uint8 tiles, as
    `pipelines.plantclef.predict.fit_tile` does on the CPU. Boxes whose crops share a shape (a
    grid's, across quadrats of one size) are resized in one call: a few kernels per group of
    quadrats, not several per tile."""
    plans = [_plan(box, size, how) for box in boxes]
    groups: dict[tuple, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault((tuple(plan.crop.shape), plan.height, plan.width), []).append(i)
    resized: list[torch.Tensor | None] = [None] * len(plans)
    for (_, height, width), members in groups.items():
        batch = resize_uint8(torch.stack([plans[i].crop for i in members]), height, width)
        for i, tile in zip(members, batch):
            resized[i] = tile
    tiles = []
    for plan, tile in zip(plans, resized):
        if (plan.height, plan.width) != (size, size):  # pad: onto a mean-colour canvas
            canvas = torch.tensor(fill, dtype=torch.uint8, device=tile.device).view(3, 1, 1)
            canvas = canvas.expand(3, size, size).clone()
            canvas[:, plan.top : plan.top + plan.height, plan.left : plan.left + plan.width] = tile
            tile = canvas
        tiles.append(tile)
    return tiles


def fit_tile(chw: torch.Tensor, size: int, how: str, fill: tuple[int, int, int]) -> torch.Tensor:
    """One (3, h, w) box -> (3, size, size), as `pipelines.plantclef.predict.fit_tile` does on
    the CPU."""
    return fit_tiles([chw], size, how, fill)[0]


def cut_tiles(
    images: Sequence[torch.Tensor],
    boxes: Sequence[Sequence[tuple[int, int, int, int]]],
    size: int,
    how: str,
    fill: tuple[int, int, int],
) -> list[torch.Tensor]:
    """The (left, top, right, bottom) boxes of each decoded (3, H, W) image, fitted: one
    (n_boxes, size, size, 3) uint8 tensor per image, on the images' device."""
    crops = [img[:, t:b, l:r] for img, own in zip(images, boxes) for l, t, r, b in own]  # noqa: E741
    tiles = fit_tiles(crops, size, how, fill)
    out, start = [], 0
    for own in boxes:
        out.append(torch.stack(tiles[start : start + len(own)]).permute(0, 2, 3, 1))
        start += len(own)
    return out
