"""One set of rules for command values (issue 11): every entry point agrees at every edge.

A value is refused or accepted the same way by the command validator (CC, MQTT, OSC), by the
performance's request API and, where the config has the same quantity, by the config loader.
The engine checks only its own contract, wider than any rule, so a rule can move without
touching it.
"""

import math

import pytest

from daemon import rules
from daemon.buffer import Performance, RequestError, run_request
from daemon.config import ConfigError, load_config
from daemon.control import CommandError, parse_command
from engine.runtime import EngineError, _check_float
from tests.fakes import FakeEngine
from tests.test_buffer import generate, play


def edges(rule: rules.NumberRule | rules.IntRule) -> list:
    step = 1 if isinstance(rule, rules.IntRule) else 1e-6
    return [rule.lo - step, rule.lo, rule.hi, rule.hi + step, math.nan, math.inf, True, "1",
            10**400]


def accepted_by_command(action: str, field: str, value) -> bool:
    try:
        parse_command({"action": action, field: value})
    except CommandError:
        return False
    return True


def performance_with_two_candidates() -> Performance:
    perf = Performance(target=(2, 1))
    play(perf, [(60, 0, 4), (64, 4, 8), (67, 8, 16)], until=20)
    engine = FakeEngine()
    generate(perf, engine, seed=1)
    generate(perf, engine, seed=2)
    return perf


def accepted_by_request(kind: str, field: str, value) -> bool:
    perf = performance_with_two_candidates()
    try:
        request = perf.make_request(kind, **{field: value})
    except RequestError:
        return False
    run_request(FakeEngine(), request)  # an accepted value is one the engine takes too
    return True


@pytest.mark.parametrize("action,field,rule", [
    ("regenerate", "temperature", rules.TEMPERATURE),
    ("regenerate", "seed", rules.SEED),
    ("regenerate", "bars", rules.BARS),
    ("interpolate", "alpha", rules.ALPHA),
    ("vary", "delta", rules.DELTA),
    ("vary", "seed", rules.SEED),
])
def test_commands_and_requests_refuse_the_same_values(action, field, rule):
    for value in edges(rule):
        if field == "bars" and value == rules.BARS.hi:
            continue  # from bar 2, the longest target is checked below with first_bar
        assert accepted_by_command(action, field, value) == accepted_by_request(action, field, value), \
            (action, field, value)


def test_edges_are_the_rules_bounds():
    assert accepted_by_command("vary", "delta", rules.MAX_DELTA)
    assert not accepted_by_command("vary", "delta", rules.MAX_DELTA + 1e-6)
    assert accepted_by_request("vary", "delta", rules.MAX_DELTA)
    assert not accepted_by_request("vary", "delta", rules.MAX_DELTA + 1e-6)
    assert not accepted_by_request("regenerate", "temperature", rules.MAX_TEMPERATURE + 1)


@pytest.mark.parametrize("first,bars", [(1, 4), (5, 4), (6, 4), (8, 1), (0, 1), (1, 5), (8, 2)])
def test_targets_agree(first, bars):
    by_command = accepted_by_command("target", "first_bar", first) and \
        not _raises(CommandError, parse_command, {"action": "target", "first_bar": first, "bars": bars})
    perf = Performance()
    by_performance = not _raises(RequestError, perf.set_target, first, bars)
    assert by_command == by_performance == (first >= 1 and first + bars - 1 <= 8 and 1 <= bars <= 4)


@pytest.mark.parametrize("key,rule", [
    ("engine.temperature", rules.TEMPERATURE),
    ("clock.bpm", rules.BPM),
    ("control.max_delta", rules.DELTA),
])
def test_the_config_takes_its_bounds_from_the_rules(key, rule):
    load_config(overrides={key: float(rule.hi)})
    with pytest.raises(ConfigError, match=key):
        load_config(overrides={key: float(rule.hi) + 0.5})


def test_a_tempo_command_and_the_config_agree():
    for bpm in (19.9, 20.0, 300.0, 300.1):
        in_config = not _raises(ConfigError, load_config, overrides={"clock.bpm": bpm})
        assert accepted_by_command("tempo", "bpm", bpm) == in_config


def test_the_engine_contract_is_wider_than_any_rule():
    # a future rule allowing temperature 20 or delta 8 needs no engine change
    assert _check_float("temperature", 20.0, 0.0) == 20.0
    assert _check_float("delta", 8.0, 0.0) == 8.0
    for bad in (-0.1, math.nan, math.inf, 10**400):
        with pytest.raises(EngineError):
            _check_float("temperature", bad, 0.0)


def _raises(kind, fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except kind:
        return True
    return False


@pytest.mark.parametrize("beat_bpm", [400.0, 10.0])
def test_the_external_clocks_tempo_stays_in_the_tempo_rule(monkeypatch, beat_bpm):
    """The external clock clamped its measured tempo with its own 20..300 literals."""
    from daemon.clock import ExternalClock
    from tests.test_clock import Recorder, ticks

    monkeypatch.setattr(rules, "BPM_RANGE", (30.0, 250.0))  # the rule moves: the clock follows
    clock = ExternalClock(Recorder().fire, Recorder().post, smoothing=1.0, dropout_s=10.0)
    ticks(clock, 24 * 2 + 1, 0.0, bpm=beat_bpm)
    assert clock.bpm == (250.0 if beat_bpm > 250.0 else 30.0)
    assert rules.BPM("bpm", clock.bpm) == clock.bpm  # a tempo command could set it back
