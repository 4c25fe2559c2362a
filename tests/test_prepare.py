"""Answers ready before the press (issue 11): a regenerate answered from a prepared candidate."""

from __future__ import annotations

import asyncio

import pytest

from daemon.app import Daemon
from daemon.buffer import Performance
from daemon.config import load_config
from daemon.control import parse_command
from daemon.prepare import Preparer
from daemon.serve import make_cc_mapper, make_performance
from tests.fakes import FakeEngine
from tests.test_app import FakeOut, FakeWorker


class Running:
    """Stands for the daemon's TaskGroup: preparation only happens while the daemon runs."""


@pytest.fixture
async def daemon() -> Daemon:
    config = load_config(None, {"midi.output_channel": 1})
    d = Daemon(config, FakeWorker(FakeEngine()), FakeOut(), make_performance(config),
               make_cc_mapper(config))
    d._tg = Running()  # type: ignore[assignment]
    yield d
    await d.preparer.close()
    d.clock.close()


def calls(d: Daemon) -> int:
    return len(d.worker.engine.calls)


async def settle(d: Daemon) -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_press_is_answered_from_the_prepared_candidate(daemon: Daemon) -> None:
    first = await daemon.handle(parse_command({"action": "regenerate", "first_bar": 3}))
    assert first["ok"] and not first["ready"]
    await settle(daemon)  # the next answer was prepared behind the first
    assert daemon.preparer.ready and calls(daemon) == 2
    prepared = daemon.worker.engine.calls[-1][1]
    second = await daemon.handle(parse_command({"action": "regenerate"}))
    assert second["ok"] and second["ready"] and calls(daemon) == 2  # no engine call at the press
    assert (second["first_bar"], second["last_bar"]) == (3, 3)
    assert prepared["seed"] is not None
    snap = daemon.snapshot()
    assert snap["history"] == {"length": 2, "index": 1}  # history rules as for any regenerate
    assert snap["tokens"][32:48] == second["tokens"] != first["tokens"]
    await settle(daemon)
    assert calls(daemon) == 3 and daemon.preparer.ready  # and the next one behind it


async def test_a_changed_context_or_pinned_seed_is_not_answered_from_it(daemon: Daemon) -> None:
    await daemon.handle(parse_command({"action": "regenerate", "first_bar": 3}))
    await settle(daemon)
    daemon.performance.note_on(60, 90, 1.0)  # the player plays: the context is new
    daemon.performance.advance(16.0)
    result = await daemon.handle(parse_command({"action": "regenerate"}))
    assert not result["ready"]
    await settle(daemon)
    result = await daemon.handle(parse_command({"action": "regenerate", "seed": 77}))
    assert not result["ready"]  # the player asked for a seed: the prepared roll is not it
    assert daemon.worker.engine.calls[-1][1]["seed"] == 77


async def test_a_press_while_the_candidate_is_still_computed_waits_for_it() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    runs = []
    perf = Performance(target=(2, 1))

    async def run(request):
        runs.append(request)
        started.set()
        await release.wait()
        return ["gens"]

    prep = Preparer(run)
    request = perf.make_request("regenerate", seed=5)
    assert prep.prepare(request, None)
    assert not prep.prepare(perf.make_request("regenerate", seed=6), None)  # same answer
    await started.wait()
    press = perf.make_request("regenerate", seed=9)
    waiting = asyncio.ensure_future(prep.take(press, None))
    await asyncio.sleep(0)
    assert not waiting.done()
    release.set()
    assert await waiting == (request, ["gens"]) and len(runs) == 1
    assert await prep.take(press, None) is None  # taken once
