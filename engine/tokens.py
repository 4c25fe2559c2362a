"""The paper's melodico-rhythmic encoding (SPEC section 1).

One token per 16th-note step. 32 musical symbols: the pitches 55..84 (30 tokens), a rest
`R` and a hold `__` (the sounding note goes on). The model adds three specials that never
leave the engine: the decoder's start symbol `s`, the prior's positional constraint `p`
(it replaces target tokens), and padding.

Bars are numbered 1..8 where users see them; steps are 0-based everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

PITCH_MIN = 55
PITCH_MAX = 84
N_PITCHES = PITCH_MAX - PITCH_MIN + 1  # 30

REST = N_PITCHES  # 30: `R`
HOLD = N_PITCHES + 1  # 31: `__`
N_SYMBOLS = N_PITCHES + 2  # 32 musical symbols
START = N_SYMBOLS  # 32: decoder start `s`
POS = N_SYMBOLS + 1  # 33: positional constraint `p` (prior input at target positions)
PAD = N_SYMBOLS + 2  # 34
VOCAB_SIZE = N_SYMBOLS + 3  # 35

STEPS_PER_BAR = 16
N_BARS = 8
SEQ_LEN = STEPS_PER_BAR * N_BARS  # 128
MAX_TARGET_BARS = 4

Polyphony = Literal["highest", "latest"]


class TokenError(ValueError):
    """Tokens, bars or notes that do not fit the encoding."""


@dataclass(frozen=True)
class Note:
    """A note on the step grid: sounds from `start` (inclusive) to `end` (exclusive)."""

    pitch: int
    start: int
    end: int
    velocity: int = 96


def fold_pitch(pitch: int) -> int:
    """Fold a MIDI pitch by octaves into 55..84."""
    while pitch < PITCH_MIN:
        pitch += 12
    while pitch > PITCH_MAX:
        pitch -= 12
    return pitch


def pitch_to_token(pitch: int) -> int:
    return fold_pitch(pitch) - PITCH_MIN


def is_pitch(token: int) -> bool:
    return 0 <= token < N_PITCHES


def token_to_pitch(token: int) -> int:
    if not is_pitch(token):
        raise TokenError(f"token {token} is not a pitch token")
    return token + PITCH_MIN


def token_name(token: int) -> str:
    if is_pitch(token):
        return str(token + PITCH_MIN)
    return {REST: "R", HOLD: "__", START: "s", POS: "p", PAD: "<pad>"}.get(token, f"?{token}")


def notes_to_tokens(
    notes: Iterable[Note], n_steps: int, polyphony: Polyphony = "highest"
) -> list[int]:
    """Reduce notes (already on the step grid) to one token per step.

    At each step the chosen sounding note is the highest (or the latest started); a step
    where the chosen note changes gets that note's pitch, a step where it goes on gets
    `__`, a step with nothing sounding gets `R`. Pitches are folded into 55..84.
    """
    if polyphony not in ("highest", "latest"):
        raise TokenError(f"polyphony must be 'highest' or 'latest', not {polyphony!r}")
    # A note shorter than a step after rounding still sounds for one step.
    spans = [(n.start, max(n.end, n.start + 1), fold_pitch(n.pitch), i)
             for i, n in enumerate(notes)]
    tokens = [REST] * n_steps
    previous = None
    for step in range(n_steps):
        sounding = [s for s in spans if s[0] <= step < s[1]]
        if not sounding:
            tokens[step], previous = REST, None
            continue
        if polyphony == "highest":
            chosen = max(sounding, key=lambda s: (s[2], s[0]))
        else:
            chosen = max(sounding, key=lambda s: (s[0], s[2]))
        tokens[step] = HOLD if chosen is previous else chosen[2] - PITCH_MIN
        previous = chosen
    return tokens


def tokens_to_notes(tokens: Sequence[int], velocity: int = 96) -> list[Note]:
    """Expand tokens into notes: a pitch starts a note, `__` extends it, anything else ends it.

    A hold with no sounding note (at the start or after a rest) is silence.
    """
    notes: list[Note] = []
    current: tuple[int, int] | None = None  # (pitch, start)
    for step, token in enumerate(tokens):
        token = int(token)
        if token == HOLD and current is not None:
            continue
        if current is not None:
            notes.append(Note(current[0], current[1], step, velocity))
            current = None
        if is_pitch(token):
            current = (token + PITCH_MIN, step)
    if current is not None:
        notes.append(Note(current[0], current[1], len(tokens), velocity))
    return notes


def validate_tokens(tokens: Sequence[int], length: int = SEQ_LEN) -> list[int]:
    """Check a buffer of musical tokens; returns it as a list of ints."""
    if len(tokens) != length:
        raise TokenError(f"expected {length} tokens, got {len(tokens)}")
    if any(isinstance(t, bool) or int(t) != t for t in tokens):
        raise TokenError("tokens must be whole numbers")
    out = [int(t) for t in tokens]
    bad = [t for t in out if not 0 <= t < N_SYMBOLS]
    if bad:
        raise TokenError(f"tokens must be 0..{N_SYMBOLS - 1} (pitches, R, __); got {bad[:5]}")
    return out


def target_steps(first_bar: int, last_bar: int) -> tuple[int, int]:
    """Bars first..last (1-based, inclusive) -> steps [start, end)."""
    if not (1 <= first_bar <= N_BARS and 1 <= last_bar <= N_BARS):
        raise TokenError(f"bars must be within 1..{N_BARS}, got {first_bar}..{last_bar}")
    if last_bar < first_bar:
        raise TokenError(f"last bar {last_bar} is before first bar {first_bar}")
    if last_bar - first_bar + 1 > MAX_TARGET_BARS:
        raise TokenError(
            f"a target spans at most {MAX_TARGET_BARS} bars, got {first_bar}..{last_bar}")
    return (first_bar - 1) * STEPS_PER_BAR, last_bar * STEPS_PER_BAR


def bar_of_step(step: int) -> int:
    """0-based step -> 1-based bar."""
    return step // STEPS_PER_BAR + 1


def format_tokens(tokens: Sequence[int]) -> str:
    """Human-readable, one bar per `|`."""
    bars = [
        " ".join(token_name(int(t)) for t in tokens[i : i + STEPS_PER_BAR])
        for i in range(0, len(tokens), STEPS_PER_BAR)
    ]
    return " | ".join(bars)
