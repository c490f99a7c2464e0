"""Zero-shot segmentation math: background rule, top-k filter, sliding window, a rigged model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.inference.segmentation import (
    SegmentationSettings,
    add_background,
    crop_boxes,
    crop_class_logits,
    group_class_scores,
    pixel_class_scores,
    segment_image,
    sliding_window_average,
)
from vitlab.models.groupvit.model import GroupViT, ImageEncoding, tiny_spec


def test_background_rule_on_hand_made_affinities():
    # one crop, 2 groups x 2 classes; pixels: [best fg 0.9, 0.3, 0.4]
    pixel = torch.tensor([[0.9, 0.3, 0.4], [0.1, 0.2, 0.0]]).reshape(1, 2, 1, 3)
    scores = torch.tensor([[[0.9, 0.1], [0.3, 0.2]]])
    out = add_background(pixel, scores, bg_threshold=0.5)
    assert out.shape == (1, 3, 1, 3)
    assert out[0, 0, 0].tolist() == [0.0, 1.0, 1.0]  # 0.3 and 0.4 < min(0.5, 0.9)
    assert torch.equal(out[:, 1:], pixel)
    # the threshold is capped by the crop's best group score: min(0.95, 0.4) = 0.4
    low = torch.tensor([[[0.4, 0.1], [0.3, 0.2]]])
    capped = add_background(pixel * 0 + torch.tensor([0.4, 0.3, 0.35]), low, bg_threshold=0.95)
    assert capped[0, 0, 0].tolist() == [0.0, 1.0, 1.0]  # 0.4 is not < 0.4


def test_top_k_filter_matches_the_reference_rule():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    groups = F.normalize(torch.randn(1, 3, 8), dim=-1)
    pooled = F.normalize(text[2] + 0.5 * text[0], dim=-1)[None]
    scale = 10.0
    got = group_class_scores(groups, pooled, text, scale, top_k=2)
    logits = scale * groups @ text.t()
    top = (scale * pooled @ text.t()).topk(2).indices[0]
    assert set(top.tolist()) == {0, 2}
    masked = torch.full_like(logits, float("-inf"))
    masked[..., top] = logits[..., top]
    expected = masked.softmax(-1) * logits.softmax(-1)
    torch.testing.assert_close(got, expected)
    assert torch.all(got[..., [1, 3]] == 0)
    everything = group_class_scores(groups, pooled, text, scale, top_k=0)
    torch.testing.assert_close(everything, logits.softmax(-1) ** 2)


def test_crop_boxes_cover_small_and_large_images():
    assert crop_boxes(100, 80, 448, 224) == [(0, 100, 0, 80)]
    boxes = crop_boxes(300, 500, 448, 224)
    assert boxes == [(0, 300, 0, 448), (0, 300, 52, 500)]
    big = crop_boxes(448, 1000, 448, 224)
    assert big[-1] == (0, 448, 552, 1000) and len(big) == 4


def test_sliding_window_averages_overlaps_for_images_smaller_and_larger_than_the_crop():
    for height, width in ((5, 7), (10, 23)):
        image = torch.arange(3 * height * width, dtype=torch.float32).reshape(3, height, width)
        # identity logits -> the average is the image itself
        same = sliding_window_average(image, crop=8, stride=4, crop_logits=lambda c: c)
        torch.testing.assert_close(same, image)
        # constant 1 per crop -> 1 everywhere; a per-crop counter shows the overlap average
        calls = []

        def numbered(crops, calls=calls):
            out = []
            for crop in crops:
                calls.append(len(calls))
                out.append(torch.full((1, *crop.shape[1:]), float(len(calls) - 1)))
            return torch.stack(out)

        averaged = sliding_window_average(image, 8, 4, numbered, crops_per_batch=2)
        boxes = crop_boxes(height, width, 8, 4)
        assert len(calls) == len(boxes)
        expected = torch.zeros(height, width)
        count = torch.zeros(height, width)
        for index, (y1, y2, x1, x2) in enumerate(boxes):
            expected[y1:y2, x1:x2] += index
            count[y1:y2, x1:x2] += 1
        torch.testing.assert_close(averaged[0], expected / count)


def _rigged_model(text: torch.Tensor) -> GroupViT:
    """Grouping: left half of the patches -> group 0, right half -> group 1; group 0's
    embedding is class 1's text, group 1's is class 2's; pooled = their mean."""
    model = GroupViT(tiny_spec()).eval()

    def encode_image(crops):
        b, _, h, w = crops.shape
        grid = (h // 8, w // 8)
        columns = torch.arange(grid[1]).repeat(grid[0])
        first = torch.zeros(b, 2, grid[0] * grid[1])
        first[:, 0, columns < grid[1] // 2] = 1.0
        first[:, 1, columns >= grid[1] // 2] = 1.0
        second = torch.eye(2).expand(b, 2, 2)
        segments = torch.stack([text[1], text[2]]).expand(b, 2, -1)
        from vitlab.models.groupvit.model import Assignment

        assignments = [Assignment(first, first), Assignment(second, second)]
        return ImageEncoding(segments.mean(1), segments, assignments, grid)

    model.encode_image = encode_image
    model.project_segments = lambda encoding: encoding.segment_tokens
    model.project_image = lambda encoding: encoding.pooled
    return model


def test_rigged_model_segments_to_the_known_answer():
    text = torch.eye(4, 64)  # 4 orthonormal class embeddings
    model = _rigged_model(text)
    settings = SegmentationSettings(short_side=64, crop=64, stride=32, bg_threshold=0.1, top_k=2)
    logits = crop_class_logits(model, torch.zeros(1, 3, 64, 64), text, settings)
    assert logits.shape == (1, 5, 64, 64)  # background + 4 classes
    labels = logits.argmax(1)[0]
    assert torch.all(labels[:, :32] == 2) and torch.all(labels[:, 32:] == 3)
    # whole pipeline on a PIL image of another size: resized (short side 64 -> 128x64),
    # one crop covering it, resized back to 96x48
    one_crop = SegmentationSettings(short_side=64, crop=128, stride=64, bg_threshold=0.1, top_k=2)
    label_map = segment_image(model, Image.new("RGB", (96, 48)), text, one_crop)
    assert label_map.shape == (48, 96)
    assert (label_map[:, :40] == 2).all() and (label_map[:, 56:] == 3).all()
    # a threshold above every score turns everything into background
    strict = SegmentationSettings(short_side=64, crop=64, stride=32, bg_threshold=1.0, top_k=2)
    scores = crop_class_logits(model, torch.zeros(1, 3, 64, 64), text, strict)
    assert scores[:, 1:].max() < 1.0
    # background only where a pixel's best class is below min(threshold, best group score);
    # both groups score the same here, so nothing is background
    assert torch.all(scores.argmax(1) != 0)


def test_pixel_scores_take_their_groups_scores():
    onehot = torch.zeros(1, 2, 1, 2)
    onehot[0, 0, 0, 0] = onehot[0, 1, 0, 1] = 1
    scores = torch.tensor([[[0.7, 0.3], [0.2, 0.8]]])
    expected = torch.tensor([[0.7, 0.2], [0.3, 0.8]])
    torch.testing.assert_close(pixel_class_scores(onehot, scores)[0, :, 0], expected)
