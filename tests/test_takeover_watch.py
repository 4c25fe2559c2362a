"""TakeoverWatch (issue 15, defect 11): when a lost session counts as a client-id takeover."""

from daemon.mqtt_wire import SESSION_TAKEN_OVER, BridgeStats, TakeoverWatch, disconnect_reason


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_short_sessions_in_a_row_are_a_loop_long_ones_are_not():
    clock, stats = Clock(), BridgeStats()
    watch = TakeoverWatch("x", loop_count=3, window_s=30, short_s=5, clock=clock)
    assert not watch.session_ended(60.0, None, stats)  # a broker restart after a minute
    assert not watch.session_ended(None, None, stats)  # never came up: not a takeover
    assert stats.takeovers == 0
    looping = []
    for _ in range(3):
        clock.t += 1
        looping.append(watch.session_ended(0.2, 128, stats))
    assert looping == [False, False, True] and stats.takeovers == 3


def test_the_brokers_reason_counts_however_long_the_session_was():
    stats = BridgeStats()
    watch = TakeoverWatch("x", loop_count=1, clock=Clock())
    assert watch.session_ended(3600.0, SESSION_TAKEN_OVER, stats) and stats.takeovers == 1


def test_takeovers_older_than_the_window_are_forgotten():
    clock, stats = Clock(), BridgeStats()
    watch = TakeoverWatch("x", loop_count=2, window_s=30, clock=clock)
    watch.session_ended(0.1, None, stats)
    clock.t = 31
    assert not watch.session_ended(0.1, None, stats)


def test_the_reason_is_read_through_groups_and_causes():
    class CodeError(Exception):
        rc = SESSION_TAKEN_OVER

    outer = RuntimeError("Disconnected during message iteration")
    outer.__cause__ = CodeError()
    assert disconnect_reason([ExceptionGroup("tg", [outer])]) == SESSION_TAKEN_OVER
    assert disconnect_reason([RuntimeError("no code")]) is None


def test_every_state_counter_is_documented():
    """`takeovers` reached `state.mqtt` without a word in docs/mqtt.md."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if line.startswith("| `mqtt` |"))
    assert [k for k in BridgeStats().for_state() if f"`{k}`" not in row] == []
