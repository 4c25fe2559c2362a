"""Scheduler: tokens -> notes, planned ahead, fired on time; never a hanging or doubled note."""

from __future__ import annotations

import random

import mido

from daemon.scheduler import Scheduler
from engine.tokens import HOLD, PITCH_MIN, REST


class Out:
    def __init__(self) -> None:
        self.sent: list[mido.Message] = []

    def __call__(self, msg: mido.Message) -> None:
        self.sent.append(msg)

    def notes(self) -> list[tuple[str, int]]:
        return [("on" if m.type == "note_on" and m.velocity else "off", m.note) for m in self.sent]


def run(s: Scheduler, outputs: list[tuple[int, int] | None], start: int = 0) -> None:
    for i, output in enumerate(outputs):
        s.plan(start + i, output)
        s.fire(start + i)


def test_pitch_hold_rest_make_notes() -> None:
    out = Out()
    s = Scheduler(out, channel=3, velocity=90)
    run(s, [(0, 1), (HOLD, 1), (HOLD, 1), (5, 1), (REST, 1), (HOLD, 1)])
    assert out.notes() == [("on", PITCH_MIN), ("off", PITCH_MIN), ("on", PITCH_MIN + 5),
                           ("off", PITCH_MIN + 5)]
    assert all(m.channel == 2 for m in out.sent)
    assert out.sent[0].velocity == 90
    assert s.sounding is None


def test_hold_of_another_version_ends_the_note() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(7, 1), (HOLD, 2)])  # new content under the hold: it does not continue the note
    assert out.notes() == [("on", PITCH_MIN + 7), ("off", PITCH_MIN + 7)]


def test_not_ours_ends_the_note_and_repeated_pitch_retriggers() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(3, 1), (3, 1), None])
    assert out.notes() == [("on", 58), ("off", 58), ("on", 58), ("off", 58)]


def test_late_plan_is_dropped_not_played_late() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(0, 1)])
    s.fire(1)  # step 1 sounded before its plan came
    assert s.plan(1, (9, 1)) is None
    assert out.notes() == [("on", 55)]
    s.plan(2, (HOLD, 2))  # the new content's hold does not continue the old note
    s.fire(2)
    assert out.notes() == [("on", 55), ("off", 55)]
    assert s.dropped_plans == 1


def test_plan_on_a_plan_that_never_fired_is_decided_again() -> None:
    out = Out()
    s = Scheduler(out)
    s.plan(0, (1, 1))
    s.plan(1, (HOLD, 1))  # built on step 0's note...
    s.fire(1)  # ...but step 0 never fired: no note may be "held" that never started
    assert out.notes() == []
    assert s.sounding is None


def test_all_notes_off_ends_the_note_and_forgets_plans() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(4, 1)])
    s.plan(1, (HOLD, 1))
    s.all_notes_off()
    s.fire(1)
    assert out.notes() == [("on", 59), ("off", 59)]


def test_reset_position_lets_steps_repeat() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(4, 1), (REST, 1)])
    s.reset_position()
    run(s, [(6, 1)])
    assert out.notes()[-1] == ("on", 61)


def test_random_streams_never_hang_or_double() -> None:
    rng = random.Random(3)
    out = Out()
    s = Scheduler(out)
    for step in range(3000):
        roll = rng.random()
        if roll < 0.1:
            output = None
        else:
            token = rng.choice([0, 5, 12, 29, REST, HOLD, HOLD, HOLD])
            output = (token, rng.choice([1, 1, 1, 2]))
        if rng.random() < 0.9:  # sometimes the loop misses a step
            s.plan(step, output)
        if rng.random() < 0.02:
            s.all_notes_off()
        s.fire(step)
        on = set()
        for kind, note in out.notes():
            if kind == "on":
                assert not on, "a second note started while one sounds"
                on.add(note)
            else:
                on.discard(note)
        assert len(on) <= 1
    s.all_notes_off()
    on = set()
    for kind, note in out.notes():
        (on.add if kind == "on" else on.discard)(note)
    assert on == set()


def test_new_content_arriving_mid_note_starts_the_note_it_holds() -> None:
    # (token, version, pitch token of the note the step belongs to), as output_token gives it.
    out = Out()
    s = Scheduler(out)
    run(s, [(7, 1, 7), (HOLD, 1, 7), (HOLD, 2, 12), (HOLD, 2, 12), (3, 2, 3)])
    assert out.notes() == [("on", PITCH_MIN + 7), ("off", PITCH_MIN + 7),
                           ("on", PITCH_MIN + 12), ("off", PITCH_MIN + 12), ("on", PITCH_MIN + 3)]


def test_a_hold_of_the_same_content_whose_onset_was_missed_stays_silent() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(REST, 1, None)])
    s.fire(1)  # the onset step sounded without its plan: its note is missing, never late
    run(s, [(HOLD, 1, 4), (HOLD, 1, 4), (REST, 1, None)], start=2)
    assert out.notes() == []


def test_a_leading_hold_of_new_content_continues_nothing() -> None:
    out = Out()
    s = Scheduler(out)
    run(s, [(7, 1, 7), (HOLD, 2, None), (HOLD, 2, None)])
    assert out.notes() == [("on", PITCH_MIN + 7), ("off", PITCH_MIN + 7)]


def test_a_step_with_no_plan_is_counted_unless_all_notes_off_voided_it() -> None:
    s = Scheduler(Out())
    run(s, [(0, 1)])
    s.plan(1, (HOLD, 1))
    s.all_notes_off()  # panic: step 1's plan is thrown away on purpose
    s.fire(1)
    assert (s.dropped_plans, s.late_plans) == (0, 0)
    s.fire(2)  # nobody planned step 2: its content is lost
    assert s.plan(2, (3, 1)) is None
    assert (s.dropped_plans, s.late_plans) == (1, 1)
