"""Token windows after preparation (training/data.py writes them): transposition, seeded
batches, and the cache written by training.prepare.

Windows are stored untransposed; `random_transpositions` / `WindowSampler` draw a random valid
transposition (every shift that keeps all pitches in 55..84) per draw.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.tokens import N_PITCHES

SPLITS = ("train", "valid", "lm_train", "lm_valid", "test")  # the cache's splits, by song
SPLIT_WEIGHTS = (11, 1, 6, 1, 1)


# ---------------------------------------------------------------------------- transposition


def pitch_bounds(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest pitch token per window; (0, N_PITCHES - 1) for a window of no pitch."""
    w = np.atleast_2d(windows).astype(np.int64)
    is_p = w < N_PITCHES
    lo = np.where(is_p, w, N_PITCHES).min(axis=1)
    hi = np.where(is_p, w, -1).max(axis=1)
    none = ~is_p.any(axis=1)
    lo[none], hi[none] = 0, N_PITCHES - 1
    return lo, hi


def transpositions(window: np.ndarray) -> range:
    """Every semitone shift that keeps all of the window's pitches in 55..84 (0 included)."""
    lo, hi = pitch_bounds(window)
    return range(-int(lo[0]), N_PITCHES - int(hi[0]))


def count_transpositions(windows: np.ndarray) -> int:
    if len(windows) == 0:
        return 0
    lo, hi = pitch_bounds(windows)
    return int(np.sum(N_PITCHES - hi + lo))


def transpose(windows: np.ndarray, shifts: np.ndarray | int) -> np.ndarray:
    """Shift pitch tokens (rests and holds stay); shifts broadcast per window."""
    w = np.atleast_2d(windows).astype(np.int64)
    shifts = np.broadcast_to(np.asarray(shifts, np.int64).reshape(-1, 1), (len(w), 1))
    out = np.where(w < N_PITCHES, w + shifts, w)
    if np.any((out < 0) | ((w < N_PITCHES) & (out >= N_PITCHES))):
        raise ValueError("transposition leaves 55..84")
    return out


def random_transpositions(windows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random valid transposition of each window, uniform over its valid shifts: (B, 128)."""
    lo, hi = pitch_bounds(windows)
    shifts = -lo + rng.integers(0, N_PITCHES - hi + lo)
    return transpose(windows, shifts)


class WindowSampler:
    """Seeded batches (B, 128) int64 torch tensors: each epoch a fresh permutation of the
    windows, each draw a fresh random valid transposition (`transpose=False` for none)."""

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int = 0, transpose: bool = True):
        if len(windows) == 0:
            raise ValueError("no windows to sample from")
        self.windows, self.batch_size, self.transpose = windows, batch_size, transpose
        self.rng = np.random.default_rng(seed)
        self._order = np.zeros(0, np.int64)

    def _indices(self) -> np.ndarray:
        while len(self._order) < self.batch_size:
            self._order = np.concatenate([self._order, self.rng.permutation(len(self.windows))])
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return idx

    def batch(self):  # -> torch.Tensor
        import torch  # lazily: data preparation workers never need torch

        w = self.windows[self._indices()]
        w = random_transpositions(w, self.rng) if self.transpose else w.astype(np.int64)
        return torch.from_numpy(w)

    def __iter__(self) -> Iterator:
        while True:
            yield self.batch()


# ---------------------------------------------------------------------------- cache


def load_cache(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["meta"] = json.loads(str(data["meta"]))
    data["songs"] = [str(s) for s in data["songs"]]
    return data


def load_windows(path: str | Path, split: str) -> np.ndarray:
    """Untransposed windows (N, 128) uint8 of one split of a cache written by training.prepare."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    with np.load(path, allow_pickle=False) as z:
        names = [str(s) for s in z["split_names"]]
        return z["windows"][z["split"] == names.index(split)]
