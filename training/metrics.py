"""The paper's evaluation metrics (Akama, ISMIR 2021, Sec. 4).

- Reconstruction accuracy: the share of target tokens that an argmax decode of the encoder's
  mean z gets right.
- Interpolation smoothness R(J) (eq. 12, as implemented here): for one pair of latents (z1, z2)
  of the same context and target, decode the J + 1 points alpha_j = j / J, j = 0..J, to token
  sequences x_j, and take the ratio of the path length to the direct distance

      R_i(J) = sum_{j=1..J} d(x_{j-1}, x_j) / d(x_0, x_J)

  with d the Levenshtein (edit) distance over tokens. By the triangle inequality R_i(J) >= 1; it
  is 1 when every step moves monotonically from x_0 towards x_J (a smooth interpolation) and
  grows with detours. Pairs whose endpoints decode to the same sequence (d(x_0, x_J) = 0) have no
  defined ratio and are excluded; R(J) is the mean of R_i(J) over the remaining pairs, reported
  with the number of pairs it used (None when every pair is excluded).
- LM negative log-likelihood: see training/evaluate.py (mean per-token NLL, nats).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences."""
    a, b = [int(t) for t in a], [int(t) for t in b]
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ta in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, tb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ta != tb))
        prev = cur
    return prev[-1]


def token_accuracy(predicted: np.ndarray, target: np.ndarray) -> float:
    """Share of equal tokens between two (B, T) arrays."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape:
        raise ValueError(f"shapes differ: {predicted.shape} vs {target.shape}")
    return float((predicted == target).mean()) if predicted.size else float("nan")


def path_ratio(points: Sequence[Sequence[int]]) -> float | None:
    """R_i for one interpolation path x_0..x_J; None when d(x_0, x_J) = 0 (excluded)."""
    if len(points) < 2:
        raise ValueError("an interpolation path needs at least two points")
    direct = levenshtein(points[0], points[-1])
    if direct == 0:
        return None
    steps = sum(levenshtein(points[j - 1], points[j]) for j in range(1, len(points)))
    return steps / direct


def subsample_path(points: Sequence[Sequence[int]], J: int) -> list[Sequence[int]]:
    """Points decoded at alpha = k / K (k = 0..K) -> the J + 1 points alpha = j / J (K % J == 0)."""
    K = len(points) - 1
    if J <= 0 or K % J:
        raise ValueError(f"a path of {K + 1} points has no sub-grid of J = {J}")
    return [points[j * K // J] for j in range(J + 1)]


def interpolation_ratio(paths: Sequence[Sequence[Sequence[int]]], J: int) -> dict:
    """R(J) over pairs; each path holds the decodes at alpha = k / K, K a multiple of J.

    Returns {"R": mean ratio (None if no pair is left: JSON has no NaN), "pairs": used,
    "excluded": zero-distance pairs}."""
    ratios = [path_ratio(subsample_path(p, J)) for p in paths]
    used = [r for r in ratios if r is not None]
    return {"R": float(np.mean(used)) if used else None, "pairs": len(used),
            "excluded": len(ratios) - len(used)}
