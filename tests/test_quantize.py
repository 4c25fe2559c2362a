"""Quantizer: rounding, velocity 0, unreleased notes, polyphony (SPEC sections 1, 5)."""

import pytest

from daemon.quantize import QuantizeError, Quantizer, nearest_step
from engine.tokens import HOLD, REST, Note, notes_to_tokens, pitch_to_token


def run(q: Quantizer, events, until: float) -> list[int]:
    """Feed (kind, pitch, velocity, position) events in time order; tokens of steps 0..until."""
    tokens: dict[int, int] = {}
    for kind, pitch, velocity, position in sorted(events, key=lambda e: e[3]):
        for step, tok in q.advance(position):
            tokens[step] = tok
        if kind == "on":
            q.note_on(pitch, velocity, position)
        else:
            q.note_off(pitch, position)
    for step, tok in q.advance(until):
        tokens[step] = tok
    return [tokens[s] for s in sorted(tokens)]


def test_nearest_step_rounds_half_up():
    assert [nearest_step(p) for p in (0.0, 0.49, 0.5, 1.5, 2.5, 15.6)] == [0, 0, 1, 2, 3, 16]


def test_early_note_counts_for_the_step_it_anticipates():
    q = Quantizer()
    # Played 0.3 step early for step 4, released 0.2 step early for step 8.
    out = run(q, [("on", 60, 90, 3.7), ("off", 60, 0, 7.8)], until=10)
    assert out == [REST] * 4 + [pitch_to_token(60)] + [HOLD] * 3 + [REST, REST]


def test_late_note_counts_for_the_step_just_passed():
    q = Quantizer()
    out = run(q, [("on", 62, 90, 4.4), ("off", 62, 0, 6.2)], until=8)
    assert out[4] == pitch_to_token(62) and out[5] == HOLD and out[6] == REST


def test_step_final_only_when_no_event_can_round_onto_it():
    q = Quantizer()
    assert q.advance(3.0) == [(0, REST), (1, REST), (2, REST)]
    q.note_on(64, 80, 3.3)  # still counts for step 3 although the clock is at 3.3
    assert q.advance(4.0) == [(3, pitch_to_token(64))]


def test_velocity_zero_note_on_is_a_note_off():
    q = Quantizer()
    out = run(q, [("on", 60, 90, 0.0), ("on", 60, 0, 2.0)], until=4)
    assert out == [pitch_to_token(60), HOLD, REST, REST]


def test_note_shorter_than_a_step_still_sounds_one_step():
    q = Quantizer()
    out = run(q, [("on", 70, 90, 2.0), ("off", 70, 0, 2.2)], until=4)
    assert out == [REST, REST, pitch_to_token(70), REST]


def test_unreleased_note_is_let_go_at_a_bar_line():
    q = Quantizer(max_hold_bars=2)
    out = run(q, [("on", 60, 90, 5.0)], until=40)
    # Started in bar 0: held to the end of bar 1 (step 32), then rest.
    assert out[5] == pitch_to_token(60)
    assert out[6:32] == [HOLD] * 26
    assert out[32:] == [REST] * 8


def test_unreleased_note_is_cut_by_the_next_onset_and_does_not_come_back():
    q = Quantizer(polyphony="latest")
    # 60 is never released; 64 takes over at step 4 and is released at step 6.
    out = run(q, [("on", 60, 90, 0.0), ("on", 64, 90, 4.0), ("off", 64, 0, 6.0)], until=10)
    assert out == [pitch_to_token(60), HOLD, HOLD, HOLD, pitch_to_token(64), HOLD] + [REST] * 4


@pytest.mark.parametrize("polyphony", ["highest", "latest"])
def test_polyphony_matches_file_encoding_for_released_notes(polyphony):
    notes = [Note(60, 0, 8), Note(67, 2, 4), Note(55, 5, 7), Note(72, 9, 12), Note(64, 10, 14)]
    events = []
    for n in notes:
        events += [("on", n.pitch, 90, float(n.start)), ("off", n.pitch, 0, float(n.end))]
    live = run(Quantizer(polyphony), events, until=16)
    offline = notes_to_tokens(notes, 16, polyphony)
    # The live rule cuts a note replaced by a new onset (60 at step 2); the file rule lets it
    # resume. Everywhere else they agree.
    t = pitch_to_token
    if polyphony == "highest":
        assert offline[4:8] == [t(60), HOLD, HOLD, HOLD]
        assert live[4:8] == [REST, t(55), HOLD, REST]
        differ = {4, 5, 6, 7}
    else:
        assert offline[4] == t(60) and offline[7] == t(60)
        assert live[4] == REST and live[7] == REST
        differ = {4, 7}
    assert [x for i, x in enumerate(live) if i not in differ] == [
        x for i, x in enumerate(offline) if i not in differ
    ]


def test_highest_ignores_lower_note_then_it_takes_over():
    q = Quantizer("highest")
    out = run(q, [("on", 72, 90, 0.0), ("on", 60, 90, 1.0), ("off", 72, 0, 3.0),
                  ("off", 60, 0, 5.0)], until=6)
    assert out == [pitch_to_token(72), HOLD, HOLD, pitch_to_token(60), HOLD, REST]


def test_pitches_fold_into_range():
    q = Quantizer()
    out = run(q, [("on", 40, 90, 0.0), ("off", 40, 0, 1.0), ("on", 100, 90, 1.0),
                  ("off", 100, 0, 2.0)], until=2)
    assert out == [pitch_to_token(64 - 12), pitch_to_token(100 - 24)]
    assert out == [pitch_to_token(40), pitch_to_token(100)]


def test_release_all_ends_held_notes():
    q = Quantizer()
    q.note_on(60, 90, 0.0)
    out = q.release_all(3.0)
    assert [t for _, t in out] == [pitch_to_token(60), HOLD, HOLD]
    assert not q.sounding()


@pytest.mark.parametrize(
    "args",
    [(128, 90, 0.0), (-1, 90, 0.0), (60, 200, 0.0), (60, 90, -1.0), (60, 90, float("nan")),
     (60.0, 90, 0.0), (60, True, 0.0), (60, 90, "1")],
)
def test_bad_note_events_are_refused_and_change_nothing(args):
    q = Quantizer()
    with pytest.raises(QuantizeError):
        q.note_on(*args)
    assert q.advance(2.0) == [(0, REST), (1, REST)]


def test_bad_polyphony_is_refused():
    with pytest.raises(QuantizeError, match="polyphony"):
        Quantizer("lowest")
