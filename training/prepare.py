"""MIDI folders -> one cache of untransposed 8-bar windows split by song.

    python -m training.prepare --data DIR [--data DIR ...] --out cache/windows.npz [--workers N]

Prints, per data set, how many files, tracks and windows it kept and why it dropped the rest,
then the windows per split (untransposed and with every valid transposition).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.data import WindowSet, windows_from_midi_folder
from training.windows import SPLIT_WEIGHTS, SPLITS, count_transpositions

log = logging.getLogger("training.prepare")


def split_songs(songs: Sequence[str], seed: int = 0) -> dict[str, int]:
    """Seeded split by song, proportions SPLIT_WEIGHTS -> {song: index into SPLITS}."""
    order = sorted(songs)
    perm = np.random.default_rng(seed).permutation(len(order))
    bounds = np.rint(len(order) * np.cumsum(SPLIT_WEIGHTS) / sum(SPLIT_WEIGHTS)).astype(int)
    codes = np.searchsorted(bounds, np.arange(len(order)), side="right")
    return {order[i]: int(codes[rank]) for rank, i in enumerate(perm)}



def save_cache(path: str | Path, windows: np.ndarray, song: np.ndarray, split: np.ndarray,
               songs: Sequence[str], meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")  # written whole, then renamed: never half a cache
    np.savez_compressed(
        tmp, windows=windows.astype(np.uint8), song=song.astype(np.int32),
        split=split.astype(np.uint8), songs=np.array(songs, dtype=str),
        split_names=np.array(SPLITS), meta=np.array(json.dumps(meta)),
    )
    tmp.replace(path)


def prepare(
    folders: Sequence[str | Path], out: str | Path, workers: int = 1, seed: int = 0,
    progress: bool = True,
) -> dict:
    """Extract every folder, split each data set by song (seeded), write the cache.

    Returns the metadata stored in the cache (counts per data set and per split)."""
    t0 = time.monotonic()
    sets: list[tuple[str, WindowSet]] = []
    for folder in folders:
        name = Path(folder).name
        if any(name == other for other, _ in sets):
            raise SystemExit(f"two data sets are named {name!r}: rename one folder")
        sets.append((name, windows_from_midi_folder(folder, workers, progress, name)))

    windows, song, split, songs = [], [], [], []
    meta: dict = {"sources": [str(Path(f).resolve()) for f in folders], "seed": seed,
                  "splits": list(SPLITS), "split_weights": list(SPLIT_WEIGHTS), "datasets": {}}
    for name, ws in sets:
        # Split each data set on its own so every split sees every data set in proportion.
        codes = split_songs(ws.songs, seed)
        song_split = np.array([codes[s] for s in ws.songs], np.uint8)
        windows.append(ws.windows)
        song.append(ws.song + len(songs))
        split.append(song_split[ws.song] if len(ws.song) else np.zeros(0, np.uint8))
        songs += ws.songs
        meta["datasets"][name] = {
            "counts": dict(ws.counts), "drops": dict(sorted(ws.drops.items())),
            "songs_per_split": {s: int(np.sum(song_split == i)) for i, s in enumerate(SPLITS)},
        }
    all_w = np.concatenate(windows)
    all_split = np.concatenate(split)
    meta["splits_windows"] = {
        s: {"windows": int(np.sum(all_split == i)),
            "transposed": count_transpositions(all_w[all_split == i])}
        for i, s in enumerate(SPLITS)
    }
    meta["windows"] = len(all_w)
    meta["windows_transposed"] = count_transpositions(all_w)
    meta["seconds"] = round(time.monotonic() - t0, 1)
    save_cache(out, all_w, np.concatenate(song), all_split, songs, meta)
    return meta


def report(meta: dict, out: str | Path) -> str:
    lines = []
    for name, d in meta["datasets"].items():
        c = Counter(d["counts"])
        lines.append(
            f"{name}: files {c['files_kept']}/{c['files']} kept, tracks {c['tracks_kept']}/"
            f"{c['tracks']} kept, windows {c['windows']} ({c['windows_transposed']} transposed)"
        )
        for reason, n in d["drops"].items():
            lines.append(f"  dropped {reason}: {n}")
        lines.append("  songs per split: " + ", ".join(
            f"{s} {n}" for s, n in d["songs_per_split"].items()))
    lines.append(f"{'split':<10}{'windows':>10}{'transposed':>14}")
    for s, d in meta["splits_windows"].items():
        lines.append(f"{s:<10}{d['windows']:>10}{d['transposed']:>14}")
    lines.append(f"{'total':<10}{meta['windows']:>10}{meta['windows_transposed']:>14}")
    lines.append(f"wrote {out} in {meta['seconds']} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, help="a folder of MIDI files")
    p.add_argument("--out", required=True, help="the .npz cache to write")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the song split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for folder in args.data:
        if not Path(folder).is_dir():
            p.error(f"--data {folder}: not a folder")
    meta = prepare(args.data, args.out, args.workers, args.seed, not args.quiet)
    print(report(meta, args.out))
    return meta


if __name__ == "__main__":
    main()
