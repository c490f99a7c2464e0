import numpy as np
import pytest
from PIL import Image

from vitlab.data.images import (
    CorruptImageError,
    center_crop_resize,
    center_square_box,
    decode_image,
    grid_boxes,
)


@pytest.mark.parametrize("width,height,n", [(900, 900, 3), (1001, 755, 3), (64, 97, 5), (7, 7, 1)])
def test_grid_boxes_cover_every_pixel_once(width, height, n):
    boxes = grid_boxes(width, height, n)
    assert len(boxes) == n * n
    coverage = np.zeros((height, width), dtype=int)
    for left, top, right, bottom in boxes:
        coverage[top:bottom, left:right] += 1
    assert (coverage == 1).all()
    widths = {right - left for left, _, right, _ in boxes}
    heights = {b - t for _, t, _, b in boxes}
    assert max(widths) - min(widths) <= 1 and max(heights) - min(heights) <= 1


def test_grid_boxes_row_major_and_errors():
    boxes = grid_boxes(10, 20, 2)
    assert boxes == [(0, 0, 5, 10), (5, 0, 10, 10), (0, 10, 5, 20), (5, 10, 10, 20)]
    with pytest.raises(ValueError, match=">= 1"):
        grid_boxes(10, 10, 0)
    with pytest.raises(ValueError, match="too small"):
        grid_boxes(2, 10, 3)


def test_center_crop_resize():
    assert center_square_box(300, 200) == (50, 0, 250, 200)
    img = Image.new("RGB", (300, 200), "red")
    out = center_crop_resize(img, 64)
    assert out.size == (64, 64)


def test_decode_corrupt_and_truncated(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (50, 40), "blue").save(good)
    assert decode_image(good).size == (50, 40)
    assert decode_image(good.read_bytes()).size == (50, 40)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match="garbage.jpg"):
        decode_image(garbage)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        decode_image(truncated)
