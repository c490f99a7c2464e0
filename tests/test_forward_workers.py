"""Forwards side by side: each batch's rows split over data-parallel forwards that share the
torch threads, outputs in order, the thread count restored, and the same embeddings as one
forward at a time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from vitlab.models.backbones import create_backbone, preprocess_batch
from vitlab.models.features import ClsToken
from vitlab.stages.embed import (
    embed_batches,
    embed_pixels,
    forward_workers,
    map_side_by_side,
    row_slices,
    torch_threads,
)


@pytest.mark.parametrize(
    "threads, split", [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (8, (4, 2)), (64, (4, 16))]
)
def test_threads_are_split_over_at_most_four_forwards(threads, split):
    assert forward_workers(threads) == split


@pytest.mark.parametrize("rows, parts", [(10, 2), (7, 3), (3, 4), (1, 2), (64, 4)])
def test_row_slices_cover_every_row_once_in_near_equal_parts(rows, parts):
    slices = row_slices(rows, parts)
    covered = [i for s in slices for i in range(rows)[s]]
    sizes = [s.stop - s.start for s in slices]
    assert covered == list(range(rows))
    assert len(slices) == min(parts, rows) and max(sizes) - min(sizes) <= 1


def test_each_batch_is_split_over_the_workers_and_comes_back_in_order():
    seen: list[tuple[int, str, int]] = []  # (first row, thread, torch threads) per call
    lock = threading.Lock()

    def tag_rows(rows: np.ndarray) -> np.ndarray:
        time.sleep(0.02 if rows[0] % 2 == 0 else 0.0)  # the parts finish out of order
        with lock:
            seen.append((int(rows[0]), threading.current_thread().name, torch.get_num_threads()))
        return rows * 10

    batches = [np.arange(0, 6), np.arange(6, 9), np.arange(9, 10)]
    with torch_threads(2):
        outputs = list(map_side_by_side(tag_rows, batches))
        assert torch.get_num_threads() == 2  # restored after the last batch
    assert [list(o) for o in outputs] == [list(b * 10) for b in batches]
    first_rows = sorted(first for first, _, _ in seen)
    assert first_rows == [0, 3, 6, 8, 9]  # 6 rows -> 2 parts, 3 -> 2, 1 -> 1
    assert {n for _, _, n in seen} == {1}  # each forward on one of the two threads
    assert {name.rsplit("_", 1)[0] for _, name, _ in seen} == {"vitlab-forward"}


def test_an_error_in_a_forward_reaches_the_caller_and_restores_the_threads():
    def fails_on_row_three(rows: np.ndarray) -> np.ndarray:
        if 3 in rows:
            raise RuntimeError("forward of row 3 failed")
        return rows

    with torch_threads(2):
        with pytest.raises(RuntimeError, match="row 3 failed"):
            list(map_side_by_side(fails_on_row_three, [np.arange(2), np.arange(2, 6)]))
        assert torch.get_num_threads() == 2


def test_one_thread_runs_whole_batches_inline():
    calls: list[tuple[int, str]] = []

    def record(rows: np.ndarray) -> np.ndarray:
        calls.append((len(rows), threading.current_thread().name))
        return rows

    with torch_threads(1):
        list(map_side_by_side(record, [np.arange(4), np.arange(2)]))
    assert calls == [(4, threading.current_thread().name), (2, threading.current_thread().name)]


def test_side_by_side_embeddings_equal_one_forward_at_a_time():
    backbone = create_backbone(
        kind="timm",
        name="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs={"img_size": 32, "depth": 2},
        input_size=32,
    )
    features = ClsToken()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (5, 8, 3, 1)]
    with torch_threads(1):
        expected = [
            embed_pixels(backbone, features, preprocess_batch(b, backbone.input_spec)).numpy()
            for b in batches
        ]
    with torch_threads(2):
        got = list(embed_batches(backbone, features, iter(batches)))
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
