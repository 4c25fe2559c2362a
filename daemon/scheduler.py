"""Output scheduler: tokens -> note-on / note-off, decided ahead, sent at the step's ideal time.

The loop `plan`s step k twice: as soon as step k-1 has sounded (a whole step ahead), and again
shortly before k sounds with the freshest state (the revision replaces the first plan); the
clock `fire`s step k at its ideal time, which only sends the prepared messages. A loop that is
late for the revision (a stall longer than the look-ahead) costs freshness, not the step: the
first plan plays. Only a stall of about a whole step leaves a step with no plan at all.
The sounding note changes only when a plan is fired, so a plan that misses its step is dropped
whole: past steps are never played late, and the next plan still ends the note that is really
sounding - nothing hangs, nothing doubles.

New content (another content version) arriving in the middle of one of its notes sounds from
the next step: a hold of the new content starts the pitch it holds (the performance names it);
a hold of the same content whose onset never sounded stays silent (never late).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import mido

from engine.tokens import HOLD, is_pitch, token_to_pitch

log = logging.getLogger(__name__)

Send = Callable[[mido.Message], None]
# (token, content_version) or (token, content_version, pitch token of the note the step is in)
Output = tuple[int, int] | tuple[int, int, int | None]


@dataclass(frozen=True)
class Sounding:
    pitch: int
    version: int  # content_version of the content that started the note


@dataclass(frozen=True)
class Plan:
    step: int
    output: Output | None  # what it was decided from
    base: Sounding | None  # the sounding note it was decided on
    prev_version: int | None  # content version of the step before
    messages: tuple[mido.Message, ...]
    after: Sounding | None  # the sounding note once these messages are sent


class Scheduler:
    def __init__(self, send: Send, channel: int = 1, velocity: int = 96) -> None:
        self._send = send
        self.channel = channel - 1  # mido channels are 0-based
        self.velocity = velocity
        self._lock = threading.Lock()
        self._sounding: Sounding | None = None
        self._plans: dict[int, Plan] = {}
        self._last_fired: int | None = None
        self._fired_version: int | None = None  # content version of the last fired step
        self.dropped_plans = 0  # steps that sounded with no plan: their content was lost
        self.late_plans = 0  # plans (revisions) that came after their step had sounded
        self.fired_steps = 0
        self._voided: set[int] = set()  # steps whose plans all-notes-off threw away on purpose

    @property
    def sounding(self) -> Sounding | None:
        return self._sounding

    def _off(self, s: Sounding) -> mido.Message:
        return mido.Message("note_off", channel=self.channel, note=s.pitch, velocity=0)

    def plan(self, step: int, output: Output | None) -> Plan | None:
        """Decide step `step` from `performance.output_token(step)`; None if it is too late.

        Plans build on the note that sounds after the last *fired* step, so call this for
        steps in order (the clock's plan events come in order).
        """
        with self._lock:
            if self._last_fired is not None and step <= self._last_fired:
                self.late_plans += 1
                log.debug("plan for step %d came after it sounded; dropped", step)
                return None
            # A plan made for the previous step but not fired yet is the base of this one.
            prev = self._plans.get(step - 1)
            current = prev.after if prev is not None else self._sounding
            prev_version = _version(prev.output) if prev is not None else self._fired_version
            plan = self._decide(step, output, current, prev_version)
            self._plans[step] = plan
            return plan

    def _decide(self, step: int, output: Output | None, current: Sounding | None,
                prev_version: int | None) -> Plan:
        token, version, note = _parts(output)
        if token == HOLD and current is not None and current.version == version:
            return Plan(step, output, current, prev_version, (), current)  # the note goes on
        msgs: list[mido.Message] = []
        if current is not None:
            msgs.append(self._off(current))  # end it before new content starts
        start = token if token is not None and is_pitch(token) else None
        if token == HOLD and version != prev_version and note is not None and is_pitch(note):
            start = note  # new content arrived in the middle of this note: it sounds from here
        after = None
        if start is not None:
            after = Sounding(token_to_pitch(start), version)
            msgs.append(mido.Message("note_on", channel=self.channel, note=after.pitch,
                                     velocity=self.velocity))
        return Plan(step, output, current, prev_version, tuple(msgs), after)

    def fire(self, step: int) -> int:
        """Timing path: send step's planned messages now. Returns how many were sent."""
        with self._lock:
            self._last_fired = step
            plan = self._plans.pop(step, None)
            # Plans for earlier steps that never fired are void.
            for old in [s for s in self._plans if s < step]:
                del self._plans[old]
            if plan is None:
                if step not in self._voided:
                    self.dropped_plans += 1
                    log.warning("step %d sounded with no plan (the loop was a step late)", step)
                self._voided.discard(step)
                return 0
            self._voided.discard(step)
            if plan.base != self._sounding or plan.prev_version != self._fired_version:
                # Decided on a plan that never fired: decide again on what really sounds.
                plan = self._decide(step, plan.output, self._sounding, self._fired_version)
            for msg in plan.messages:
                self._send(msg)
            if plan.messages and log.isEnabledFor(logging.DEBUG):  # tests read steps off it
                log.debug("step %d sent: %s", step,
                          ", ".join(f"{m.type} {m.note}" for m in plan.messages))
            self._sounding = plan.after
            self._fired_version = _version(plan.output)
            self.fired_steps += 1
            return len(plan.messages)

    def all_notes_off(self) -> None:
        """End the sounding note and forget every plan (stop, mode change, panic, failure)."""
        with self._lock:
            self._voided |= set(self._plans)
            self._plans.clear()
            if self._sounding is not None:
                self._send(self._off(self._sounding))
            self._sounding = None

    def reset_position(self) -> None:
        """After a transport jump (start, SPP): steps may repeat, so forget the last fired one."""
        with self._lock:
            self._plans.clear()
            self._voided.clear()
            self._last_fired = None
            self._fired_version = None


def _parts(output: Output | None) -> tuple[int | None, int, int | None]:
    if output is None:
        return None, -1, None
    token, version, *rest = output
    return token, version, rest[0] if rest else None


def _version(output: Output | None) -> int:
    return -1 if output is None else output[1]
