"""The paper's metrics against hand computations (training/metrics.py)."""

import numpy as np
import pytest

from training.metrics import (
    interpolation_ratio,
    levenshtein,
    path_ratio,
    subsample_path,
    token_accuracy,
)


@pytest.mark.parametrize(("a", "b", "d"), [
    ("kitten", "sitting", 3),
    ([1, 2, 3], [2, 3], 1),  # one deletion
    ([], [1, 2], 2),
    ([5, 5, 5], [5, 5, 5], 0),
    ([1, 2, 3, 4], [4, 3, 2, 1], 4),
    ([1, 2, 3, 4], [2, 3, 4, 1], 2),  # delete the head, append it: not 4 substitutions
])
def test_levenshtein(a, b, d):
    a = [ord(c) for c in a] if isinstance(a, str) else a
    b = [ord(c) for c in b] if isinstance(b, str) else b
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_token_accuracy():
    assert token_accuracy(np.array([[1, 2], [3, 4]]), np.array([[1, 0], [3, 4]])) == 0.75
    with pytest.raises(ValueError):
        token_accuracy(np.zeros((2, 2)), np.zeros((2, 3)))


SMOOTH = [[1, 2, 3], [1, 2, 4], [1, 5, 4]]  # 1 + 1 steps, endpoints 2 apart -> R = 1
DETOUR = [[1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 2]]  # 4 + 3 steps, endpoints 1 apart -> R = 7
SAME_ENDS = [[3, 3], [4, 4], [3, 3]]  # endpoint distance 0 -> excluded


def test_path_ratio_by_hand():
    assert path_ratio(SMOOTH) == 1.0
    assert path_ratio(DETOUR) == 7.0
    assert path_ratio(SAME_ENDS) is None


def test_interpolation_ratio_excludes_zero_distance_pairs():
    r = interpolation_ratio([SMOOTH, DETOUR, SAME_ENDS], J=2)
    assert r == {"R": 4.0, "pairs": 2, "excluded": 1}  # mean of 1 and 7; SAME_ENDS left out
    empty = interpolation_ratio([SAME_ENDS], J=2)
    assert empty == {"R": None, "pairs": 0, "excluded": 1}


def test_R_of_J_uses_the_sub_grid_alpha_j_over_J():
    # Decodes at alpha = k/4: R(4) walks every point, R(2) only alpha = 0, 1/2, 1.
    path = [[0, 0], [9, 9], [0, 1], [8, 8], [1, 1]]
    assert subsample_path(path, 2) == [[0, 0], [0, 1], [1, 1]]
    # R(4): d = 2 + 2 + 2 + 2 = 8 over d(x0, x4) = 2 -> 4; R(2): (1 + 1) / 2 = 1.
    assert interpolation_ratio([path], J=4)["R"] == 4.0
    assert interpolation_ratio([path], J=2)["R"] == 1.0
    with pytest.raises(ValueError):
        subsample_path(path, 3)
