"""Small MIDI files for tests, written with pretty_midi.

Import explicitly: ``from tests.midi_factory import Track, write_midi, write_beat_file``.
Notes are given in 16th-note steps (`(pitch, start_step, end_step)`) and placed on a constant
tempo, so a test can say by hand which tokens and windows a file must give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pretty_midi

StepNote = tuple[int, int, int]  # pitch, start step, end step (exclusive)


@dataclass
class Track:
    notes: Sequence[StepNote]
    name: str = ""
    program: int = 0
    is_drum: bool = False


@dataclass
class Meter:
    numerator: int = 4
    denominator: int = 4
    step: int = field(default=0)  # where it starts, in 16th steps


def write_midi(
    path: Path,
    tracks: Sequence[Track],
    bpm: float = 120.0,
    meters: Sequence[Meter] = (Meter(),),
    seconds: Callable[[float], float] | None = None,
) -> Path:
    """Write tracks on a 16th-step grid; `seconds(step)` defaults to 16ths at `bpm` (pop909
    style files pass their own beat grid)."""
    step_s = 60.0 / bpm / 4
    at = seconds or (lambda step: step * step_s)
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    for m in meters:
        pm.time_signature_changes.append(
            pretty_midi.TimeSignature(m.numerator, m.denominator, at(m.step))
        )
    for t in tracks:
        inst = pretty_midi.Instrument(program=t.program, is_drum=t.is_drum, name=t.name)
        # Released 0.3 step early like a played note; rounds back to the grid.
        inst.notes = [pretty_midi.Note(96, p, at(s), at(e - 0.3)) for p, s, e in t.notes]
        pm.instruments.append(inst)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def write_beat_file(path: Path, times: Sequence[float], downbeats: Sequence[bool]) -> Path:
    """A pop909 `NNN.beat_midi.txt`: time, duple strong-beat flag, downbeat flag."""
    lines = [
        f"{t} {1.0 if i % 2 == 0 else 0.0} {1.0 if d else 0.0}"
        for i, (t, d) in enumerate(zip(times, downbeats, strict=True))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def scale_melody(bars: int, low: int = 60, offset: int = 0) -> list[StepNote]:
    """Quarter notes up and down a C major scale from `low`: no rests, 4 notes a bar."""
    scale = [0, 2, 4, 5, 7, 9, 11, 12, 11, 9, 7, 5, 4, 2]
    return [
        (low + scale[i % len(scale)], offset + 4 * i, offset + 4 * i + 4) for i in range(bars * 4)
    ]
