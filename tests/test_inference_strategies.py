import numpy as np
import pytest

from vitlab.inference.plantclef import FullImageTopK, GridArgmax, GridTopK

SPECIES = [101, 102, 103, 104, 105, 106]


def test_full_image_top_k():
    probs = np.array([[0.1, 0.4, 0.05, 0.3, 0.1, 0.05]])
    assert FullImageTopK(k=2).aggregate(probs, SPECIES) == [102, 104]
    assert FullImageTopK(k=2).boxes(30, 20) == [(0, 0, 30, 20)]


def test_grid_argmax_union_ordered_by_best_tile():
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1, 0.0, 0.0],
            [0.1, 0.1, 0.8, 0.0, 0.0, 0.0],
            [0.6, 0.2, 0.1, 0.1, 0.0, 0.0],
            [0.0, 0.0, 0.1, 0.0, 0.9, 0.0],
        ]
    )
    assert GridArgmax(grid_size=2).aggregate(probs, SPECIES) == [105, 103, 101]
    assert len(GridArgmax(grid_size=3).boxes(90, 60)) == 9


def test_grid_topk_merge_sort_dedupe():
    probs = np.array(
        [
            [0.50, 0.30, 0.10, 0.05, 0.05, 0.00],
            [0.05, 0.60, 0.20, 0.10, 0.05, 0.00],
        ]
    )
    # per tile top-3 kept to L=2: tile0 -> (0:.5, 1:.3), tile1 -> (1:.6, 2:.2)
    # merged by prob: 1(.6) 0(.5) 1(.3 dup) 2(.2) -> top L=2: [102, 101]
    strategy = GridTopK(grid_size=1, k_per_tile=3, top_l=2)
    assert strategy.aggregate(probs, SPECIES) == [102, 101]
    assert GridTopK(grid_size=1, k_per_tile=3, top_l=5).aggregate(probs, SPECIES) == [
        102,
        101,
        103,
        104,
    ]


@pytest.mark.parametrize(
    "make", [lambda: GridArgmax(grid_size=0), lambda: GridTopK(top_l=0), lambda: FullImageTopK(k=0)]
)
def test_invalid_parameters_name_the_key(make):
    with pytest.raises(ValueError, match="inference\\."):
        make()
