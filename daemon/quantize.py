"""Live notes -> one token per step (SPEC sections 1 and 3).

The player's note events carry fractional transport positions (16 steps per bar). A note-on
at position p counts for step round(p), so a note played a little early lands on the step it
anticipates; note-offs round the same way. A step is final once no event can still round
onto it (the clock has passed its second half), and only then is its token produced, so
late-ish events still land where the ear put them.

Per step the chosen sounding note follows the polyphony rule (highest | latest) exactly as
`engine.tokens.notes_to_tokens` does for files, with one live-only addition: when a new onset
takes over, the note it replaces is cut, so a note whose note-off was lost cannot come back
later; and a note never released is let go at a bar line at most `max_hold_bars` bars after
the bar it started in (it never overwrites its own onset in the 8-bar loop).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from engine.tokens import HOLD, REST, STEPS_PER_BAR, fold_pitch, pitch_to_token

log = logging.getLogger(__name__)

POLYPHONY = ("highest", "latest")


class QuantizeError(ValueError):
    """A note event that cannot be placed on the grid (bad pitch, velocity or position)."""


def nearest_step(position: float) -> int:
    """Round half up (Python's round() is banker's: 16.5 would go to 16)."""
    return math.floor(position + 0.5)


@dataclass(eq=False)  # identity matters: the same pitch may sound twice
class _Live:
    pitch: int  # raw MIDI pitch, for matching note-offs
    onset: int  # step of the note-on
    end: int | None  # step of the note-off (exclusive); None = still held
    cap: int  # an unreleased note is let go here
    seq: int  # arrival order, for polyphony "latest"

    def sounds_at(self, step: int) -> bool:
        end = self.cap if self.end is None else min(self.end, self.cap)
        return self.onset <= step < end


def check_position(position: float) -> float:
    if isinstance(position, bool) or not isinstance(position, int | float):
        raise QuantizeError(f"position must be a number, got {position!r}")
    if not math.isfinite(position) or position < 0:
        raise QuantizeError(f"position must be finite and >= 0, got {position!r}")
    return float(position)


def check_midi(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 127:
        raise QuantizeError(f"{name} must be an int 0..127, got {value!r}")
    return value


class Quantizer:
    """Turns note events into final (step, token) pairs as the clock advances."""

    def __init__(self, polyphony: str = "highest", max_hold_bars: int = 4) -> None:
        if polyphony not in POLYPHONY:
            raise QuantizeError(f"polyphony must be 'highest' or 'latest', not {polyphony!r}")
        if not isinstance(max_hold_bars, int) or not 1 <= max_hold_bars <= 7:
            raise QuantizeError(f"max_hold_bars must be 1..7, got {max_hold_bars!r}")
        self.polyphony = polyphony
        self.max_hold_bars = max_hold_bars
        self._notes: list[_Live] = []
        self._next = 0  # first step not final yet
        self._chosen: _Live | None = None  # the note chosen at step _next - 1
        self._seq = 0

    @property
    def next_step(self) -> int:
        return self._next

    def note_on(self, pitch: int, velocity: int, position: float) -> int:
        """Returns the step the note counts for (velocity 0 = note-off, SPEC section 5)."""
        check_midi("pitch", pitch)
        check_midi("velocity", velocity)
        position = check_position(position)
        if velocity == 0:
            return self.note_off(pitch, position)
        step = nearest_step(position)
        if step < self._next:
            # An event stamped before a step that is already final: the nearest step we can
            # still change is the next one.
            log.debug("late note-on at %.2f moved to step %d", position, self._next)
            step = self._next
        cap = (step // STEPS_PER_BAR + self.max_hold_bars) * STEPS_PER_BAR
        self._seq += 1
        self._notes.append(_Live(pitch, step, None, cap, self._seq))
        return step

    def note_off(self, pitch: int, position: float) -> int:
        """Ends every held note of this pitch; an unmatched note-off is ignored."""
        check_midi("pitch", pitch)
        position = check_position(position)
        step = max(nearest_step(position), self._next)
        for note in self._notes:
            if note.pitch == pitch and note.end is None:
                note.end = max(step, note.onset + 1)  # a note lasts at least one step
        return step

    def sounding(self) -> bool:
        """Is a note held into the next step (so that step's bar is the player's)?"""
        return any(n.sounds_at(self._next) for n in self._notes)

    def _pick(self, candidates: list[_Live]) -> _Live:
        if self.polyphony == "highest":
            return max(candidates, key=lambda n: (fold_pitch(n.pitch), n.onset, n.seq))
        return max(candidates, key=lambda n: (n.onset, n.seq))

    def _token_at(self, step: int) -> int:
        candidates = [n for n in self._notes if n.sounds_at(step)]
        previous = self._chosen
        chosen = self._pick(candidates) if candidates else None
        if (
            chosen is not None
            and previous is not None
            and chosen is not previous
            and chosen.onset == step
            and previous.sounds_at(step)
        ):
            previous.end = step  # cut by the new onset (polyphony rule)
        self._chosen = chosen
        if chosen is None:
            return REST
        if chosen is previous:
            return HOLD
        return pitch_to_token(chosen.pitch)

    def advance(self, position: float) -> list[tuple[int, int]]:
        """Final (step, token) pairs for every step no event can reach any more."""
        upto = nearest_step(check_position(position))
        out = [(step, self._token_at(step)) for step in range(self._next, upto)]
        if upto > self._next:
            self._next = upto
            self._notes = [n for n in self._notes if self._alive(n)]
        return out

    def _alive(self, note: _Live) -> bool:
        # The chosen note is also kept in self._chosen, so a finished note can go.
        end = note.cap if note.end is None else min(note.end, note.cap)
        return end > self._next

    def release_all(self, position: float) -> list[tuple[int, int]]:
        """End every held note at `position` and finalize up to the last note's end."""
        step = max(nearest_step(check_position(position)), self._next)
        last = step
        for note in self._notes:
            if note.end is None:
                note.end = max(step, note.onset + 1)
            last = max(last, min(note.end, note.cap))
        return self.advance(last)

    def reset(self, position: float = 0.0) -> None:
        """Forget everything (transport relocated); later note-offs of old notes are ignored."""
        self._notes.clear()
        self._chosen = None
        self._next = nearest_step(check_position(position))
