"""The daemon: ports, clock, scheduler and engine worker in one asyncio TaskGroup.

Data flows one way: MIDI in -> performance (quantizer, buffer) -> engine worker -> scheduler ->
MIDI out; CCs (and MQTT, via `Daemon.handle`) steer it. The engine never runs on the loop or the
clock thread. Shutdown (SIGINT/SIGTERM/SIGHUP) stops the clock, ends every note and closes the ports.
The command line is in daemon/cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import BrokenExecutor
from typing import Any

from daemon.clock import ClockEvent, ExternalClock, InternalClock, queue_poster
from daemon.config import Config
from daemon.history import ResultError
from daemon.midi_io import MidiInput, MidiOutput, Received, accepts
from daemon.prepare import Preparer
from daemon.scheduler import Scheduler
from daemon.worker import Coalescer, Superseded
from engine.tokens import STEPS_PER_BAR

log = logging.getLogger("daemon")

ExtraTask = Callable[["Daemon"], Awaitable[None]]
ENGINE_ACTIONS = ("regenerate", "interpolate", "step", "vary")


class Shutdown(Exception):
    """Raised inside the TaskGroup to end it after the graceful part is done."""


class EngineFailure(Exception):
    """The engine (or its worker) failed on a request that was itself fine."""


class Daemon:
    """The running state; `handle(command)` and `snapshot()` are the hook for MQTT."""

    def __init__(self, config: Config, worker: Any, out: MidiOutput | Any,
                 performance: Any, cc_mapper: Any | None) -> None:
        self.config = config
        self.worker, self.out, self.performance, self.cc = worker, out, performance, cc_mapper
        d, m = config["daemon"], config["midi"]
        self.scheduler = Scheduler(out.send, m["output_channel"], d["velocity"])
        self.events: asyncio.Queue[ClockEvent] = asyncio.Queue()
        self.clock = self._make_clock()
        self.coalescer = Coalescer()
        self.preparer = Preparer(worker.run_request)  # answers ready before the press
        self.seed: int | None = None
        self.temperature: float | None = None
        self.last_latency_ms: float | None = None
        self.listeners: list[Callable[[dict], None]] = []  # events (results, errors, state)
        self.extra_tasks: list[ExtraTask] = []
        self.stopping = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None

    def _make_clock(self) -> InternalClock | ExternalClock:
        c = self.config["clock"]
        post = queue_poster(asyncio.get_running_loop(), self.events)
        if c["source"] == "link":
            from daemon.link_clock import LinkClock
            return LinkClock(c["bpm"], self.scheduler.fire, post,
                             quantum=self.config["link"]["quantum"],
                             start_stop_sync=self.config["link"]["start_stop_sync"],
                             lookahead_s=c["lookahead_ms"] / 1000, spin_s=c["spin_ms"] / 1000,
                             clock_out=self.out.send if c["send_clock"] else None,
                             realtime=c["realtime"])
        if c["source"] == "external":
            return ExternalClock(self.scheduler.fire, post, dropout_s=c["dropout_s"],
                                 smoothing=c["smoothing"], bpm=c["bpm"])
        return InternalClock(c["bpm"], self.scheduler.fire, post,
                             lookahead_s=c["lookahead_ms"] / 1000, spin_s=c["spin_ms"] / 1000,
                             clock_out=self.out.send if c["send_clock"] else None,
                             realtime=c["realtime"])

    # ----- events out -------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a listener must not break the live loop
                log.exception("event listener failed")

    def snapshot(self) -> dict:
        snap = dict(self.performance.snapshot())
        snap.update({
            "transport": "playing" if self.clock.running else "stopped",
            "bpm": round(self.clock.bpm, 2), "clock": self.clock.source,
            "link_peers": getattr(self.clock, "peers", None),  # --clock link: peers in session
            "position": round(self.clock.position(), 3),
            "bar": int(self.clock.position()) // STEPS_PER_BAR % 8 + 1,
            "engine": dict(self.worker.engine_info), "engine_worker": self.worker.kind,
            "latency_ms": self.last_latency_ms, "seed": self.seed,
            "temperature": self.temperature,
            # Timing health: steps that sounded with no plan (lost), plan revisions that came
            # too late (the first plan played), steps the internal clock skipped after a stall.
            "dropped_plans": self.scheduler.dropped_plans,
            "late_plans": self.scheduler.late_plans,
            "skipped_steps": getattr(self.clock, "late_steps", 0),
        })
        return snap

    # ----- the tasks --------------------------------------------------------------------
    async def run(self, midi_in: MidiInput | Any) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._clock_events(), name="clock-events")
                tg.create_task(self._midi_in(midi_in), name="midi-in")
                if isinstance(self.clock, ExternalClock):
                    tg.create_task(self._clock_watchdog(), name="clock-watchdog")
                if self.cc is not None:
                    tg.create_task(self._cc_knobs(), name="cc-knobs")
                for i, extra in enumerate(self.extra_tasks):
                    tg.create_task(extra(self), name=f"extra-{i}")
                tg.create_task(self._shutdown_when_asked(), name="shutdown")
                if isinstance(self.clock, InternalClock):
                    self.clock.launch()
        except* Shutdown:
            pass
        finally:
            self._tg = None
            self.all_notes_off("shutdown")
            await self.preparer.close()

    async def _shutdown_when_asked(self) -> None:
        await self.stopping.wait()
        log.info("shutting down: stopping the clock, all notes off")
        self.all_notes_off("shutdown")
        raise Shutdown

    def all_notes_off(self, why: str) -> None:
        if why == "shutdown":
            self.clock.close()
        self.scheduler.all_notes_off()
        self.out.panic()
        log.debug("all notes off (%s)", why)

    async def _clock_events(self) -> None:
        every = self.config["daemon"]["status_every_bars"] * STEPS_PER_BAR
        while True:
            ev = await self.events.get()
            if ev.kind == "plan":  # the revision, with the freshest state
                self._plan(ev.step)
            elif ev.kind == "step":
                self.performance.advance(float(ev.step))
                # The next step's first plan, a whole step ahead of it (see daemon/scheduler.py).
                self._plan(ev.step + 1)
                if ev.step % STEPS_PER_BAR == 0:  # the player's last bar is final now
                    self.prepare_next()
                if ev.step % every == 0:
                    self._status(ev.step)
            elif ev.kind == "start":
                self.scheduler.reset_position()
                self.performance.relocate(float(ev.step))
                self._plan(ev.step)
                self.emit({"type": "transport", "value": "start", "step": ev.step})
            elif ev.kind == "stop":
                self.all_notes_off("stop")
                self.performance.stop()
                self.emit({"type": "transport", "value": "stop", "step": ev.step})

    def _plan(self, step: int) -> None:
        if self.clock.running:
            self.scheduler.plan(step, self.performance.output_token(step))

    def _status(self, step: int) -> None:
        lat = "-" if self.last_latency_ms is None else f"{self.last_latency_ms:.1f} ms"
        log.debug("bar %d | %.1f bpm | %s | last generation %s", step // STEPS_PER_BAR % 8 + 1,
                 self.clock.bpm, self.snapshot_mode(), lat)
        self.emit({"type": "state"})

    def snapshot_mode(self) -> str:
        return str(getattr(self.performance, "mode", self.config["daemon"]["mode"]))

    async def _clock_watchdog(self) -> None:
        assert isinstance(self.clock, ExternalClock)
        while True:
            await asyncio.sleep(0.05)
            self.clock.check_dropout()

    async def _midi_in(self, port: MidiInput | Any) -> None:
        m = self.config["midi"]
        while True:
            r: Received = await port.receive()
            msg = r.msg
            if msg.type in ("clock", "start", "stop", "continue", "songpos"):
                if isinstance(self.clock, ExternalClock):
                    self.clock.feed(msg, r.time)
                continue
            if msg.type == "control_change" and self.cc is not None:
                # Buttons come with the knob values still pending, in order (target first).
                commands = self.cc.feed_all(msg)
                if commands:
                    self._spawn(self._handle_all(commands), f"cc-{commands[-1].action}")
                    continue
            if msg.type not in ("note_on", "note_off") or not accepts(msg, m["input_channel"]):
                continue
            if m["thru"]:
                self.out.send(msg.copy(channel=self.out.channel))
            self._note(msg, r.time)

    def _note(self, msg: Any, t: float) -> None:
        if not self.clock.running:
            return  # no transport, no position to write at
        position = self.clock.position(t)
        try:
            if msg.type == "note_on" and msg.velocity > 0:
                self.performance.note_on(msg.note, msg.velocity, position)
            else:
                self.performance.note_off(msg.note, position)
        except ValueError as e:
            log.warning("ignored %s: %s", msg, e)

    async def _cc_knobs(self) -> None:
        """Knob CCs coalesce in the mapper; the latest values are acted on a few times a second."""
        while True:
            await asyncio.sleep(0.05)
            commands = self.cc.drain()
            if commands:
                await self._handle_all(commands)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        assert self._tg is not None
        self._tg.create_task(coro, name=name)

    async def _handle_all(self, commands: list[Any]) -> None:
        for command in commands:
            result = await self.handle(command)
            if "error" in result:
                log.warning("command failed: %s", result["error"])
            else:
                log.info("command done: %s", result)
            self.emit({"type": "result", **result})

    # ----- commands ---------------------------------------------------------------------
    async def handle(self, command: Any) -> dict:
        """Run one command (control.Command); a result dict, or {"error": ...}.

        A command that does not fit (bad values, nothing to interpolate yet) changes nothing;
        an engine failure also ends every note, since what plays may no longer be what was
        asked for."""
        action, args = command.action, dict(command.args)
        base = {"action": action} | ({"id": command.id} if command.id is not None else {})
        try:
            if action in ENGINE_ACTIONS:
                result = await self._generate(action, args)
            else:
                result = self._simple(action, args)
        except Superseded:
            result = {"superseded": True}
        except (ValueError, KeyError, TypeError) as e:
            return base | {"error": f"{action}: {e}"}
        except Exception as e:  # the engine failed (or a bug): the show goes on, silently
            log.exception("engine failure on %s", action)
            self.all_notes_off("engine failure")
            cause = e.__cause__ if isinstance(e, EngineFailure) and e.__cause__ else e
            await self._revive_worker(cause)
            return base | {"error": f"{action}: engine failure: {cause}"}
        self.emit({"type": "state"})
        return base | {"ok": True} | result

    def _simple(self, action: str, args: dict) -> dict:
        p = self.performance
        if action == "undo":
            return {"undone": bool(p.undo())}
        if action == "select":
            return {"selected": p.select(args["index"])}
        if action == "clear":
            return {"cleared": p.clear(args.get("first_bar"), args.get("bars"))}
        if action == "target":
            p.update_target(args.get("first_bar"), args.get("bars"))
        elif action == "mode":
            self.all_notes_off("mode change")
            p.set_mode(args["value"])
        elif action == "record":
            p.set_record(bool(args["value"]))
        elif action == "tempo":
            self.clock.set_bpm(float(args["bpm"]))
        elif action == "transport":
            if args["value"] == "start":
                self.clock.start(0)
            else:
                self.clock.stop()
        elif action == "seed":
            self.seed = None if args["value"] is None else int(args["value"])  # null = random
        elif action == "temperature":
            self.temperature = float(args["value"])
        elif action == "panic":
            self.all_notes_off("panic")
        else:
            raise ValueError(f"unknown action {action!r}")
        return {}

    async def _generate(self, action: str, args: dict) -> dict:
        p = self.performance

        def make_request() -> Any:
            if action == "regenerate":
                seed = args.get("seed", self.seed)
                if seed is None:  # a fresh roll each time unless a seed is pinned
                    seed = time.monotonic_ns() % 1_000_003
                params = {k: args[k] for k in ("first_bar", "bars") if args.get(k) is not None}
                return p.make_request("regenerate", seed=seed, temperature=self.temperature,
                                      **params)
            if action == "vary":
                return p.make_request("vary", delta=float(args["delta"]),
                                      seed=args.get("seed", self.seed))
            if action == "step":
                alpha = p.next_alpha(int(args.get("direction", 1)),
                                     self.config["daemon"]["interp_steps"])
            else:
                alpha = float(args["alpha"])
            return p.make_request("interpolate", alpha=alpha)

        async def job() -> dict:
            # The snapshot is taken when the job runs, not when it was queued: latest state.
            t_press = time.perf_counter()
            request = make_request()  # a ValueError here: the command does not fit the state
            taken = None
            if action == "regenerate":
                taken = await self.preparer.take(request, args.get("seed", self.seed))
            t0 = time.perf_counter()
            if taken is not None:
                request, gens = taken  # computed before the press (daemon/prepare.py)
            else:
                try:
                    gens = await self.worker.run_request(request)
                except Exception as e:  # whatever the engine raises (a fake's: ValueError)
                    raise EngineFailure(str(e)) from e
                self.last_latency_ms = (time.perf_counter() - t0) * 1000
            try:
                p.apply(request, gens)  # StaleRequestError (mode changed meanwhile) stays plain
            except ResultError as e:  # the engine returned something unusable
                raise EngineFailure(str(e)) from e
            return {"first_bar": request.first_bar, "last_bar": request.last_bar,
                    "tokens": [int(t) for t in gens[-1].tokens],
                    "latency_ms": round(getattr(gens[-1], "latency_ms", 0.0)
                                        if taken else self.last_latency_ms or 0.0, 2),
                    "ready": taken is not None,
                    "press_ms": round((time.perf_counter() - t_press) * 1000, 3)}

        result = await self.coalescer.run(job)
        self.prepare_next()  # the next answer, behind this one
        return result

    def prepare_next(self) -> None:
        """Prepare the answer to the next regenerate press, if the engine has nothing to do."""
        if not self.config["daemon"]["prepare_ahead"] or self._tg is None or self.coalescer.busy:
            return
        seed = self.seed if self.seed is not None else time.monotonic_ns() % 1_000_003
        try:
            request = self.performance.make_request("regenerate", seed=seed,
                                                    temperature=self.temperature)
        except ValueError as e:  # nothing to prepare in this state
            log.debug("nothing prepared: %s", e)
            return
        self.preparer.prepare(request, self.seed)

    async def _revive_worker(self, error: Exception) -> None:
        if isinstance(error, BrokenExecutor):  # the child died: start a fresh one
            with contextlib.suppress(Exception):
                await self.worker.close()
            try:
                await self.worker.start()
            except Exception:  # raised here it would end the TaskGroup, and the daemon
                log.exception("engine worker could not be restarted; generation is off")
