"""Soak: commands at 50/s with bad ones mixed in, through a real mosquitto, for up to 60 s.

Run: ``.venv/bin/pytest -m slow tests/test_mqtt_soak.py -s`` (CLSM_SOAK_S=seconds, default 30,
at most 60). Prints commands handled, errors returned, state messages published / dropped /
coalesced, and resident memory growth.
"""

from __future__ import annotations

import asyncio
import os
import resource
from pathlib import Path

import pytest

from daemon.mqtt import MqttBridge
from tests.mqtt_broker import (
    MOSQUITTO_PUB,
    Broker,
    StubDaemon,
    Subscriber,
    broker_fixture,  # noqa: F401 - provides the `broker` fixture
)
from tests.test_mqtt import make_settings, running

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]
RATE = 50  # commands per second
BAD_EVERY = 5  # one command in 5 is bad
BAD_LINES = [
    '{"id": "b%d", "action": "tempo", "bpm":',  # invalid JSON
    '{"id": "b%d", "action": "fly"}',  # unknown action
    '{"id": "b%d", "action": "tempo", "bpm": 1000}',  # out of range
    '{"id": "b%d", "action": "tempo", "bpm": "fast"}',  # wrong type
]
GOOD_LINES = [
    '{"id": "g%d", "action": "tempo", "bpm": 100}',
    '{"id": "g%d", "action": "regenerate", "first_bar": 2, "bars": 1}',
    '{"id": "g%d", "action": "undo"}',
]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def command(i: int) -> tuple[str, bool]:
    if i % BAD_EVERY == BAD_EVERY - 1:
        return BAD_LINES[i // BAD_EVERY % len(BAD_LINES)] % i, False
    return GOOD_LINES[i % len(GOOD_LINES)] % i, True


async def test_soak_50_per_second(broker: Broker, request: pytest.FixtureRequest) -> None:
    markexpr = request.config.getoption("markexpr") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("soak: select it with -m slow")  # keeps the default run short
    seconds = min(60.0, float(os.environ.get("CLSM_SOAK_S", "30")))
    s, stub = make_settings(broker), StubDaemon(delay=0.002)
    stub.transport = "playing"  # the bar heartbeat runs too
    bridge = MqttBridge(s, stub)
    n = int(seconds * RATE)
    async with running(bridge), Subscriber(broker, s.topic("events")) as sub:
        await asyncio.sleep(0.3)  # let mosquitto_sub subscribe
        pub = await asyncio.create_subprocess_exec(
            MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(broker.port), "-t", s.topic("cmd"),
            "-q", "1", "-l", stdin=asyncio.subprocess.PIPE)
        assert pub.stdin is not None
        rss0 = rss_kib()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        bad = 0
        for i in range(n):
            line, good = command(i)
            bad += not good
            pub.stdin.write(line.encode() + b"\n")
            await pub.stdin.drain()
            # pace against the schedule, not the previous send: no drift at 50/s
            await asyncio.sleep(max(0.0, t0 + (i + 1) / RATE - loop.time()))
        pub.stdin.close()
        await asyncio.wait_for(pub.wait(), 10)
        async with asyncio.timeout(15):
            while len(sub.messages) < n:
                await sub.wait_for(lambda m: True, start=len(sub.messages))
        rss1 = rss_kib()
    events = [m.json() for m in sub.messages]
    errors = [e for e in events if not e["ok"]]
    st = bridge.stats
    print(f"\nsoak {seconds:.0f} s at {RATE}/s: {n} commands sent, {bad} bad")
    print(f"  handled {st.commands_handled}, errors returned {len(errors)} "
          f"(busy {st.busy}), events dropped {st.events_dropped}")
    print(f"  state published {st.state_published}, dropped {st.state_dropped}, "
          f"coalesced {st.state_coalesced}; handler crashes {st.handler_crashes}")
    print(f"  RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f} MiB)")
    assert len(events) == n and st.commands_received == n
    assert len(errors) == bad + st.busy and st.commands_handled == n - bad - st.busy
    assert all(e["id"].startswith("b") for e in errors if "busy" not in e["error"])
    assert st.handler_crashes == 0 and st.events_dropped == 0
    assert len(stub.commands) == st.commands_handled
    assert rss1 - rss0 < 50 * 1024  # bounded queues: no growth with the number of commands
