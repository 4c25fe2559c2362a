"""engine/tokens.py: notes <-> tokens round trips and the errors users see."""

from __future__ import annotations

import random

import pytest

from engine import tokens as tk
from engine.tokens import HOLD, REST, Note, TokenError, notes_to_tokens, tokens_to_notes

P = tk.pitch_to_token  # pitch -> token, for readable expectations


def test_vocabulary_layout() -> None:
    assert (tk.N_PITCHES, REST, HOLD, tk.START, tk.POS, tk.PAD) == (30, 30, 31, 32, 33, 34)
    assert tk.VOCAB_SIZE == 35 and tk.SEQ_LEN == 128 and tk.STEPS_PER_BAR * tk.N_BARS == 128
    assert [tk.token_name(t) for t in (0, 29, REST, HOLD, tk.START, tk.POS, tk.PAD, 99)] == [
        "55", "84", "R", "__", "s", "p", "<pad>", "?99"]


def test_monophonic_round_trip_with_holds_and_rests() -> None:
    notes = [Note(60, 0, 4), Note(62, 4, 5), Note(64, 8, 16)]
    tokens = notes_to_tokens(notes, 16)
    assert tokens == [P(60), HOLD, HOLD, HOLD, P(62), REST, REST, REST] + [P(64)] + [HOLD] * 7
    assert tokens_to_notes(tokens) == notes


def test_repeated_pitch_is_two_notes() -> None:
    notes = [Note(67, 0, 2), Note(67, 2, 4)]
    tokens = notes_to_tokens(notes, 4)
    assert tokens == [P(67), HOLD, P(67), HOLD]
    assert tokens_to_notes(tokens) == notes


@pytest.mark.parametrize(
    ("pitch", "folded"), [(55, 55), (84, 84), (54, 66), (85, 73), (30, 66), (108, 84), (109, 73), (0, 60)]
)
def test_octave_folding(pitch: int, folded: int) -> None:
    assert tk.fold_pitch(pitch) == folded
    assert tokens_to_notes(notes_to_tokens([Note(pitch, 0, 2)], 2)) == [Note(folded, 0, 2)]


def test_short_note_sounds_one_step_and_notes_past_the_end_are_cut() -> None:
    assert notes_to_tokens([Note(60, 3, 3), Note(62, 5, 20)], 8) == [
        REST, REST, REST, P(60), REST, P(62), HOLD, HOLD]


def test_polyphony_highest_takes_the_top_note_and_returns_to_a_lower_one() -> None:
    # A low note held under a short high note: the top line is low, high, low again.
    notes = [Note(60, 0, 8), Note(72, 2, 4)]
    assert notes_to_tokens(notes, 8, "highest") == [
        P(60), HOLD, P(72), HOLD, P(60), HOLD, HOLD, HOLD]
    # Chord: the highest note wins; the lower ones never show.
    chord = [Note(60, 0, 4), Note(64, 0, 4), Note(67, 0, 4)]
    assert notes_to_tokens(chord, 4) == [P(67), HOLD, HOLD, HOLD]


def test_polyphony_latest_takes_the_newest_note() -> None:
    notes = [Note(72, 0, 8), Note(60, 2, 4)]
    assert notes_to_tokens(notes, 8, "latest") == [
        P(72), HOLD, P(60), HOLD, P(72), HOLD, HOLD, HOLD]
    assert notes_to_tokens(notes, 8, "highest") == [P(72)] + [HOLD] * 7
    # Same onset: the higher one.
    assert notes_to_tokens([Note(60, 0, 2), Note(64, 0, 2)], 2, "latest") == [P(64), HOLD]


def test_unknown_polyphony_rule() -> None:
    with pytest.raises(TokenError, match="polyphony"):
        notes_to_tokens([], 4, "lowest")  # type: ignore[arg-type]


def test_hold_without_a_note_is_silence() -> None:
    assert tokens_to_notes([HOLD, HOLD, P(60), REST, HOLD, P(62)]) == [
        Note(60, 2, 3), Note(62, 5, 6)]
    assert tokens_to_notes([REST] * 4) == []


def test_random_monophonic_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(50):
        tokens = [rng.choice(range(tk.N_SYMBOLS)) for _ in range(tk.SEQ_LEN)]
        # Canonical form: a hold needs a sounding note before it.
        for i, t in enumerate(tokens):
            if t == HOLD and (i == 0 or tokens[i - 1] == REST):
                tokens[i] = REST
        notes = tokens_to_notes(tokens)
        assert notes_to_tokens(notes, tk.SEQ_LEN) == tokens
        assert notes_to_tokens(notes, tk.SEQ_LEN, "latest") == tokens


def test_token_to_pitch_rejects_non_pitches() -> None:
    assert tk.token_to_pitch(0) == 55 and tk.token_to_pitch(29) == 84
    for bad in (REST, HOLD, -1, 30):
        with pytest.raises(TokenError):
            tk.token_to_pitch(bad)


def test_validate_tokens() -> None:
    good = [P(60)] + [HOLD] * 127
    assert tk.validate_tokens(good) == good
    with pytest.raises(TokenError, match="expected 128 tokens, got 127"):
        tk.validate_tokens(good[:-1])
    for special in (tk.START, tk.POS, tk.PAD, -1):
        with pytest.raises(TokenError, match="0..31"):
            tk.validate_tokens(good[:-1] + [special])
    assert tk.validate_tokens([REST] * 4, length=4) == [REST] * 4


@pytest.mark.parametrize(
    ("first", "last", "steps"), [(1, 1, (0, 16)), (5, 8, (64, 128)), (2, 3, (16, 48))]
)
def test_target_steps(first: int, last: int, steps: tuple[int, int]) -> None:
    assert tk.target_steps(first, last) == steps
    assert tk.bar_of_step(steps[0]) == first and tk.bar_of_step(steps[1] - 1) == last


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [(0, 1, "within 1..8"), (8, 9, "within 1..8"), (3, 2, "before"), (1, 5, "at most 4")],
)
def test_target_steps_errors(first: int, last: int, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        tk.target_steps(first, last)


def test_format_tokens_one_bar_per_bar_line() -> None:
    text = tk.format_tokens([P(60), HOLD] + [REST] * 14 + [P(84)] + [HOLD] * 15)
    assert text.count("|") == 1 and text.startswith("60 __ R") and "| 84 __" in text


def test_validate_tokens_refuses_fractions_and_bools():
    import pytest

    from engine.tokens import TokenError, validate_tokens

    with pytest.raises(TokenError, match="whole numbers"):
        validate_tokens([0.5] + [0] * 127)
    with pytest.raises(TokenError, match="whole numbers"):
        validate_tokens([True] + [0] * 127)
    assert validate_tokens([3.0] + [0] * 127)[0] == 3
