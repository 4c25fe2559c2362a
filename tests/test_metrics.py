"""The paper's metrics against hand computations (training/metrics.py)."""

import numpy as np
import pytest

from engine import tokens as tk
from training.metrics import (
    changed_share,
    distinct,
    interpolation_ratio,
    levenshtein,
    mean_pairwise_distance,
    path_ratio,
    pitch_class_fit,
    share_of_pairs_apart,
    subsample_path,
    token_accuracy,
    token_shares,
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


EVEN = [[1, 1, 1, 1], [2, 1, 1, 1], [2, 2, 1, 1], [2, 2, 2, 1], [2, 2, 2, 2]]  # 4 steps of 1, D = 4
STAY_THEN_JUMP = [[1, 1, 1, 1]] * 4 + [[2, 2, 2, 2]]  # 3 zero steps, then one step of 4
DETOUR = [[1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 2]]  # steps 4 + 3, D = 1, no zero step
SAME_ENDS = [[3, 3], [4, 4], [4, 4], [4, 4], [3, 3]]  # D = 0 -> excluded
STILL = [[5, 5]] * 5  # D = 0 and every step zero -> excluded


def test_eq12_by_hand():
    # sum_j d(x_j, x_j+1) / (D (J - n))
    assert path_ratio(EVEN) == 4 / (4 * 4) == 0.25  # an even path gives 1/J
    assert path_ratio(STAY_THEN_JUMP) == 4 / (4 * (4 - 3)) == 1.0
    assert path_ratio(DETOUR) == 7 / (1 * 2)
    assert path_ratio([[1, 2], [1, 2], [1, 3], [2, 3]]) == 2 / (2 * (3 - 1))  # one zero step
    assert path_ratio(SAME_ENDS) is None and path_ratio(STILL) is None


def test_stay_then_jump_scores_worse_than_even():
    assert path_ratio(STAY_THEN_JUMP) > path_ratio(EVEN)


def test_interpolation_ratio_excludes_zero_distance_pairs():
    r = interpolation_ratio([EVEN, STAY_THEN_JUMP, SAME_ENDS, STILL], J=4)
    assert r == {"R": (0.25 + 1.0) / 2, "pairs": 2, "excluded": 2}
    assert interpolation_ratio([SAME_ENDS], J=2) == {"R": None, "pairs": 0, "excluded": 1}
    assert interpolation_ratio([STILL], J=4) == {"R": None, "pairs": 0, "excluded": 1}


def test_R_of_J_uses_the_sub_grid_alpha_j_over_J():
    # Decodes at alpha = k/4: R(4) walks every point, R(2) only alpha = 0, 1/2, 1.
    path = [[0, 0], [9, 9], [0, 1], [8, 8], [1, 1]]
    assert subsample_path(path, 2) == [[0, 0], [0, 1], [1, 1]]
    # R(4): (2 + 2 + 2 + 2) / (2 * 4) = 1; R(2): (1 + 1) / (2 * 2) = 0.5 = 1/J, even.
    assert interpolation_ratio([path], J=4)["R"] == 1.0
    assert interpolation_ratio([path], J=2)["R"] == 0.5
    with pytest.raises(ValueError):
        subsample_path(path, 3)


P = tk.pitch_to_token  # 60 -> token


def test_token_shares():
    t = np.array([P(60), tk.HOLD, tk.HOLD, tk.REST])
    assert token_shares(t) == {"onset_rate": 0.25, "hold_share": 0.5, "rest_share": 0.25}


def test_pitch_class_fit_by_hand():
    context = [P(60), tk.HOLD, tk.HOLD, P(64)]  # C for 3 steps, E for 1
    target = [P(72), tk.HOLD, P(61), tk.REST]  # C (octave up) 2 steps, C# 1 step
    fit, onsets, overlap = pitch_class_fit(target, context)
    assert (fit, onsets) == (1, 2)  # C is in the context, C# is not
    # p = C 2/3, C# 1/3; q = C 3/4, E 1/4 -> overlap = min(2/3, 3/4) = 2/3
    assert overlap == pytest.approx(2 / 3)
    assert pitch_class_fit([tk.REST] * 4, context)[2] is None


def test_diversity_and_change():
    rolls = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5]]
    assert distinct(rolls) == 2
    assert mean_pairwise_distance(rolls) == pytest.approx((0 + 0.25 + 0.25) / 3)
    assert changed_share([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    # pairs apart by 0, 0.25, 0.25 of their tokens: one in three is under 15%, none reaches 30%
    assert share_of_pairs_apart(rolls, 0.15) == pytest.approx(2 / 3)
    assert share_of_pairs_apart(rolls, 0.30) == 0.0
    assert share_of_pairs_apart(rolls[:1], 0.15) == 0.0
