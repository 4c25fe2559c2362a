"""Hand-over between the player and the co-performer (SPEC section 3, "Hand-over").

A player claims a co-performer bar only by a note onset inside it; a note that began before
the bar and ends within the quantizer's tolerance of its line (half a step) claims nothing and
silences nothing. The clock plans step k shortly before k (here: at k - 0.12, 15 ms at
120 bpm), so `output_token(k)` is asked while such a note may still be held.
"""

import pytest

from daemon.buffer import Performance
from engine.tokens import HOLD, REST, is_pitch, pitch_to_token
from tests.fakes import FakeEngine
from tests.test_buffer import generate, play

LINE = 16  # bar 2 starts here; the co-performer's bar in these tests


def coperformer_bar_2(seed: int = 3) -> tuple[Performance, list[int]]:
    perf = Performance(target=(2, 1))
    _, gens = generate(perf, FakeEngine(), seed=seed)
    assert is_pitch(gens[0].tokens[0]), "pick a seed whose bar starts with a note"
    return perf, gens[0].tokens


@pytest.mark.parametrize("release", [LINE - 0.45, LINE - 0.1, LINE, LINE + 0.1, LINE + 0.45])
def test_a_note_released_within_tolerance_of_the_line_claims_and_silences_nothing(release):
    perf, tokens = coperformer_bar_2()
    perf.note_on(60, 90, 8.0)  # bar 1 step 8, held towards the line
    play(perf, [], until=LINE - 1)
    # The plan for the bar's first step is made while the note is still down.
    assert perf.output_token(LINE)[:2] == (tokens[0], perf.output_token(LINE + 1)[1])
    play(perf, [], until=int(release))
    perf.note_off(60, release)
    play(perf, [], until=LINE + 4)
    snap = perf.snapshot()
    assert snap["owners"][:2] == ["player", "coperformer"]
    assert snap["tokens"][LINE:LINE + 16] == tokens  # the candidate is intact
    assert snap["tokens"][8:LINE] == [pitch_to_token(60)] + [HOLD] * 7
    for step in (LINE, LINE + 1, LINE + 15, LINE + 128):  # this pass and the next
        assert perf.output_token(step)[0] == tokens[step % 16]


def test_a_note_held_well_into_a_coperformer_bar_does_not_claim_it():
    perf, tokens = coperformer_bar_2()
    play(perf, [(60, 8.0, LINE + 3.2)], until=LINE + 8)
    snap = perf.snapshot()
    assert snap["owners"][1] == "coperformer" and snap["tokens"][LINE:LINE + 16] == tokens
    assert perf.output_token(LINE + 5)[0] == tokens[5]


def test_an_onset_inside_the_bar_claims_it_and_keeps_the_held_note_before_it():
    perf, tokens = coperformer_bar_2()
    play(perf, [(60, 8.0, LINE + 3.2)], until=LINE + 4)
    perf.note_on(62, 90, LINE + 3.6)  # counts for step LINE + 4: the bar is the player's
    assert perf.output_token(LINE + 5) is None
    play(perf, [], until=LINE + 6)
    perf.note_off(62, LINE + 6.0)
    play(perf, [], until=LINE + 16)
    snap = perf.snapshot()
    assert snap["owners"][1] == "player"
    assert snap["tokens"][LINE:LINE + 8] == [HOLD] * 3 + [REST, pitch_to_token(62), HOLD,
                                                           REST, REST]
    assert perf.output_token(LINE + 128) is None  # the next pass too


def test_an_early_onset_for_the_bars_first_step_claims_it():
    perf, _ = coperformer_bar_2()
    perf.note_on(64, 90, LINE - 0.3)  # rounds to the line: an onset inside the bar
    assert perf.output_token(LINE) is None
    play(perf, [], until=LINE + 2)
    perf.note_off(64, LINE + 2.0)
    play(perf, [], until=LINE + 4)
    assert perf.snapshot()["owners"][1] == "player"


def test_a_note_held_into_an_empty_bar_still_records_there():
    perf = Performance()
    play(perf, [(60, 8.0, LINE + 3.2)], until=LINE + 8)
    snap = perf.snapshot()
    assert snap["owners"][:2] == ["player", "player"]
    assert snap["tokens"][LINE:LINE + 4] == [HOLD, HOLD, HOLD, REST]


def test_a_release_within_tolerance_does_not_claim_an_empty_bar():
    perf = Performance()
    play(perf, [(60, 8.0, LINE + 0.4)], until=LINE + 8)
    assert perf.snapshot()["owners"][:2] == ["player", "empty"]


def test_follow_a_calls_last_note_ending_before_the_line_keeps_the_responses_first_note():
    perf = Performance(mode="follow", target=(1, 1))
    perf.note_on(60, 90, 4.0)
    play(perf, [], until=6)
    _, gens = generate(perf, FakeEngine(), seed=3)  # the response: bar 2, after the line
    tokens = gens[0].tokens
    play(perf, [], until=LINE - 1)
    assert perf.output_token(LINE)[0] == tokens[0]  # planned while the call's note is down
    perf.note_off(60, LINE - 0.1)
    play(perf, [], until=LINE + 2)
    snap = perf.snapshot()
    assert snap["owners"][6:] == ["player", "coperformer"]
    assert snap["tokens"][112:128] == tokens


# ----- a candidate arriving while its bar plays -------------------------------------------
def test_output_names_the_note_a_hold_continues_within_its_candidate():
    perf = Performance(target=(2, 2))
    request = perf.make_request("regenerate", seed=1, temperature=0.0)
    _, gens = generate(perf, FakeEngine(), seed=1, temperature=0.0)  # a held note per bar
    tokens = gens[0].tokens
    assert request.bars == 2 and tokens[1] == HOLD
    assert perf.output_token(LINE) == (tokens[0], perf.output_token(LINE)[1], tokens[0])
    assert perf.output_token(LINE + 5)[2] == tokens[0]
    assert perf.output_token(LINE + 16 + 3)[2] == tokens[16]
    assert perf.output_token(LINE + 128 + 9)[2] == tokens[0]  # every pass


def test_a_leading_hold_continues_nothing_and_the_players_bar_is_a_boundary():
    perf = Performance(target=(2, 1))
    perf.set_target(2, 1)
    engine = FakeEngine()
    _, gens = generate(perf, engine, seed=1, temperature=0.0)
    perf.set_target(3, 1)
    request = perf.make_request("regenerate", seed=2, temperature=0.0)
    perf.apply(request, [engine.infill(request.tokens, 3, 3, seed=2, temperature=0.0)])
    # bar 3 is another candidate (another version): its steps continue only its own note
    assert perf.output_token(2 * 16 + 4)[2] == perf.snapshot()["tokens"][32]
    tokens = list(gens[0].tokens)
    tokens[0] = HOLD  # a candidate that starts by holding: continues nothing of its own
    perf.set_target(2, 1)
    request = perf.make_request("regenerate", seed=3)
    perf.apply(request, [type(gens[0])(tokens, 2, 2, gens[0].z)])
    assert perf.output_token(LINE + 3) == (HOLD, perf.output_token(LINE)[1], None)
