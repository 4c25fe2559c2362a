"""A real mosquitto broker for MQTT tests, real mosquitto_pub / mosquitto_sub clients, and a
stub daemon for the bridge (daemon.mqtt.DaemonLike).

Import explicitly: ``from tests.mqtt_broker import broker_fixture, Subscriber, publish, ...``.
The broker listens on a free loopback port; ``stop()`` / ``start()`` restart it on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
HOST = "127.0.0.1"
INSTALL_HINT = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    "mosquitto mosquitto-clients"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Broker:
    """One mosquitto process with a generated config; restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        # no persistence: a restart forgets retained messages, as a crashed broker would
        self.conf.write_text(
            f"listener {self.port} {HOST}\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {HOST}:{self.port} in {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(name="broker")
def broker_fixture(tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto; tests import ``broker_fixture`` and take ``broker``."""
    for tool in (MOSQUITTO, MOSQUITTO_PUB, MOSQUITTO_SUB):
        if not Path(tool).exists():
            pytest.skip(f"{tool} missing; install with: {INSTALL_HINT}")
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


async def publish(
    broker: Broker, topic: str, payload: bytes | str, *, lines: bool = False, retain: bool = False
) -> None:
    """Publish with the real ``mosquitto_pub`` (stdin: any size; ``lines``: one msg a line)."""
    data = payload.encode() if isinstance(payload, str) else payload
    args = [MOSQUITTO_PUB, "-h", HOST, "-p", str(broker.port), "-t", topic, "-q", "1"]
    args += ["-l"] if lines else ["-s"]
    if retain:
        args.append("-r")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(data), 10)
    assert proc.returncode == 0, f"mosquitto_pub failed: {err.decode()}"


@dataclass
class Received:
    topic: str
    payload: str
    retained: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A real ``mosquitto_sub`` on ``topic``, collecting messages in the background."""

    broker: Broker
    topic: str
    messages: list[Received] = field(default_factory=list)

    async def __aenter__(self) -> Subscriber:
        self._changed = asyncio.Event()
        self._proc = await asyncio.create_subprocess_exec(
            MOSQUITTO_SUB, "-h", HOST, "-p", str(self.broker.port), "-t", self.topic,
            "-F", "%r %t %p", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 20,
        )
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        await self._proc.wait()

    async def _read(self) -> None:
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            retained, topic, payload = line.decode(errors="replace").rstrip("\n").split(" ", 2)
            self.messages.append(Received(topic, payload, retained == "1"))
            self._changed.set()

    async def wait_for(
        self, pred: Callable[[Received], bool], timeout: float = 5.0, start: int = 0
    ) -> Received:
        """The first message (from index ``start``) matching ``pred``; waits up to ``timeout``."""
        async with asyncio.timeout(timeout):
            i = start
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return self.messages[i]
                    i += 1
                self._changed.clear()
                await self._changed.wait()

    async def wait_subscribed(self, probe_topic: str, timeout: float = 10.0) -> None:
        """Publish to ``probe_topic`` (one our filter matches) until it comes back: from then on
        we are subscribed (mosquitto_sub says nothing when its SUBACK arrives)."""
        async with asyncio.timeout(timeout):
            k = 0
            while not any(m.topic == probe_topic for m in self.messages):
                await publish(self.broker, probe_topic, f"probe{k}")
                k += 1
                await asyncio.sleep(0.1)

    async def event(self, cid: Any, timeout: float = 5.0, start: int = 0) -> dict:
        """The ``events`` message that answers command id ``cid``."""
        msg = await self.wait_for(
            lambda m: m.topic.endswith("/events") and m.json().get("id") == cid, timeout, start
        )
        return msg.json()


# ----- a stub daemon (DaemonLike); commands are daemon.control.Command -----
class StubDaemon:
    """Records commands; regenerate returns deterministic tokens; tempo changes the state."""

    def __init__(self, delay: float = 0.0) -> None:
        self.commands: list[Any] = []
        self.delay = delay  # seconds per command, to fill the command queue in flood tests
        self.bpm = 120.0
        self.transport = "stopped"
        self.tokens = [30] * 128

    async def handle(self, command: Any) -> dict:
        self.commands.append(command)
        if self.delay:
            await asyncio.sleep(self.delay)
        if command.action == "tempo":
            self.bpm = float(command.args["bpm"])
        elif command.action == "transport":
            self.transport = "playing" if command.args.get("value") == "start" else "stopped"
        elif command.action == "regenerate":
            first, bars = command.args.get("first_bar", 1), command.args.get("bars", 1)
            toks = [(first * 7 + i) % 30 for i in range(16 * bars)]
            self.tokens[(first - 1) * 16:(first - 1 + bars) * 16] = toks
            return {"tokens": toks, "first_bar": first, "last_bar": first + bars - 1,
                    "latency_ms": 1.5}
        elif command.action == "panic":
            raise RuntimeError("stub panic failure")
        return {}

    def snapshot(self) -> dict:
        return {"mode": "loop", "transport": self.transport, "bpm": self.bpm,
                "clock_source": "internal", "position": 0.0, "tokens": list(self.tokens),
                "handled": len(self.commands)}


def unique_device() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"
