"""Image operations: decode, centre square crop, resize, encode, grid tiles.

Pure functions on PIL images / numpy arrays; file IO is limited to `open_image`.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Errors PIL raises for files that are not (whole) images.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


class CorruptImageError(ValueError):
    """An image file or blob that cannot be decoded; carries the culprit's name."""


def decode_image(data: bytes | str | Path, name: str | None = None) -> Image.Image:
    """Decode JPEG/PNG bytes or a file path to an RGB PIL image (fully loaded).

    Raises CorruptImageError naming the image when it cannot be decoded, including truncated
    files (PIL only notices truncation when the pixels are loaded).
    """
    label = name or (str(data) if isinstance(data, str | Path) else "<bytes>")
    try:
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except IMAGE_ERRORS as err:
        raise CorruptImageError(f"cannot decode image {label}: {err}") from err


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square (left, top, right, bottom) inside a width x height image."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def center_crop_resize(img: Image.Image, size: int, crop: bool = True) -> Image.Image:
    """Centre square crop (optional) then resize to size x size with bicubic filtering."""
    if crop:
        img = img.crop(center_square_box(*img.size))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# Raw pixels (`prepare.encoding=raw`): this tag, height and width (uint16 each), then H*W*3
# uint8 RGB. No JPEG (FF D8) or PNG (89 50) blob starts with the tag.
RAW_TAG = b"RGB8"
_RAW_HEADER = len(RAW_TAG) + 4


def encode_raw(img: Image.Image) -> bytes:
    """An RGB image as tagged raw pixels: no decode cost when read, several times the disk."""
    width, height = img.size
    pixels = to_uint8_array(img.convert("RGB"))
    return RAW_TAG + struct.pack("<HH", height, width) + pixels.tobytes()


def decode_rgb_array(data: bytes, name: str | None = None) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 array. Tagged raw pixels are a view of `data`;
    JPEG/PNG are decoded by torchvision (libjpeg-turbo: the same pixels as PIL, ~1.3x faster
    here, no PIL object per image). Bytes torchvision cannot decode go through PIL, which
    decodes what it can or names the image in its error."""
    if data[: len(RAW_TAG)] == RAW_TAG:
        height, width = struct.unpack("<HH", data[len(RAW_TAG) : _RAW_HEADER])
        if len(data) != _RAW_HEADER + height * width * 3:
            raise CorruptImageError(
                f"cannot decode image {name or '<bytes>'}: raw pixels of {len(data)} bytes "
                f"for {height}x{width}"
            )
        return np.frombuffer(data, np.uint8, offset=_RAW_HEADER).reshape(height, width, 3)
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    try:
        chw = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return to_uint8_array(decode_image(data, name))
    return chw.permute(1, 2, 0).numpy()  # the decoder's own (H, W, 3) memory: no copy


def to_uint8_array(img: Image.Image) -> np.ndarray:
    """HWC uint8 array of an RGB image."""
    return np.asarray(img, dtype=np.uint8)


def grid_boxes(width: int, height: int, n: int) -> list[tuple[int, int, int, int]]:
    """Split a width x height image into an n x n grid of boxes, row-major.

    Boundaries are at round(i * size / n), so the tiles cover every pixel exactly once and tile
    sizes differ by at most one pixel when the size is not divisible by n.
    """
    if n < 1:
        raise ValueError(f"grid size must be >= 1, got {n}")
    if width < n or height < n:
        raise ValueError(f"image of {width}x{height} px is too small for a {n}x{n} grid")
    xs = [round(i * width / n) for i in range(n + 1)]
    ys = [round(i * height / n) for i in range(n + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(n) for c in range(n)]
