"""The daemon's own page (SPEC section 4, issue 14): a live piano roll and every control, served
with a WebSocket from the daemon's event loop (aiohttp; no other process, no build step).

`GET /` serves daemon/web/index.html (+ app.js, app.css: package data). `GET /ws` upgrades to
a WebSocket: the server sends `hello` (token ids, ranges), then `state` (the snapshot MQTT
publishes, plus the target's candidate list) on every change and at least every
`state_interval_s` while playing; the browser sends commands as JSON text, exactly MQTT's
payloads (`{"action": "regenerate", "first_bar": 5, "bars": 2, "id": "r1"}`), checked by the
same validator (`control.parse_payload`) and answered to that browser with `result` or `error`.

A slow or dead browser never delays MIDI output: the loop only marks each client's outbox
(state coalesces to the latest, replies are a bounded deque that drops the oldest); each
client has its own sender task with a send timeout. Off unless a port is given; the gate
(host, Origin, token) is daemon/web_guard.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from daemon import rules
from daemon.control import ACTIONS, Command, CommandError, parse_payload
from daemon.mqtt_wire import DaemonLike, dumps, id_and_action
from daemon.safelog import Throttle, show
from daemon.web_guard import WebSettings, host_allowed, origin_allowed, token_ok
from engine import tokens as tk

log = logging.getLogger(__name__)

STATIC = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
          "/app.css": ("app.css", "text/css")}
MIN_PUSH_S = 0.05  # state pushes at most 20 a second, whatever changes
MAX_CANDIDATES = 64  # candidates listed in the state (the latest)
CLOSE_POLICY, CLOSE_TRY_LATER = 4403, 1013
SEND_BUFFER = 64 * 1024  # kernel send buffer per page (loopback would grow it to megabytes)


@dataclass
class WebStats:
    clients: int = 0  # connected now
    connections: int = 0  # accepted since start
    refused: int = 0  # bad Host / Origin / token, too many clients
    received: int = 0  # text messages
    handled: int = 0
    errors: int = 0  # error replies
    busy: int = 0
    replies_dropped: int = 0  # oldest replies dropped for a slow browser
    states_skipped: int = 0  # states replaced by a newer one before a browser took them
    slow_closed: int = 0  # browsers dropped after a send took longer than send_timeout_s
    too_big_closed: int = 0  # connections closed (1009) for a frame over max_frame

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def static_files() -> dict[str, bytes]:
    folder = resources.files("daemon") / "web"
    return {name: (folder / name).read_bytes() for name, _ in STATIC.values()}


def candidates(daemon: Any) -> list[dict[str, Any]]:
    """The target's candidate history for the page: number (1-based, as `select` takes), kind."""
    perf = getattr(daemon, "performance", None)
    hist = perf.history() if perf is not None and hasattr(perf, "history") else None
    if hist is None:
        return []
    out = [{"n": i + 1, "kind": c.kind, "alpha": c.alpha, "delta": c.delta}
           for i, c in enumerate(hist.candidates)]
    return out[-MAX_CANDIDATES:]


@dataclass(eq=False)
class Client:
    ws: web.WebSocketResponse
    replies: collections.deque[str]
    transport: asyncio.Transport | None = None
    state: str | None = None  # the latest state not yet sent
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def reply(self, obj: dict[str, Any], stats: WebStats) -> None:
        if len(self.replies) == self.replies.maxlen:
            stats.replies_dropped += 1
        self.replies.append(dumps(obj).decode())
        self.wake.set()

    def push_state(self, text: str, stats: WebStats) -> None:
        if self.state is not None:
            stats.states_skipped += 1
        self.state = text
        self.wake.set()


@dataclass(eq=False)
class WebServer:
    """`await WebServer(settings, daemon).run()` as a task of the daemon's TaskGroup."""

    settings: WebSettings
    daemon: DaemonLike
    stats: WebStats = field(default_factory=WebStats)

    def __post_init__(self) -> None:
        self.clients: set[Client] = set()
        self._commands: asyncio.Queue[tuple[Command, Client]] = asyncio.Queue(
            self.settings.command_queue)
        self._dirty = asyncio.Event()
        self._last_state: tuple[float, str] | None = None  # (loop time, text) of the last push
        self._files = static_files()
        self.address: tuple[str, int] | None = None
        self.bound = asyncio.Event()
        self.throttle = Throttle(log)

    # ----- serving ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)  # no route takes a body
        for path in STATIC:
            app.router.add_get(path, self.static)
        app.router.add_get("/ws", self.websocket)
        return app

    async def run(self) -> None:
        """Serve until cancelled. A port that cannot be bound is logged; the daemon plays on."""
        s = self.settings
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            try:
                site = web.TCPSite(runner, s.host, s.port)
                await site.start()
            except OSError as e:
                log.error("web page: cannot listen on %s:%d (%s); the page is off for this run: "
                          "choose another --http-port / --http-host", s.host, s.port, e)
                return
            self.address = runner.addresses[0][:2]
            log.info("web page: %s (listening on %s:%d)", s.url(self.address[1]), *self.address)
            listeners = getattr(self.daemon, "listeners", None)
            if listeners is not None:
                listeners.append(self.on_daemon_event)
            self.bound.set()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._run_commands(), name="web-commands")
                    tg.create_task(self._push_states(), name="web-state")
            finally:
                if listeners is not None and self.on_daemon_event in listeners:
                    listeners.remove(self.on_daemon_event)
        finally:
            self.bound.clear()
            for c in list(self.clients):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.ws.close(code=1001, message=b"daemon stopping"), 1)
            await runner.cleanup()

    def _headers(self, request: web.Request, content_type: str) -> dict[str, str]:
        host = request.host
        return {"Content-Type": f"{content_type}; charset=utf-8", "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                f"connect-src 'self' ws://{host} wss://{host}; frame-ancestors 'none'"}

    async def static(self, request: web.Request) -> web.StreamResponse:
        if not host_allowed(self.settings, request.headers.get("Host")):
            self.stats.refused += 1
            return web.Response(status=421, text="this daemon answers to loopback names only")
        name, content_type = STATIC[request.path]
        return web.Response(body=self._files[name], headers=self._headers(request, content_type))

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        if not host_allowed(s, request.headers.get("Host")) or not origin_allowed(
                request.headers.get("Origin"), request.headers.get("Host")):
            self.stats.refused += 1
            self.throttle.warning("web: refused a WebSocket from Origin %s, Host %s",
                                  show(request.headers.get("Origin"), 60),
                                  show(request.headers.get("Host"), 60))
            return web.Response(status=403, text="cross-origin WebSocket refused")
        ws = web.WebSocketResponse(max_msg_size=s.max_frame, heartbeat=20.0, compress=False,
                                   writer_limit=64 * 1024)
        await ws.prepare(request)
        refusal = None
        if not token_ok(s, request.query.get("token")):
            refusal = (CLOSE_POLICY, "token missing or wrong: open the page as "
                       "http://HOST:PORT/?token=TOKEN")
        elif len(self.clients) >= s.max_clients:
            refusal = (CLOSE_TRY_LATER, f"too many pages open ({s.max_clients}); close one")
        if refusal is not None:
            self.stats.refused += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send_str(dumps({"type": "error", "fatal": True,
                                                          "error": refusal[1]}).decode()), 1)
                await asyncio.wait_for(ws.close(code=refusal[0], message=refusal[1].encode()), 1)
            return ws
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # a bounded kernel buffer too: a stuck page is noticed in seconds
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        client = Client(ws, collections.deque(maxlen=s.client_queue), request.transport)
        self.clients.add(client)
        self.stats.clients, self.stats.connections = len(self.clients), self.stats.connections + 1
        client.reply(self.hello(), self.stats)
        client.push_state(self.fresh_state(), self.stats)
        sender = asyncio.create_task(self._send_loop(client), name="web-client-send")
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.on_text(client, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self.stats.received += 1
                    self.error(client, "binary frames are not commands: send JSON text "
                               'like {"action": "undo"}')
                elif msg.type == WSMsgType.ERROR:  # msg.data: the exception (aiohttp closed)
                    # the exception's code, not ws.close_code: a client that resets the
                    # connection during the close handshake turns that into 1006
                    if getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                        self.stats.too_big_closed += 1
                    self.throttle.warning("web: connection closed on an error: %s",
                                          show(str(msg.data), 100))
                    break
        finally:
            self.clients.discard(client)
            self.stats.clients = len(self.clients)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        return ws

    async def _send_loop(self, client: Client) -> None:
        ws, timeout = client.ws, self.settings.send_timeout_s
        try:
            while not ws.closed:
                await client.wake.wait()
                client.wake.clear()
                while client.replies or client.state is not None:
                    if client.replies:
                        text = client.replies.popleft()
                    else:
                        text, client.state = client.state, None
                    await asyncio.wait_for(ws.send_str(text), timeout)
        except TimeoutError:
            self.stats.slow_closed += 1
            self.throttle.warning("web: a page took over %.1f s to take a message; dropped it",
                                  timeout)
            self.clients.discard(client)
            self.stats.clients = len(self.clients)
            if client.transport is not None:  # no close handshake: it would wait on the same page
                client.transport.abort()
        except (ConnectionError, RuntimeError):
            pass  # the browser went away; the reader ends the connection

    # ----- state --------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        config = getattr(self.daemon, "config", None) or {}
        return {"type": "hello", "actions": sorted(ACTIONS), "max_message": self.settings.max_message,
                "tokens": {"pitch_min": tk.PITCH_MIN, "pitch_max": tk.PITCH_MAX, "rest": tk.REST,
                           "hold": tk.HOLD, "steps_per_bar": tk.STEPS_PER_BAR, "bars": tk.N_BARS},
                # slider ranges; the validator has the last word on every value
                "limits": {"max_delta": config.get("control", {}).get("max_delta", 2.0),
                           "bpm": list(rules.BPM_RANGE), "max_seed": rules.MAX_SEED,
                           "max_target_bars": tk.MAX_TARGET_BARS,
                           "interp_steps": config.get("daemon", {}).get("interp_steps", 8)}}

    def state_text(self) -> str:
        snap = self.daemon.snapshot()
        snap["candidates"] = candidates(self.daemon)
        snap["web"] = self.stats.as_dict()
        return dumps({"type": "state", "state": snap}).decode()

    def fresh_state(self) -> str:
        """The state for a page that just connected: the last push if it is recent (a burst of
        connections costs one snapshot, not one each)."""
        now = asyncio.get_running_loop().time()
        if self._last_state is None or now - self._last_state[0] > MIN_PUSH_S:
            self._last_state = (now, self.state_text())
        return self._last_state[1]

    def on_daemon_event(self, event: dict) -> None:
        """A daemon listener (on the loop): any result, transport change or state = push."""
        self._dirty.set()

    async def _push_states(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.settings.state_interval_s)
            self._dirty.clear()
            if self.clients:
                t0 = loop.time()
                text = self.state_text()  # one snapshot for every page
                self._last_state = (t0, text)
                for c in list(self.clients):
                    c.push_state(text, self.stats)
                await asyncio.sleep(max(0.0, MIN_PUSH_S - (loop.time() - t0)))

    # ----- commands -----------------------------------------------------------------------
    def on_text(self, client: Client, text: str) -> None:
        """Parse and queue (on the loop, no await): the same validator as MQTT."""
        self.stats.received += 1
        data = text.encode("utf-8", "surrogatepass")
        try:
            command = replace(parse_payload(data, self.settings.max_message), source="web")
        except CommandError as e:
            cid, action = id_and_action(data, self.settings.max_message)
            self.throttle.warning("web: refused %s", show(data, 80))
            self.error(client, str(e), cid, action)
            return
        try:
            self._commands.put_nowait((command, client))
        except asyncio.QueueFull:
            self.stats.busy += 1
            self.error(client, f"busy: {self._commands.qsize()} commands pending, try again "
                       "later", command.id, command.action)

    async def _run_commands(self) -> None:
        while True:
            command, client = await self._commands.get()
            try:
                result = await self.daemon.handle(command)
            except Exception as exc:  # noqa: BLE001 - logged and answered; the daemon goes on
                log.exception("web command %s failed", command.action)
                result = {"action": command.action, "error": f"internal error: {exc}"}
                if command.id is not None:
                    result["id"] = command.id
            emit = getattr(self.daemon, "emit", None)
            if emit is not None:  # MQTT's events show every command's outcome
                emit({"type": "result", "source": "web", **result})
            if result.get("error"):
                self.stats.errors += 1
                client.reply({"type": "error", **result}, self.stats)
            else:
                self.stats.handled += 1
                client.reply({"type": "result", **result}, self.stats)
            self._dirty.set()

    def error(self, client: Client, reason: str, cid: Any = None, action: str | None = None) -> None:
        self.stats.errors += 1
        out: dict[str, Any] = {"type": "error", "error": reason}
        if cid is not None:
            out["id"] = cid
        if action is not None:
            out["action"] = action
        client.reply(out, self.stats)
