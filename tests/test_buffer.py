"""Performance: loop and follow modes, ownership, requests, history (SPEC sections 3-5)."""

import copy
import json

import numpy as np
import pytest

from daemon.buffer import (
    GenerationRequest,
    HistoryError,
    Performance,
    PerformanceError,
    RequestError,
    ResultError,
    StaleRequestError,
    run_request,
)
from engine.tokens import HOLD, REST, pitch_to_token
from tests.fakes import FakeEngine, FakeGeneration


def play(perf: Performance, notes, until: float) -> None:
    """notes: (pitch, start, end) in absolute steps; advances the clock step by step."""
    events = [(s, "on", p) for p, s, _ in notes] + [(e, "off", p) for p, _, e in notes]
    events.sort(key=lambda e: (e[0], e[1] == "on"))
    step = perf._position
    for pos, kind, pitch in events:
        while step + 1 <= pos:
            step += 1
            perf.advance(step)
        if kind == "on":
            perf.note_on(pitch, 90, pos)
        else:
            perf.note_off(pitch, pos)
    while step + 1 <= until:
        step += 1
        perf.advance(step)


def generate(perf: Performance, engine: FakeEngine, kind="regenerate", **params):
    request = perf.make_request(kind, **params)
    gens = run_request(engine, request)
    perf.apply(request, gens)
    return request, gens


def state(perf: Performance) -> dict:
    return copy.deepcopy(perf.snapshot())


# ----- loop mode --------------------------------------------------------------------------
def test_player_input_writes_its_bar_and_owns_it():
    perf = Performance()
    play(perf, [(60, 16, 20), (62, 20, 22)], until=40)
    snap = perf.snapshot()
    assert snap["owners"] == ["empty", "player"] + ["empty"] * 6
    assert snap["tokens"][16:24] == [pitch_to_token(60), HOLD, HOLD, HOLD, pitch_to_token(62),
                                     HOLD, REST, REST]
    assert snap["tokens"][:16] == [REST] * 16
    json.dumps(snap)  # JSON-able as it is


def test_loop_wraps_and_untouched_bars_keep_their_take():
    perf = Performance()
    play(perf, [(64, 2, 4)], until=16)
    play(perf, [(67, 128 + 16 + 3, 128 + 16 + 5)], until=128 + 40)  # second pass: bar 2 only
    tokens = perf.snapshot()["tokens"]
    assert tokens[2] == pitch_to_token(64)  # bar 1 untouched on pass 2: kept
    assert tokens[19] == pitch_to_token(67)


def test_regenerate_request_has_context_and_target_then_apply_plays_it():
    perf = Performance()
    play(perf, [(60, 0, 8), (72, 100, 110)], until=127)
    perf.set_target(5, 2)
    engine = FakeEngine()
    request, gens = generate(perf, engine, seed=3)
    assert (request.first_bar, request.last_bar, request.kind) == (5, 6, "regenerate")
    assert len(request.tokens) == 128 and request.tokens[0] == pitch_to_token(60)
    assert request.tokens[100] == pitch_to_token(72)  # right context (bar 7) is in
    call = engine.calls[0][1]
    assert (call["first_bar"], call["last_bar"], call["seed"]) == (5, 6, 3)
    snap = perf.snapshot()
    assert snap["owners"][4:6] == ["coperformer"] * 2
    assert snap["tokens"][64:96] == gens[0].tokens
    assert snap["owners"][0] == snap["owners"][6] == "player"
    tok, version, _ = perf.output_token(64 + 128 * 3)  # every pass plays it
    assert tok == gens[0].tokens[0]
    assert perf.output_token(95)[1] == version  # one version over the candidate's bars
    assert perf.output_token(0) is None and perf.output_token(40) is None


def test_content_version_changes_on_new_candidate_clear_and_player_overwrite():
    perf = Performance(target=(3, 1))
    engine = FakeEngine()
    generate(perf, engine, seed=1)
    v1 = perf.output_token(32)[1]
    generate(perf, engine, seed=2)
    v2 = perf.output_token(32)[1]
    assert v2 != v1
    assert perf.clear() == 1
    assert perf.output_token(32) is None and perf.snapshot()["owners"][2] == "empty"
    perf.undo()  # back to candidate 1: new content under the step, new version
    assert perf.output_token(32)[1] not in (v1, v2)


def test_player_playing_into_a_coperformer_bar_silences_it_at_once():
    perf = Performance(target=(2, 1))
    generate(perf, FakeEngine(), seed=5)
    play(perf, [], until=20)
    assert perf.output_token(21) is not None
    perf.note_on(65, 100, 20.6)  # counts for step 21, the bar is the player's from now
    assert perf.output_token(22) is None
    play(perf, [], until=40)
    snap = perf.snapshot()
    assert snap["owners"][1] == "player"
    assert snap["tokens"][16:21] == [REST] * 5 and snap["tokens"][21] == pitch_to_token(65)


def test_result_for_a_bar_being_recorded_leaves_the_take_alone():
    perf = Performance(target=(1, 2))
    perf.note_on(60, 90, 3.0)
    play(perf, [], until=5)
    generate(perf, FakeEngine(), seed=1)
    snap = perf.snapshot()
    assert snap["owners"][:2] == ["player", "coperformer"]
    assert snap["tokens"][3] == pitch_to_token(60)


def test_clear_keeps_player_bars():
    perf = Performance(target=(1, 2))
    generate(perf, FakeEngine(), seed=1)
    play(perf, [(60, 20, 22)], until=40)
    assert perf.clear(1, 2) == 1
    assert perf.snapshot()["owners"][:2] == ["empty", "player"]


# ----- follow mode ------------------------------------------------------------------------
def test_follow_buffer_rolls_with_the_last_eight_bars():
    perf = Performance(mode="follow")
    play(perf, [(60, 0, 4)], until=1)
    assert perf.snapshot()["owners"][7] == "player"  # bar now playing = buffer bar 8
    play(perf, [], until=16)
    snap = perf.snapshot()
    assert snap["owners"][6:] == ["player", "empty"]
    assert snap["tokens"][96] == pitch_to_token(60)
    play(perf, [], until=16 * 8)
    assert perf.snapshot()["owners"] == ["empty"] * 8  # rolled out


def test_follow_request_is_left_context_only_and_plays_on_the_upcoming_bars():
    perf = Performance(mode="follow", target=(1, 2))
    play(perf, [(60 + i % 12, 16 * i, 16 * i + 8) for i in range(11)], until=16 * 10 + 6)
    before = perf.snapshot()["tokens"]
    engine = FakeEngine()
    request, gens = generate(perf, engine, seed=4)
    assert (request.first_bar, request.last_bar) == (7, 8)
    assert list(request.tokens) == before[32:] + [REST] * 32  # last 6 bars + placeholders
    assert perf.snapshot()["tokens"] == before  # nothing shows before its bars come
    assert perf.output_token(16 * 10 + 8) is None  # the bar now playing is the player's
    assert perf.output_token(16 * 11)[0] == gens[0].tokens[0]
    assert perf.output_token(16 * 12 + 15)[0] == gens[0].tokens[31]
    play(perf, [], until=16 * 12 + 1)
    snap = perf.snapshot()
    assert snap["owners"][6:] == ["coperformer", "coperformer"]
    assert snap["tokens"][96:128] == gens[0].tokens


def test_follow_player_takes_an_upcoming_response_bar():
    perf = Performance(mode="follow", target=(1, 1))
    play(perf, [], until=5)
    generate(perf, FakeEngine(), seed=1)
    assert perf.output_token(16) is not None
    perf.note_on(70, 90, 15.8)  # early note for the response's first step
    assert perf.output_token(16) is None
    play(perf, [], until=20)
    assert perf.snapshot()["owners"][7] == "player"


def test_mode_change_keeps_the_music_and_drops_pending_results():
    perf = Performance(target=(3, 1))
    play(perf, [(60, 0, 4)], until=16 * 3 + 2)  # now in bar 4 (absolute bar 3)
    generate(perf, FakeEngine(), seed=1)
    request = perf.make_request("regenerate", seed=2)
    perf.set_mode("follow")
    snap = perf.snapshot()
    # Window = absolute bars -4..3: loop bar 1 (abs 0) is buffer bar 5, loop bar 3 is bar 7.
    assert snap["owners"][4] == "player" and snap["owners"][6] == "coperformer"
    with pytest.raises(StaleRequestError):
        perf.apply(request, run_request(FakeEngine(), request))
    assert perf.snapshot() == snap
    perf.set_mode("loop")
    assert perf.snapshot()["owners"][0] == "player"
    assert perf.snapshot()["owners"][2] == "coperformer"


# ----- history ----------------------------------------------------------------------------
def test_history_regenerate_then_undo_back_to_what_was_there():
    perf = Performance(target=(2, 1))
    play(perf, [(60, 16, 30)], until=40)
    before = perf.snapshot()["tokens"][16:32]
    engine = FakeEngine()
    _, g1 = generate(perf, engine, seed=1)
    _, g2 = generate(perf, engine, seed=2)
    assert perf.snapshot()["history"] == {"length": 2, "index": 1}
    assert perf.undo() and perf.snapshot()["tokens"][16:32] == g1[0].tokens
    assert perf.undo() and perf.snapshot()["tokens"][16:32] == before
    assert perf.snapshot()["owners"][1] == "player"
    assert not perf.undo()


def test_interpolate_between_the_two_latest_candidates():
    perf = Performance(target=(1, 2))
    engine = FakeEngine()
    with pytest.raises(HistoryError):
        perf.make_request("interpolate", alpha=0.5)
    _, ga = generate(perf, engine, seed=1)
    with pytest.raises(HistoryError, match="two different"):
        perf.make_request("interpolate", alpha=0.5)
    _, gb = generate(perf, engine, seed=2)
    request, _ = generate(perf, engine, "interpolate", alpha=0.0)
    assert np.array_equal(request.params["z_a"], ga[0].z)
    assert np.array_equal(request.params["z_b"], gb[0].z)
    assert perf.snapshot()["tokens"][:32] == ga[0].tokens  # alpha 0 = A (fake engine)
    for alpha in (0.25, 0.5, 1.0):  # a knob sweep is one history entry
        generate(perf, engine, "interpolate", alpha=alpha)
    snap = perf.snapshot()
    assert snap["history"] == {"length": 3, "index": 2} and snap["alpha"] == 1.0
    assert snap["tokens"][:32] == gb[0].tokens
    request = perf.make_request("interpolate", alpha=0.5)  # anchors stay A and B
    assert np.array_equal(request.params["z_a"], ga[0].z)
    assert perf.next_alpha(1, 8) == 1.0 and perf.next_alpha(-1, 8) == 0.875


def test_vary_perturbs_the_current_candidate():
    perf = Performance(target=(4, 1))
    engine = FakeEngine()
    _, g = generate(perf, engine, seed=1)
    generate(perf, engine, "vary", delta=0.5, seed=9)
    varied = perf.snapshot()["tokens"][48:64]
    assert varied != g[0].tokens
    request, _ = generate(perf, engine, "vary", delta=1.0, seed=9)
    assert np.array_equal(request.params["z"], g[0].z)  # still perturbs the same parent
    snap = perf.snapshot()
    assert snap["delta"] == 1.0 and snap["history"]["length"] == 2
    assert engine.calls[-1][0] == "vary" and engine.calls[-1][1]["delta"] == 1.0


def test_reroll_draws_again_when_identical_to_a_candidate():
    perf = Performance(target=(1, 1))
    engine = FakeEngine(period=2)  # seeds 0, 2, 4 ... all give the same roll
    _, g1 = generate(perf, engine, seed=0)
    assert perf.is_duplicate(g1[0].tokens)
    request = perf.make_request("regenerate", seed=2)
    assert request.known == {tuple(g1[0].tokens)}
    gens = run_request(engine, request)
    assert [c[1]["seed"] for c in engine.calls[1:]] == [2, 2 + 7919]
    assert gens[0].tokens != g1[0].tokens and not perf.is_duplicate(gens[0].tokens)


# ----- bad input leaves the state unchanged -----------------------------------------------
@pytest.mark.parametrize(
    "kind, params",
    [("sing", {}), ("regenerate", {"alpha": 1}), ("regenerate", {"seed": -1}),
     ("regenerate", {"seed": True}), ("regenerate", {"first_bar": 7, "bars": 3}),
     ("regenerate", {"bars": 5}), ("regenerate", {"temperature": -0.1}),
     ("interpolate", {"alpha": 1.5}), ("vary", {"delta": -1}), ("vary", {})],
)
def test_bad_requests_are_refused(kind, params):
    perf = Performance(target=(2, 1))
    generate(perf, FakeEngine(), seed=1)
    generate(perf, FakeEngine(), seed=2)
    before = state(perf)
    with pytest.raises(PerformanceError):
        perf.make_request(kind, **params)
    assert perf.snapshot() == before


@pytest.mark.parametrize(
    "tokens, bars",
    [([0] * 15, (2, 2)), ([40] * 16, (2, 2)), ([0] * 16, (3, 3)), (None, (2, 2))],
)
def test_bad_results_are_refused(tokens, bars):
    perf = Performance(target=(2, 1))
    request = perf.make_request("regenerate", seed=1)
    before = state(perf)
    gen = FakeGeneration(tokens, bars[0], bars[1], np.zeros(8))
    with pytest.raises(ResultError):
        perf.apply(request, [gen])
    with pytest.raises(ResultError):
        perf.apply(request, [])
    assert perf.snapshot() == before


@pytest.mark.parametrize(
    "call",
    [lambda p: p.set_target(0, 1), lambda p: p.set_target(6, 4), lambda p: p.set_mode("jam"),
     lambda p: p.clear(bars=2), lambda p: p.clear(9, 1), lambda p: p.note_on(60, 90, -1.0),
     lambda p: p.note_on(300, 90, 1.0), lambda p: p.output_token(-1),
     lambda p: p.set_record("yes"), lambda p: p.update_target(bars=0)],
)
def test_bad_calls_are_refused(call):
    perf = Performance(target=(2, 1))
    before = state(perf)
    with pytest.raises(ValueError):
        call(perf)
    assert perf.snapshot() == before


def test_update_target_moves_the_start_to_fit():
    perf = Performance(target=(2, 1))
    perf.update_target(bars=4)
    perf.update_target(first_bar=8)
    assert perf.snapshot()["target"] == {"first_bar": 5, "bars": 4}


def test_record_off_ignores_input():
    perf = Performance(record=False)
    play(perf, [(60, 2, 4)], until=20)
    assert perf.snapshot()["owners"] == ["empty"] * 8


def test_request_is_frozen_and_serials_increase():
    perf = Performance()
    a = perf.make_request("regenerate")
    b = perf.make_request("regenerate")
    assert isinstance(a, GenerationRequest) and b.serial > a.serial
    with pytest.raises(AttributeError):
        a.kind = "vary"
    assert isinstance(RequestError("x"), ValueError)


def test_follow_relocation_drops_pending_responses_and_old_histories():
    perf = Performance(mode="follow", target=(1, 1))
    play(perf, [], until=5)
    request = perf.make_request("regenerate", seed=1)
    generate(perf, FakeEngine(), seed=2)
    assert perf.output_token(16) is not None
    perf.advance(0.0)  # transport restarted
    assert perf.output_token(16) is None and perf.snapshot()["history"]["length"] == 0
    with pytest.raises(StaleRequestError):
        perf.apply(request, run_request(FakeEngine(), request))


def test_follow_histories_are_forgotten_once_their_bars_roll_out():
    perf = Performance(mode="follow", target=(1, 1))
    generate(perf, FakeEngine(), seed=1)
    play(perf, [], until=16 * 2)
    assert perf.snapshot()["history"]["length"] == 1  # response in the window: undo-able
    play(perf, [], until=16 * 10)
    assert perf.snapshot()["history"]["length"] == 0 and perf._histories == {}


def test_follow_regenerate_can_change_the_length_alone():
    # Follow mode has no start bar: {"bars": 3} must not fail on the 1-bar target's start (8).
    perf = Performance(mode="follow", target=(1, 1))
    play(perf, [], until=16 * 2 + 3)
    request = perf.make_request("regenerate", seed=1, bars=3)
    assert (request.first_bar, request.last_bar) == (6, 8)
    assert request.key == ("follow", 3, 3)
    assert perf.target == (6, 3)


def test_vary_without_a_seed_keeps_one_direction_per_parent():
    # The engine draws a fresh random eps on seed=None: a delta sweep (knob) would jump
    # between unrelated variations instead of moving away from the candidate along one.
    perf = Performance(target=(2, 1))
    engine = FakeEngine()
    generate(perf, engine, seed=1)
    first, _ = generate(perf, engine, "vary", delta=0.3)
    second, _ = generate(perf, engine, "vary", delta=0.9)
    assert first.params["seed"] is not None
    assert second.params["seed"] == first.params["seed"]
    assert engine.calls[-1][1]["seed"] == first.params["seed"]
    generate(perf, engine, seed=2)  # a new candidate: a new direction
    third, _ = generate(perf, engine, "vary", delta=0.3)
    assert third.params["seed"] not in (None, first.params["seed"])
