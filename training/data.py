"""MIDI files -> 8-bar token windows (SPEC section 2, Training / Data).

One melody track -> 16th-note step grid (4/4 bars only) -> tokens (engine/tokens.py) ->
8-bar windows with a 1-bar stride, dropping windows with more than a bar of consecutive rest.
Windows are stored untransposed (training/windows.py transposes and batches them).

Grids: a file with a pop909 `NNN.beat_midi.txt` next to it uses that file's beat times and
downbeat flags (its MIDI time signatures are unreliable) and only its MELODY track; any other
MIDI file uses pretty_midi's beats / downbeats (tempo map + time signatures), 4/4 bars only.
Broken files raise `MidiParseError` inside and are counted by reason, never crash a run.
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pretty_midi
from tqdm import tqdm

from engine.tokens import (
    HOLD,
    N_BARS,
    PITCH_MAX,
    PITCH_MIN,
    REST,
    SEQ_LEN,
    STEPS_PER_BAR,
    Note,
    notes_to_tokens,
)
from training.windows import count_transpositions

log = logging.getLogger(__name__)

BEATS_PER_BAR = 4
STEPS_PER_BEAT = STEPS_PER_BAR // BEATS_PER_BAR
MAX_REST_STEPS = STEPS_PER_BAR  # a window may hold at most one bar of consecutive rest
BASS_MEDIAN_PITCH = 48  # tracks whose median pitch is below this are taken as bass lines
MELODY_TRACK = "MELODY"  # pop909's melody track name
BEAT_SUFFIX = ".beat_midi.txt"
MIDI_SUFFIXES = (".mid", ".midi")


class MidiParseError(Exception):
    """A MIDI or beat file that cannot be read (one error type for every parser failure)."""


@dataclass
class FileResult:
    """What one file gave: its windows (untransposed) and the counts of what was kept/dropped."""

    song: str
    windows: np.ndarray  # (n, 128) uint8
    tracks: int = 0
    tracks_kept: int = 0
    drops: Counter = field(default_factory=Counter)  # "file:reason" / "track:..." / "window:..."


# ---------------------------------------------------------------------------- reading


def read_midi(path: str | Path) -> pretty_midi.PrettyMIDI:
    try:
        with warnings.catch_warnings():
            # pretty_midi warns about meta events on non-zero tracks in most real files.
            warnings.simplefilter("ignore")
            return pretty_midi.PrettyMIDI(str(path))
    except Exception as exc:  # mido/pretty_midi raise OSError, EOFError, KeyError, ValueError...
        raise MidiParseError(f"{path}: {type(exc).__name__}: {exc}") from exc


def read_beat_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """pop909 `beat_midi.txt`: per line `time_s  duple_strong_beat  downbeat` (flags 0/1)."""
    try:
        table = np.loadtxt(path, ndmin=2)
    except ValueError as exc:
        raise MidiParseError(f"{path}: {exc}") from exc
    if table.shape[1] < 3 or len(table) < 2 or not np.all(np.diff(table[:, 0]) > 0):
        raise MidiParseError(f"{path}: expected increasing beat times and 3 columns")
    return table[:, 0], table[:, 2] > 0.5


def midi_beats(pm: pretty_midi.PrettyMIDI) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beat times, downbeat flags and a 'bar is in 4/4' flag per beat from the tempo map."""
    beats = pm.get_beats()
    downbeats = pm.get_downbeats()
    idx = np.clip(np.searchsorted(beats, downbeats - 1e-6), 0, len(beats) - 1)
    is_down = np.zeros(len(beats), bool)
    is_down[idx[np.isclose(beats[idx], downbeats, atol=1e-4)]] = True
    changes = sorted(pm.time_signature_changes, key=lambda ts: ts.time)
    four_four = np.ones(len(beats), bool)  # no time signature = 4/4 (the MIDI default)
    for i, ts in enumerate(changes):
        end = changes[i + 1].time if i + 1 < len(changes) else np.inf
        inside = (beats >= ts.time - 1e-6) & (beats < end - 1e-6)
        four_four[inside] = (ts.numerator, ts.denominator) == (4, 4)
    return beats, is_down, four_four


# ---------------------------------------------------------------------------- grid


def close_last_bar(beats: np.ndarray, is_down: np.ndarray, end_time: float):
    """Extrapolate beats so the last bar (if music sounds in it) ends on a closing downbeat."""
    down = np.flatnonzero(is_down)
    if len(down) == 0 or len(beats) < 2 or beats[down[-1]] >= end_time:
        return beats, is_down
    tail = len(beats) - down[-1]  # beats of the last bar, its downbeat included
    if tail > BEATS_PER_BAR:
        return beats, is_down
    period = beats[-1] - beats[-2]
    extra = beats[-1] + period * np.arange(1, BEATS_PER_BAR - tail + 2)
    flags = np.zeros(len(extra), bool)
    flags[-1] = True
    return np.concatenate([beats, extra]), np.concatenate([is_down, flags])


def four_four_stretches(
    beats: np.ndarray, is_down: np.ndarray, four_four: np.ndarray | None = None
) -> list[np.ndarray]:
    """Runs of consecutive 4-beat (4/4) bars -> each run's beat times, closing downbeat included."""
    down = np.flatnonzero(is_down)
    good = [
        (a, b)
        for a, b in zip(down[:-1], down[1:], strict=True)
        if b - a == BEATS_PER_BAR and (four_four is None or four_four[a])
    ]
    runs: list[np.ndarray] = []
    start = prev_end = None
    for a, b in good + [(None, None)]:
        if a is None or a != prev_end:
            if start is not None:
                runs.append(beats[start : prev_end + 1])
            start = a
        prev_end = b
    return runs


def step_times(stretch_beats: np.ndarray) -> np.ndarray:
    """Beat times -> step boundaries, 4 steps per beat, linear between beats: (n_steps + 1,)."""
    n_beats = len(stretch_beats) - 1
    grid = np.arange(n_beats * STEPS_PER_BEAT + 1) / STEPS_PER_BEAT
    return np.interp(grid, np.arange(n_beats + 1), stretch_beats)


def quantize(notes: Sequence[pretty_midi.Note], times: np.ndarray, shift: int = 0) -> list[Note]:
    """Notes in seconds -> notes on the step grid `times` (nearest step), pitch + shift."""
    n = len(times) - 1
    if not notes:
        return []
    starts = np.array([x.start for x in notes])
    ends = np.array([x.end for x in notes])
    steps = np.arange(n + 1)
    # Notes that began before the stretch but sound into it start at its first step.
    s = np.clip(np.rint(np.interp(starts, times, steps, left=-1)), 0, None).astype(int)
    e = np.rint(np.interp(ends, times, steps, right=n)).astype(int)
    keep = (ends > times[0]) & (s < n) & (e > 0)
    return [
        Note(notes[i].pitch + shift, int(s[i]), int(max(e[i], s[i] + 1)), notes[i].velocity)
        for i in np.flatnonzero(keep)
    ]


def octave_shift(pitches: Sequence[int]) -> int:
    """Octave shift (in semitones) that puts the most notes of a track into 55..84."""
    p = np.asarray(pitches)

    def fit(k: int) -> tuple[int, int]:
        inside = int(np.sum((p + 12 * k >= PITCH_MIN) & (p + 12 * k <= PITCH_MAX)))
        return inside, -abs(k)  # ties: the smallest shift

    return 12 * max(range(-6, 7), key=fit)


# ---------------------------------------------------------------------------- windows


def longest_rest(window: np.ndarray) -> int:
    runs = np.diff(np.concatenate(([0], (np.asarray(window) == REST).astype(np.int8), [0])))
    starts, ends = np.flatnonzero(runs == 1), np.flatnonzero(runs == -1)
    return int((ends - starts).max()) if len(starts) else 0


def cut_windows(tokens: Sequence[int], drops: Counter) -> list[np.ndarray]:
    """8-bar windows with a 1-bar stride; a window starting inside a note starts with its pitch
    (so every window decodes on its own); windows with > 1 bar of consecutive rest are dropped."""
    tok = np.asarray(tokens, dtype=np.uint8)
    out = []
    for start in range(0, len(tok) - SEQ_LEN + 1, STEPS_PER_BAR):
        window = tok[start : start + SEQ_LEN].copy()
        if window[0] == HOLD:
            back = start - 1
            while back > 0 and tok[back] == HOLD:
                back -= 1
            window[0] = tok[back]
        if longest_rest(window) > MAX_REST_STEPS:
            drops["window:long_rest"] += 1
            continue
        out.append(window)
    return out


def track_reason(inst: pretty_midi.Instrument, beat_file: bool) -> str | None:
    """Why a track is not a melody track, or None."""
    if beat_file and inst.name.strip().upper() != MELODY_TRACK:
        return "not_melody_track"
    if inst.is_drum:
        return "drum"
    if not inst.notes:
        return "empty"
    if "bass" in inst.name.lower() or np.median([n.pitch for n in inst.notes]) < BASS_MEDIAN_PITCH:
        return "bass"
    return None


def extract_file(path: str | Path, song: str) -> FileResult:
    """One MIDI file -> its windows and counts; never raises for bad input."""
    path = Path(path)
    result = FileResult(song, np.zeros((0, SEQ_LEN), np.uint8))
    try:
        pm = read_midi(path)
        beat_path = path.with_name(path.name.split(".")[0] + BEAT_SUFFIX)
        beat_file = beat_path.exists()
        if beat_file:
            beats, is_down = read_beat_file(beat_path)
            four_four = None
        else:
            # Only bar starts index four_four; close_last_bar adds no bar start.
            beats, is_down, four_four = midi_beats(pm)
    except MidiParseError as exc:
        log.debug("skipping %s", exc)
        result.drops["file:parse_error"] += 1
        return result
    end = max((n.end for inst in pm.instruments for n in inst.notes), default=0.0)
    beats, is_down = close_last_bar(beats, is_down, end)
    stretches = [s for s in four_four_stretches(beats, is_down, four_four)
                 if len(s) - 1 >= BEATS_PER_BAR * N_BARS]
    windows: list[np.ndarray] = []
    for inst in pm.instruments:
        result.tracks += 1
        reason = track_reason(inst, beat_file)
        if reason is None and not stretches:
            reason = "no_8_bars_of_4_4"
        if reason is not None:
            result.drops[f"track:{reason}"] += 1
            continue
        shift = octave_shift([n.pitch for n in inst.notes])
        kept = []
        for stretch in stretches:
            times = step_times(stretch)
            notes = quantize(inst.notes, times, shift)
            if notes:  # a stretch without notes is all rest: no window survives
                kept += cut_windows(notes_to_tokens(notes, len(times) - 1), result.drops)
        if kept:
            result.tracks_kept += 1
            windows += kept
        else:
            result.drops["track:no_window"] += 1
    if windows:
        result.windows = np.stack(windows)
    elif result.tracks == 0:
        result.drops["file:no_tracks"] += 1
    else:
        result.drops["file:no_window"] += 1
    return result


# ---------------------------------------------------------------------------- folders


@dataclass
class WindowSet:
    """Untransposed windows of a set of songs."""

    windows: np.ndarray  # (N, 128) uint8
    song: np.ndarray  # (N,) int32 index into songs
    songs: list[str]
    counts: Counter = field(default_factory=Counter)  # files, files_kept, tracks, ... windows
    drops: Counter = field(default_factory=Counter)


def midi_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES)


def _extract(job: tuple[Path, str]) -> FileResult:
    return extract_file(*job)


def windows_from_midi_folder(
    folder: str | Path, workers: int = 1, progress: bool = True, name: str | None = None
) -> WindowSet:
    """Every MIDI file under `folder` -> its windows; songs are named `<name>/<relative path>`."""
    folder = Path(folder)
    name = name or folder.name
    jobs = [(p, f"{name}/{p.relative_to(folder).with_suffix('')}") for p in midi_files(folder)]
    if not jobs:
        log.warning("no MIDI files under %s", folder)
    bar = dict(total=len(jobs), desc=name, unit="file", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        # spawn: the caller may hold torch threads, which fork does not copy safely.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_extract, jobs, chunksize=8), **bar))
    else:
        results = [_extract(job) for job in tqdm(jobs, **bar)]
    out = WindowSet(np.zeros((0, SEQ_LEN), np.uint8), np.zeros(0, np.int32), [])
    chunks, songs = [], []
    for r in results:
        out.counts["files"] += 1
        out.counts["tracks"] += r.tracks
        out.counts["tracks_kept"] += r.tracks_kept
        out.drops.update(r.drops)
        if len(r.windows):
            out.counts["files_kept"] += 1
            songs.append(np.full(len(r.windows), len(out.songs), np.int32))
            out.songs.append(r.song)
            chunks.append(r.windows)
    if chunks:
        out.windows, out.song = np.concatenate(chunks), np.concatenate(songs)
    out.counts["windows"] = len(out.windows)
    out.counts["windows_transposed"] = count_transpositions(out.windows)
    return out
