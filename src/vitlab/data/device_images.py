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
    """(3, h, w) uint8 -> (3, height, width) uint8, antialiased bicubic (PIL's BICUBIC)."""
    if chw.shape[-2:] == (height, width):
        return chw
    pixels = F.interpolate(
        chw[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return pixels[0].round_().clamp_(0, 255).to(torch.uint8)


def fit_tile(chw: torch.Tensor, size: int, how: str, fill: tuple[int, int, int]) -> torch.Tensor:
    """One box (3, h, w) -> (3, size, size) as `stages.predict.fit_tile` does on the CPU:
    center_crop (largest centred square), resize (squeezed), pad (fitted, mean-colour bars)."""
    _, height, width = chw.shape
    if how == "center_crop":
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        return resize_uint8(chw[:, top : top + side, left : left + side], size, size)
    if how == "resize":
        return resize_uint8(chw, size, size)
    scale = size / max(width, height)
    inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = torch.tensor(fill, dtype=torch.uint8, device=chw.device).view(3, 1, 1)
    canvas = canvas.expand(3, size, size).clone()
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    canvas[:, top : top + inner_h, left : left + inner_w] = resize_uint8(chw, inner_h, inner_w)
    return canvas


def cut_tiles(
    chw: torch.Tensor,
    boxes: Sequence[tuple[int, int, int, int]],
    size: int,
    how: str,
    fill: tuple[int, int, int],
) -> torch.Tensor:
    """The (left, top, right, bottom) boxes of one decoded image, fitted: (n, size, size, 3)
    uint8 on the image's device."""
    tiles = [
        fit_tile(chw[:, top:bottom, left:right], size, how, fill)
        for left, top, right, bottom in boxes
    ]
    return torch.stack(tiles).permute(0, 2, 3, 1)
