"""Daemon.handle in process: FakeEngine behind a stand-in worker, a mido BaseOutput as the port."""

from __future__ import annotations

from typing import Any

import mido
import pytest

from daemon.app import Daemon
from daemon.config import load_config
from daemon.control import parse_command
from daemon.history import run_request
from daemon.serve import make_cc_mapper, make_performance
from engine.tokens import HOLD, PITCH_MIN, REST, STEPS_PER_BAR, is_pitch
from tests.fakes import FakeEngine


class FakeOut(mido.ports.BaseOutput):
    """Records what the daemon sends; counts panics (the daemon's all-notes-off)."""

    def __init__(self) -> None:
        super().__init__("fake-out")
        self.channel = 0
        self.sent: list[mido.Message] = []
        self.panics = 0

    def _send(self, msg: mido.Message) -> None:
        self.sent.append(msg)

    def panic(self) -> None:
        self.panics += 1
        super().panic()


class FakeWorker:
    """What app.py needs of daemon.worker.EngineWorker, running the request inline."""

    kind = "thread"

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.engine_info = engine.info()
        self.starts = 0

    async def run_request(self, request: Any) -> list[Any]:
        return run_request(self.engine, request)

    async def start(self) -> FakeWorker:
        self.starts += 1
        return self

    async def close(self) -> None:
        pass


@pytest.fixture
async def daemon() -> Daemon:
    config = load_config(None, {"midi.output_channel": 1})
    d = Daemon(config, FakeWorker(FakeEngine()), FakeOut(), make_performance(config),
               make_cc_mapper(config))
    yield d
    d.clock.close()


def cmd(obj: dict) -> Any:
    return parse_command(obj)


async def test_regenerate_puts_tokens_in_the_snapshot_and_the_result(daemon: Daemon) -> None:
    events: list[dict] = []
    daemon.listeners.append(events.append)
    before = daemon.snapshot()["tokens"]
    result = await daemon.handle(cmd({"action": "regenerate", "first_bar": 3, "bars": 2,
                                      "seed": 5, "id": "r1"}))
    assert result["ok"] and result["id"] == "r1" and result["action"] == "regenerate"
    assert (result["first_bar"], result["last_bar"]) == (3, 4)
    snap = daemon.snapshot()
    bars = snap["tokens"][2 * STEPS_PER_BAR:4 * STEPS_PER_BAR]
    assert result["tokens"] == bars
    assert bars != before[2 * STEPS_PER_BAR:4 * STEPS_PER_BAR]
    assert snap["tokens"][:2 * STEPS_PER_BAR] == before[:2 * STEPS_PER_BAR]  # context kept
    assert snap["owners"][2:4] == ["coperformer", "coperformer"]
    assert all(is_pitch(t) or t in (REST, HOLD) for t in bars)
    assert {"type": "state"} in events


async def test_vary_after_regenerate_returns_the_new_tokens(daemon: Daemon) -> None:
    await daemon.handle(cmd({"action": "regenerate", "first_bar": 1, "bars": 1, "seed": 1}))
    result = await daemon.handle(cmd({"action": "vary", "delta": 1.5}))
    assert result["ok"]
    assert result["tokens"] == daemon.snapshot()["tokens"][:STEPS_PER_BAR]


@pytest.mark.parametrize("command", [
    {"action": "interpolate", "alpha": 0.5},  # needs two candidates first
    {"action": "vary", "delta": 0.5},  # needs a candidate first
    {"action": "undo"},
])
async def test_a_command_that_does_not_fit_changes_nothing(daemon: Daemon, command) -> None:
    await daemon.handle(cmd({"action": "regenerate", "first_bar": 2, "bars": 1, "seed": 3}))
    await daemon.handle(cmd({"action": "undo"}))  # back to the empty bars: no candidate now
    before = daemon.snapshot()
    result = await daemon.handle(cmd(command))
    if command["action"] == "undo":
        assert result.get("undone") is False
    else:
        assert "error" in result and result["action"] == command["action"]
        assert "ok" not in result
    assert daemon.snapshot() == before
    assert daemon.out.panics == 0


async def test_bad_args_are_an_error_dict_and_state_is_unchanged(daemon: Daemon) -> None:
    before = daemon.snapshot()
    bad = type("Cmd", (), {"action": "regenerate", "args": {"first_bar": 8, "bars": 4},
                           "id": "x"})()
    result = await daemon.handle(bad)
    assert result["id"] == "x" and "error" in result and "bars" in result["error"]
    unknown = type("Cmd", (), {"action": "explode", "args": {}, "id": None})()
    assert "unknown action" in (await daemon.handle(unknown))["error"]
    assert daemon.snapshot() == before


async def test_engine_failure_is_an_error_and_ends_every_note(daemon: Daemon) -> None:
    await daemon.handle(cmd({"action": "regenerate", "first_bar": 1, "bars": 4, "seed": 2}))
    # Play the first pitch of the candidate, as the clock would, so a note is sounding.
    tokens = daemon.snapshot()["tokens"]
    step = next(i for i, t in enumerate(tokens) if is_pitch(t))
    daemon.scheduler.plan(step, daemon.performance.output_token(step))
    daemon.scheduler.fire(step)
    note = next(m for m in daemon.out.sent if m.type == "note_on")
    before = daemon.snapshot()

    daemon.worker.engine.fail = True
    result = await daemon.handle(cmd({"action": "regenerate", "seed": 9}))
    assert "engine failure" in result["error"]
    assert daemon.out.panics == 1
    offs = [m for m in daemon.out.sent if m.type == "note_off" or
            (m.type == "note_on" and m.velocity == 0)]
    assert [m.note for m in offs] == [note.note]
    assert daemon.scheduler.sounding is None
    assert daemon.snapshot()["tokens"] == before["tokens"]

    daemon.worker.engine.fail = False  # the daemon goes on
    assert (await daemon.handle(cmd({"action": "regenerate", "seed": 9})))["ok"]


async def test_simple_commands_change_the_state(daemon: Daemon) -> None:
    assert (await daemon.handle(cmd({"action": "seed", "value": 42})))["ok"]
    assert (await daemon.handle(cmd({"action": "tempo", "bpm": 96})))["ok"]
    assert (await daemon.handle(cmd({"action": "mode", "value": "follow"})))["ok"]
    snap = daemon.snapshot()
    assert (snap["seed"], snap["bpm"], snap["mode"]) == (42, 96.0, "follow")
    assert daemon.out.panics == 1  # a mode change ends the notes


async def test_vary_passes_the_pinned_seed_to_the_engine(daemon: Daemon) -> None:
    # engine.runtime draws a random seed on seed=None: a pinned seed must reach vary too.
    await daemon.handle(cmd({"action": "seed", "value": 77}))
    await daemon.handle(cmd({"action": "regenerate", "first_bar": 1, "bars": 1}))
    assert (await daemon.handle(cmd({"action": "vary", "delta": 0.5})))["ok"]
    name, kwargs = daemon.worker.engine.calls[-1]
    assert name == "vary" and kwargs.get("seed") == 77


async def test_a_worker_that_cannot_restart_does_not_kill_the_daemon(daemon: Daemon) -> None:
    from concurrent.futures import BrokenExecutor

    async def broken(request: Any) -> list[Any]:
        raise BrokenExecutor("child died")

    async def cannot_start() -> Any:
        raise RuntimeError("spawn failed")

    daemon.worker.run_request = broken
    daemon.worker.start = cannot_start
    result = await daemon.handle(cmd({"action": "regenerate", "seed": 1}))
    assert "engine failure" in result["error"]
    assert daemon.out.panics == 1


async def test_coalescer_survives_cancelled_callers() -> None:
    import asyncio

    from daemon.worker import Coalescer, Superseded
    c, gate = Coalescer(), asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "slow"

    async def quick() -> str:
        return "quick"

    first = asyncio.create_task(c.run(slow))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(c.run(quick))
    await asyncio.sleep(0)
    waiting.cancel()  # its caller went away while it waited
    await asyncio.sleep(0)
    third = asyncio.create_task(c.run(quick))  # must not trip over the cancelled one
    await asyncio.sleep(0)
    handed = asyncio.create_task(c.run(quick))  # supersedes `third`
    await asyncio.sleep(0)
    gate.set()
    await asyncio.sleep(0)  # `first` finishes and hands the slot over
    assert first.done() and not handed.done()
    handed.cancel()  # handed the slot, cancelled before it could run: the slot is freed
    with pytest.raises(asyncio.CancelledError):
        await handed
    with pytest.raises(Superseded):
        await third
    assert not c.busy
    assert await c.run(quick) == "quick"


class SteppedClock:
    """The clock's side of the timing path, driven by hand: the test decides the order."""

    source, bpm, running = "internal", 120.0, True

    def position(self, now: float | None = None) -> float:
        return 0.0

    def close(self) -> None:
        pass


async def test_a_plan_revision_that_comes_too_late_drops_no_step(daemon: Daemon) -> None:
    """The loop is late for step k's plan (the clock fires k first): k still plays, from the
    plan made as soon as step k-1 had sounded; the late revision is counted, nothing dropped."""
    import asyncio

    from daemon.clock import ClockEvent
    await daemon.handle(cmd({"action": "regenerate", "first_bar": 1, "bars": 1, "seed": 5}))
    tokens = daemon.snapshot()["tokens"][:STEPS_PER_BAR]
    k = next(i for i in range(1, STEPS_PER_BAR) if is_pitch(tokens[i]))
    daemon.clock = SteppedClock()
    task = asyncio.create_task(daemon._clock_events())
    try:
        for step in range(k):
            daemon.events.put_nowait(ClockEvent("plan", step, 0.0))
            await asyncio.sleep(0)
            daemon.scheduler.fire(step)
            daemon.events.put_nowait(ClockEvent("step", step, 0.0))
            await asyncio.sleep(0)
        sent = len(daemon.out.sent)
        daemon.scheduler.fire(k)  # before the loop saw step k's plan event
        daemon.events.put_nowait(ClockEvent("plan", k, 0.0))
        await asyncio.sleep(0)
    finally:
        task.cancel()
    ons = [m.note for m in daemon.out.sent[sent:] if m.type == "note_on" and m.velocity]
    assert ons == [tokens[k] + PITCH_MIN]
    snap = daemon.snapshot()
    assert snap["dropped_plans"] == 0 and snap["late_plans"] == 1
