"""The daemon's page in a real browser (issue 14): headless Chromium from the system packages,
driven by Playwright's Python package (executable /usr/bin/chromium; no browser download),
against `run_daemon.py --midi-api jack --engine fake --http-port P` as a subprocess.

Notes are played into `<port>-in` through JACK on the daemon's own MIDI clock (the recorder
times each note off the ticks), then read back from the roll's DOM (`rect.note` with
data-pitch / data-start / data-len / data-owner); regenerate is clicked on the page and the
co-performer's block is compared with what comes out of `<port>-out` and the step the daemon
logged sending it. Screenshots go to the test's tmp dir (and to $CLSM_WEB_SCREENSHOTS if set).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mido
import pytest

from tests.jack_server import jack_server  # noqa: F401
from tests.test_e2e_jack import Daemon, cc
from tests.test_e2e_live import TICKS, Ticks

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.jack, pytest.mark.browser]
BPM = 120.0
# (step, pitch, length) played in bar 2 (steps 16..31): what the roll must show
MELODY = [(16, 60, 4), (20, 64, 4), (24, 67, 2), (26, 69, 2), (28, 72, 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_state(url: str) -> dict:
    """The state as a separate WebSocket client sees it (not the page under test)."""
    import aiohttp

    async def fetch() -> dict:
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
            while True:
                msg = json.loads((await ws.receive(timeout=10)).data)
                if msg["type"] == "state":
                    return msg["state"]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright's loop owns this thread
        return pool.submit(asyncio.run, fetch()).result(20)


class Session:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port = tmp, port
        self.url = f"http://127.0.0.1:{port}/"
        self.console: list[str] = []
        self.daemon = self.start_daemon()
        self.pw: Any = None
        self.context: Any = None
        self.page: Any = None

    def start_daemon(self) -> Daemon:
        d = Daemon(self.tmp, "--http-port", str(self.port), "--bpm", str(BPM),
                   "--engine-worker", "thread", config="[clock]\nsend_clock = true\n")
        d.wait_log("ready:")
        d.wait_log("web page: ")
        return d

    def open(self) -> None:
        from playwright.sync_api import sync_playwright

        self.pw = sync_playwright().start()
        self.context = self.pw.chromium.launch_persistent_context(
            str(self.tmp / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1280, "height": 900})
        self.page = self.new_page()

    def new_page(self, **viewport: int) -> Any:
        page = self.context.new_page()
        if viewport:
            page.set_viewport_size(viewport)
        page.on("console", lambda m: self.console.append(f"console.{m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console.append(f"page error: {e}"))
        page.goto(self.url)
        page.wait_for_function("() => window.clsm && window.clsm.connected && window.clsm.state",
                               timeout=15000)
        return page

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
        if self.pw is not None:
            self.pw.stop()
        self.daemon.stop()

    def notes(self, owner: str) -> list[tuple[int, int, int]]:
        """(start, pitch, length) of the roll's blocks of `owner`, read off the DOM."""
        return sorted(tuple(n) for n in self.page.eval_on_selector_all(
            f"rect.note.{owner}", "els => els.map(e => [+e.dataset.start, +e.dataset.pitch, "
            "+e.dataset.len])"))

    def wait_state(self, js: str, timeout: float = 15000) -> None:
        # a function, not an expression: the page's CSP (no eval) blocks polled expressions
        self.page.wait_for_function(f"() => {{ const s = window.clsm.state; return {js}; }}",
                                    timeout=timeout)

    def screenshot(self, page: Any, name: str) -> Path:
        path = self.tmp / name
        page.screenshot(path=str(path), full_page=True)
        if os.environ.get("CLSM_WEB_SCREENSHOTS"):
            Path(os.environ["CLSM_WEB_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(os.environ["CLSM_WEB_SCREENSHOTS"]) / name)
        return path


@pytest.fixture(scope="module")
def web(jack_server, tmp_path_factory) -> Iterator[Session]:  # noqa: F811
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: `apt-get install chromium` (make test installs it "
                    "via scripts/install_system_deps.sh)")
    pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' (playwright)")
    s = Session(tmp_path_factory.mktemp("web"), free_port())
    try:
        s.open()
        yield s
    finally:
        s.close()


def test_the_page_loads_without_console_errors(web: Session) -> None:
    s = web.page.evaluate("window.clsm.state")
    assert len(s["tokens"]) == 128 and s["transport"] == "playing"
    assert web.page.locator("#conn").inner_text() == "connected"
    assert web.page.locator("rect.bar-bg").count() == 8
    assert web.console == []


def test_played_notes_appear_in_the_roll(web: Session) -> None:
    d = web.daemon
    d.rec.send(cc(31, 0))  # stop, so the recorder sees the Start the page sends
    d.wait_log("all notes off (stop)")
    web.wait_state("s.transport === 'stopped'")
    ticks = Ticks(d.rec)
    web.page.click("#start")
    # Timed by the wall clock from the clock's start (a loaded JACK can drop a cycle of ticks,
    # which would make counted ticks late), estimated from the least delayed of the ticks of the
    # first 4 steps (the melody starts at step 16): onsets 10 ms after their step, releases 30 ms
    # before the next.
    step_s = 60.0 / BPM / 4
    ticks.wait(4)
    t0 = ticks.zero(step_s / TICKS)

    def at(step: float) -> None:
        time.sleep(max(0.0, t0 + step * step_s - time.monotonic()))

    for step, pitch, length in MELODY:
        at(step + 0.08)
        d.rec.send(mido.Message("note_on", channel=0, note=pitch, velocity=90))
        at(step + length - 0.24)
        d.rec.send(mido.Message("note_off", channel=0, note=pitch))
    end = time.monotonic() + 10  # the last note is final once its release step has passed
    while web.notes("player") != sorted(MELODY) and time.monotonic() < end:
        time.sleep(0.1)
    assert web.notes("player") == sorted(MELODY)
    assert web.page.evaluate("window.clsm.state.owners[1]") == "player"
    assert web.console == []


def test_regenerate_on_the_page_shows_a_block_and_plays_the_same_notes(web: Session) -> None:
    d, page = web.daemon, web.page
    page.locator("#temperature").fill("0")  # argmax: the fake engine holds one note a bar
    web.wait_state("s.temperature === 0")
    page.select_option("#bars", "1")
    page.select_option("#first_bar", "5")
    web.wait_state("s.target.first_bar === 5 && s.target.bars === 1")
    assert page.eval_on_selector("rect.bar-bg[data-bar='5']", "e => e.dataset.role") == "target"
    assert page.eval_on_selector("rect.bar-bg[data-bar='4']", "e => e.dataset.role") == \
        "context-left"
    assert page.eval_on_selector("rect.bar-bg[data-bar='6']", "e => e.dataset.role") == \
        "context-right"
    sent_before = len(d.log)
    page.click("#regenerate")
    page.wait_for_function("() => document.querySelectorAll('rect.note.coperformer').length",
                           timeout=10000)
    blocks = web.notes("coperformer")
    assert blocks and all(64 <= start < 80 for start, _, _ in blocks), blocks
    tokens = page.evaluate("window.clsm.state.tokens")[64:80]
    start, pitch, _ = blocks[0]
    assert tokens[start - 64] == pitch - 55  # the block is the state's token
    # The same note comes out of <port>-out, sent at the block's step of a later pass.
    sent = re.compile(rf"step (\d+) sent: .*note_on {pitch}\b")
    end = time.monotonic() + 20
    steps: list[int] = []
    while not steps and time.monotonic() < end:
        steps = [int(m.group(1)) for line in d.log[sent_before:] if (m := sent.search(line))]
        time.sleep(0.05)
    assert steps and steps[0] % 128 == start, (steps, start)
    assert d.rec.wait_for(lambda msgs: any(
        m.type == "note_on" and m.velocity > 0 and m.note == pitch for _, m in msgs), 10)
    assert web.console == []


def test_the_alpha_slider_moves_alpha_in_the_state(web: Session) -> None:
    page = web.page
    page.click("#regenerate")  # a second candidate: something to interpolate between
    web.wait_state("s.candidates.length === 2")
    page.locator("#alpha").fill("0.5")
    web.wait_state("s.alpha === 0.5 && s.candidates.length === 3")
    state = daemon_state(web.url.replace("http", "ws"))
    assert state["alpha"] == 0.5 and state["history"] == {"length": 3, "index": 2}
    assert [c["kind"] for c in state["candidates"]][-1] == "interpolate"


def test_clicking_a_candidate_makes_it_current(web: Session) -> None:
    page = web.page
    assert page.locator("#history button").count() == 4  # before, 1, 2, 3
    page.click("#history button[data-n='1']")
    web.wait_state("s.history.index === 0")
    assert page.locator("#history button.current").get_attribute("data-n") == "1"
    state = daemon_state(web.url.replace("http", "ws"))
    assert state["history"]["index"] == 0 and state["tokens"] == page.evaluate(
        "window.clsm.state.tokens")


def test_errors_show_on_the_page(web: Session) -> None:
    page = web.page
    page.fill("#seed", "42")
    page.dispatch_event("#seed", "change")
    web.wait_state("s.seed === 42")
    page.fill("#seed", "")
    page.dispatch_event("#seed", "change")
    web.wait_state("s.seed === null")
    page.fill("#bpm", "1000")
    page.dispatch_event("#bpm", "change")
    page.wait_for_function("() => window.clsm.log.some(e => e.kind === 'error')",
                           timeout=10000)
    assert "must be 20..300" in page.locator("#log li.error").first.inner_text()
    assert web.console == []


def test_screenshots_wide_and_phone(web: Session) -> None:
    page = web.page
    web.wait_state("s.transport === 'playing'")
    assert page.eval_on_selector("#playhead", "e => e.getAttribute('visibility')") == "visible"
    first = page.evaluate("window.clsm.playheadStep")
    time.sleep(0.3)
    assert page.evaluate("window.clsm.playheadStep") != first  # the playhead moves
    wide = web.screenshot(page, "piano-roll.png")
    phone = web.new_page(width=390, height=844)
    try:
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        state = phone.evaluate("window.clsm.state")  # a fresh page shows the daemon's values
        assert phone.locator("#first_bar").input_value() == str(state["target"]["first_bar"])
        assert float(phone.locator("#alpha").input_value()) == state["alpha"]
        for sel in ("#roll", "#regenerate", "#alpha", "#history"):
            assert phone.locator(sel).is_visible(), sel
        box = phone.locator("#roll").bounding_box()
        assert box["width"] >= 350
        shot = web.screenshot(phone, "piano-roll-phone.png")
    finally:
        phone.close()
    assert wide.stat().st_size > 10_000 and shot.stat().st_size > 10_000
    assert web.console == []


def test_a_lost_connection_is_shown_and_the_page_reconnects(web: Session) -> None:
    page = web.page
    web.daemon.stop()
    page.wait_for_function("() => document.getElementById('conn').dataset.state === 'lost'",
                           timeout=10000)
    assert "reconnecting" in page.locator("#conn").inner_text()
    web.daemon = web.start_daemon()  # same port
    page.wait_for_function("() => window.clsm.connected", timeout=20000)
    web.wait_state("s.history.length === 0")  # a fresh daemon's state
    assert page.locator("#conn").inner_text() == "connected"
