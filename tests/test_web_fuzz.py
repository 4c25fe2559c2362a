"""WebSocket fuzz against the daemon with its page (issue 14): malformed JSON, unknown commands,
1 MB frames, a frame over the hard limit, binary frames, 100 clients connecting and vanishing
(half of them by TCP reset), and a page that never reads, all while the co-performer plays
8 bars on JACK. Every bad message gets an error reply and the daemon's state is unchanged.
The output timing (note-on sent vs its ideal time, recorded inside the daemon by
tests/web_child.py) in the fuzz windows is compared with the quiet windows between them:
median unchanged, every step sent, at most 2 notes over 2 ms late (an unchanged p99 is not
shown: see the test). The daemon's clock thread runs with SCHED_FIFO (`[clock] realtime`,
granted to root); with a normal-priority clock thread the fuzzing client's own CPU use on these
2 cores delays it far more (NOTES.md has both sets of figures), so without the privilege the
timing is only printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.jack_server import jack_server  # noqa: F401
from tests.test_web_browser import free_port

pytestmark = pytest.mark.jack
ROOT = Path(__file__).resolve().parent.parent
WINDOWS, WINDOW_S = 4, 1.5  # quiet / fuzz windows, alternating
KEEP = ("tokens", "owners", "target", "alpha", "delta", "history", "mode", "bpm", "record",
        "candidates", "seed", "temperature")
HANDSHAKE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n")


class Child:
    def __init__(self, tmp: Path) -> None:
        self.http_port, self.out = free_port(), tmp / "timing.json"
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.web_child", "--port-name", f"fz{uuid.uuid4().hex[:5]}",
             "--http-port", str(self.http_port), "--out", str(self.out), "--realtime"],
            cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    async def wait_log(self, text: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not any(text in x for x in self.log):
            assert self.proc.poll() is None, "".join(self.log[-30:])
            assert time.monotonic() < end, f"{text!r} not logged:\n{''.join(self.log[-30:])}"
            await asyncio.sleep(0.05)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        return json.loads(self.out.read_text())


async def state_of(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.ws_connect(url) as ws:
        while True:
            msg = json.loads((await ws.receive(timeout=10)).data)
            if msg["type"] == "state":
                return msg["state"]


async def vanish(port: int, reset: bool) -> None:
    """Connect, upgrade, and go: a TCP reset (a killed tab) or a plain close mid-stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HANDSHAKE.format(port=port).encode())
    await reader.readuntil(b"\r\n\r\n")
    await reader.read(100)  # part of the hello
    sock = writer.get_extra_info("socket")
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def fuzz(http: aiohttp.ClientSession, url: str, port: int,
               windows: dict[str, list[tuple[float, float]]]) -> dict[str, int]:
    """Quiet and fuzz windows of WINDOW_S, alternating (the machine's own noise hits both)."""
    counts = {"sent": 0, "errors": 0, "closed_over_limit": 0}
    stuck = socket.create_connection(("127.0.0.1", port))  # a page that never reads
    stuck.sendall(HANDSHAKE.format(port=port).encode())
    async with http.ws_connect(url, max_msg_size=0) as ws:
        async def ask(data: str | bytes) -> None:
            await (ws.send_bytes(data) if isinstance(data, bytes) else ws.send_str(data))
            counts["sent"] += 1
            while True:
                reply = json.loads((await ws.receive(timeout=10)).data)
                if reply["type"] in ("error", "result"):
                    assert reply["type"] == "error", (data[:80], reply)
                    counts["errors"] += 1
                    return

        bad = ['{"action": "regenerate", "first_bar": ', "null", '{"action": "explode"}',
               '{"action": "tempo", "bpm": 1e999}', '{"action": "select", "index": -1}',
               '{"action": "vary", "delta": "far"}', "\u0000", '{"id": "x"}', b"\xff\x00"]
        round_ = vanished = 0
        for _ in range(WINDOWS):
            t0 = time.monotonic()
            await asyncio.sleep(WINDOW_S)
            t1 = time.monotonic()
            windows["quiet"].append((t0, t1))
            # 100 clients in all, 25 at once (half by TCP reset), one burst per fuzz window
            await asyncio.gather(*(vanish(port, reset=i % 2 == 0) for i in range(25)))
            vanished += 25
            while time.monotonic() < t1 + WINDOW_S:  # rounds of ~0.25 s
                t = time.monotonic()
                for data in bad:
                    await ask(data)
                await ask("x" * (1 << 20))  # 1 MB: over max_message, under max_frame
                round_ += 1
                await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - t)))
            windows["fuzz"].append((t1, time.monotonic()))
    async with http.ws_connect(url) as ws:  # over the hard limit: this socket is closed
        # The server closes it on reading the frame's header, with the rest unread, so the
        # kernel resets the connection: the client sees the close frame (1009), or an abnormal
        # close (1006), or a reset while still sending, by timing. The server's own count
        # (web stats, too_big_closed) says why it closed.
        try:
            await ws.send_str("y" * (3 << 20))
            while (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                pass
            counts["closed_over_limit"] += ws.close_code in (1009, 1006)
        except (ConnectionError, aiohttp.ClientError):
            counts["closed_over_limit"] += 1
    stuck.close()
    counts["vanished"], counts["rounds"] = vanished, round_
    return counts


def send_errors(sent: list[list[float]], windows: list[tuple[float, float]]) -> np.ndarray:
    return np.array([(s - i) * 1000 for i, s in sent
                     if any(t0 <= i < t1 for t0, t1 in windows)])


def test_fuzz_gets_error_replies_and_leaves_state_and_typical_timing_alone(jack_server, tmp_path) -> None:  # noqa: F811
    child = Child(tmp_path)

    windows: dict[str, list[tuple[float, float]]] = {"quiet": [], "fuzz": []}

    async def scenario() -> tuple[dict, dict, dict]:
        await child.wait_log("filled: 8 co-performer bars")
        await child.wait_log("web page: ")
        url = f"ws://127.0.0.1:{child.http_port}/ws"
        async with aiohttp.ClientSession() as http:
            before = await state_of(http, url)
            counts = await fuzz(http, url, child.http_port, windows)
            after = await state_of(http, url)
            for _ in range(40):  # the server counts the over-limit close once its handshake ends
                if after["web"]["too_big_closed"]:
                    break
                await asyncio.sleep(0.5)
                after = await state_of(http, url)
            async with http.ws_connect(url) as ws:  # still answering good commands
                await ws.send_str('{"action": "seed", "value": 3, "id": "ok"}')
                while (reply := json.loads((await ws.receive(timeout=10)).data))["type"] != "result":
                    pass
                assert reply["ok"] and reply["id"] == "ok"
        return before, after, counts

    try:
        before, after, counts = asyncio.run(scenario())
    finally:
        result = child.stop()
        (tmp_path / "daemon.log").write_text("".join(child.log))
    web = after["web"]
    quiet = send_errors(result["sent"], windows["quiet"])
    loud = send_errors(result["sent"], windows["fuzz"])
    figures = {name: {"notes": len(a), "p50": round(float(np.percentile(a, 50)), 3),
                      "p99": round(float(np.percentile(a, 99)), 3),
                      "max": round(float(a.max()), 3)} for name, a in (("quiet", quiet),
                                                                       ("fuzz", loud))}
    print(f"\nsend error ms {figures}; {counts}; web {web}; timing {result['timing']}")
    assert counts["errors"] == counts["sent"] and counts["sent"] > 40, counts
    assert counts["closed_over_limit"] == 1, counts
    assert web["too_big_closed"] == 1 and counts["vanished"] >= 100, (counts, web)
    assert {k: before[k] for k in KEEP} == {k: after[k] for k in KEEP}
    assert web["errors"] >= counts["sent"], web
    assert web["connections"] + web["refused"] >= 100, web  # more than max_clients at once
    assert len(quiet) > 20 and len(loud) > 20, figures
    assert result["timing"]["dropped_plans"] == 0, result["timing"]
    if not any("clock thread runs with real-time priority" in x for x in child.log):
        # A normal-priority clock thread shares 2 cores with this test's client and the rest of
        # the machine: its delays would be the scheduler's, not the server's (NOTES.md).
        pytest.skip(f"no SCHED_FIFO for the clock thread here: timing not compared {figures}")
    # Typical timing unchanged, every step sent; NOT shown: an unchanged p99. About one burst of
    # 25 simultaneous connections in four delays one note by ~13-15 ms even with the real-time
    # clock thread (it waits for the GIL held by the loop thread, which the connecting process
    # preempts on these 2 cores; NOTES.md, issue 14). At most 2 such notes more than the quiet
    # windows had (other sessions' load shows in both) are tolerated here.
    assert figures["fuzz"]["p50"] <= figures["quiet"]["p50"] + 0.5, figures
    # (one full-suite run: one note 40 ms late and one plan revision too late - its first plan
    # played; another: 87 ms, so the bound is a sanity check, not a timing claim)
    late, late_quiet = loud[loud > 2.0], quiet[quiet > 2.0]
    assert len(late) <= len(late_quiet) + 2 and (late < 100.0).all(), (figures, sorted(late))
