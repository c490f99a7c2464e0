"""`prepare.encoding=raw` (issue 16): prepared images as tagged uint8 pixels, read back without
decoding, the same pixels the JPEG path would resize to; and the decoder swap (torchvision)
gives PIL's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import compose_config
from vitlab.data.images import (
    CorruptImageError,
    center_crop_resize,
    decode_image,
    decode_rgb_array,
    encode_jpeg,
    encode_raw,
    to_uint8_array,
)
from vitlab.data.loading import decode_uint8_batch
from vitlab.errors import ConfigError
from vitlab.models.backbones import create_backbone
from vitlab.models.features import ClsToken
from vitlab.pipelines.plantclef.prepare import prepare_training_images
from vitlab.stages.embed import embed_prepared
from vitlab.stages.prepare import PrepareParams


def _picture(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_raw_pixels_round_trip_exactly_and_a_short_blob_names_the_image():
    img = _picture()
    blob = encode_raw(img)
    np.testing.assert_array_equal(decode_rgb_array(blob), to_uint8_array(img))
    with pytest.raises(CorruptImageError, match="x.raw"):
        decode_rgb_array(blob[:-5], "x.raw")


def test_torchvision_decodes_the_pixels_pil_decodes():
    jpeg = encode_jpeg(_picture(1), quality=90)
    buf = io.BytesIO()
    _picture(2).convert("L").save(buf, "PNG")  # grey PNG: RGB out
    for blob in (jpeg, buf.getvalue()):
        np.testing.assert_array_equal(decode_rgb_array(blob), to_uint8_array(decode_image(blob)))
    batch = decode_uint8_batch([jpeg, jpeg], ["a", "b"])
    assert batch.shape == (2, 40, 30, 3) and batch.flags["C_CONTIGUOUS"]
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        decode_rgb_array(jpeg[:40], "bad.jpg")


def test_raw_prepare_embeds_the_resized_pixels(tiny_plantclef, tmp_path):
    csv = tiny_plantclef / "PlantCLEF2024_single_plant_training_metadata.csv"
    images = tiny_plantclef / "images_max_side_800"
    raw = prepare_training_images(csv, images, tmp_path, PrepareParams(32, encoding="raw"))
    jpeg = prepare_training_images(csv, images, tmp_path, PrepareParams(32))
    assert raw.key != jpeg.key
    table = raw.read_table(columns=["image_name", "image"])
    name, blob = table.column("image_name")[0].as_py(), table.column("image")[0].as_py()
    expected = center_crop_resize(decode_image(next(images.rglob(name))), 32, crop=True)
    np.testing.assert_array_equal(decode_rgb_array(blob), to_uint8_array(expected))
    backbone = create_backbone(
        "timm", name="vit_tiny_patch16_224", pretrained=False,
        model_kwargs={"img_size": 32, "depth": 1}, input_size=32,
    )  # fmt: skip
    a = embed_prepared(raw, backbone, ClsToken(), tmp_path).read_table()
    b = embed_prepared(jpeg, backbone, ClsToken(), tmp_path).read_table()
    assert a.num_rows == b.num_rows == table.num_rows
    # JPEG q95 vs exact pixels: close, not equal
    ea = np.stack(a.sort_by("image_name").column("embedding").to_numpy(zero_copy_only=False))
    eb = np.stack(b.sort_by("image_name").column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(ea - eb).max() < 0.5 and not np.array_equal(ea, eb)


def test_an_unknown_encoding_names_the_key(tmp_path):
    cfg = compose_config("train", ["prepare.encoding=webp"], tmp_path)
    with pytest.raises(ConfigError, match="prepare.encoding"):
        PrepareParams.from_config(cfg.prepare)
