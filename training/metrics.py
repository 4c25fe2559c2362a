"""Evaluation metrics: the paper's (Akama, ISMIR 2021, Sec. 4) and what a player hears.

The paper's:
- Reconstruction accuracy: the share of target tokens that an argmax decode of the encoder's
  mean z gets right.
- Interpolation smoothness R(J), eq. 12: for one pair of latents of the same context and target,
  decode the J + 1 points alpha = j / J to token sequences x(j/J) and take

      R_i(J) = sum_{j=0..J-1} d(x(j/J), x((j+1)/J)) / (D_i (J - n_i))

  with d the edit (Levenshtein) distance, D_i = d(x(0), x(1)) the distance between the ends and
  n_i the number of zero steps (d = 0). Pairs with D_i (J - n_i) = 0 are excluded; R(J) is the
  mean over the rest. Lower is smoother: a path that moves evenly gives 1/J, one that stays put
  and then jumps in one step gives 1, detours give more.
- LM negative log-likelihood: training/evaluate.py (mean per-token NLL, nats).

What a player hears (all on generated targets, against the real targets in "reference"):
onset rate and pitch / hold / rest shares; pitch-class fit to the context; distinct candidates
among re-rolls; distinct sequences along an interpolation; tokens changed by a variation.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from engine import tokens as tk


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


# ----------------------------------------------------------------------------- eq. 12


def path_ratio(points: Sequence[Sequence[int]]) -> float | None:
    """R_i(J) of eq. 12 for one path x(0), x(1/J), .., x(1); None when D (J - n) = 0."""
    if len(points) < 2:
        raise ValueError("an interpolation path needs at least two points")
    J = len(points) - 1
    steps = [levenshtein(points[j], points[j + 1]) for j in range(J)]
    n_zero = sum(d == 0 for d in steps)
    direct = levenshtein(points[0], points[-1])
    if direct * (J - n_zero) == 0:
        return None
    return sum(steps) / (direct * (J - n_zero))


def subsample_path(points: Sequence[Sequence[int]], J: int) -> list[Sequence[int]]:
    """Points decoded at alpha = k / K (k = 0..K) -> the J + 1 points alpha = j / J (K % J == 0)."""
    K = len(points) - 1
    if J <= 0 or K % J:
        raise ValueError(f"a path of {K + 1} points has no sub-grid of J = {J}")
    return [points[j * K // J] for j in range(J + 1)]


def interpolation_ratio(paths: Sequence[Sequence[Sequence[int]]], J: int) -> dict:
    """R(J) over pairs; each path holds the decodes at alpha = k / K, K a multiple of J.

    Returns {"R": mean ratio (None if no pair is left: JSON has no NaN), "pairs": used,
    "excluded": pairs with D (J - n) = 0}."""
    ratios = [path_ratio(subsample_path(p, J)) for p in paths]
    used = [r for r in ratios if r is not None]
    return {"R": float(np.mean(used)) if used else None, "pairs": len(used),
            "excluded": len(ratios) - len(used)}


# ----------------------------------------------------------------------------- what a player hears


def token_shares(targets: np.ndarray) -> dict:
    """Shares of pitch (= onset rate), hold and rest tokens among target tokens (any shape)."""
    t = np.asarray(targets)
    n = max(1, t.size)
    return {"onset_rate": float((t < tk.N_PITCHES).sum() / n),
            "hold_share": float((t == tk.HOLD).sum() / n),
            "rest_share": float((t == tk.REST).sum() / n)}


def pitch_class_durations(tokens: Sequence[int]) -> np.ndarray:
    """Steps each pitch class sounds in a token sequence (holds extend the last pitch): (12,)."""
    hist = np.zeros(12)
    sounding = None
    for t in tokens:
        t = int(t)
        if t < tk.N_PITCHES:
            sounding = (t + tk.PITCH_MIN) % 12
        elif t == tk.REST:
            sounding = None
        if sounding is not None:
            hist[sounding] += 1
    return hist


def pitch_class_fit(target: Sequence[int], context: Sequence[int]) -> tuple[int, int, float | None]:
    """(onsets whose pitch class sounds in the context, onsets, histogram overlap): the overlap
    is sum_pc min(p, q) of the duration-weighted pitch-class distributions of target and
    context (1 = the same distribution), None when either has no sounding note."""
    ctx_pcs = {(int(t) + tk.PITCH_MIN) % 12 for t in context if int(t) < tk.N_PITCHES}
    onsets = [(int(t) + tk.PITCH_MIN) % 12 for t in target if int(t) < tk.N_PITCHES]
    fit = sum(pc in ctx_pcs for pc in onsets)
    p, q = pitch_class_durations(target), pitch_class_durations(context)
    overlap = float(np.minimum(p / p.sum(), q / q.sum()).sum()) if p.sum() and q.sum() else None
    return fit, len(onsets), overlap


def distinct(sequences: Sequence[Sequence[int]]) -> int:
    return len({tuple(int(t) for t in s) for s in sequences})


def mean_pairwise_distance(sequences: Sequence[Sequence[int]]) -> float:
    """Mean share of differing tokens over all pairs of equal-length sequences."""
    arr = np.asarray(sequences)
    pairs = list(combinations(range(len(arr)), 2))
    if not pairs:
        return 0.0
    return float(np.mean([(arr[i] != arr[j]).mean() for i, j in pairs]))


def share_of_pairs_apart(sequences: Sequence[Sequence[int]], at_least: float) -> float:
    """Share of all pairs of equal-length sequences that differ in at least that share of tokens:
    for independent re-rolls, the most a variation (a smaller move in w) is likely to reach."""
    arr = np.asarray(sequences)
    pairs = list(combinations(range(len(arr)), 2))
    if not pairs:
        return 0.0
    return float(np.mean([(arr[i] != arr[j]).mean() >= at_least for i, j in pairs]))


def changed_share(parent: Sequence[int], child: Sequence[int]) -> float:
    """Share of tokens of a variation that differ from its parent."""
    return float((np.asarray(parent) != np.asarray(child)).mean())
