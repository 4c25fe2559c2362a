"""Answers ready before the press: one regenerate candidate computed ahead (issue 11).

When the target's context changes (a bar line after the player played, a result applied, a new
target), the daemon asks the engine for the candidate the next regenerate press would get, while
nothing else is running. A press whose request is the same in everything that shapes the answer
(buffer snapshot, target bars, history and its known candidates, epoch, temperature, and the
seed when one is pinned) is answered from it - or from the run still under way - instead of
starting the engine, and the next one is prepared behind it. A press that differs runs as
before; the prepared run is dropped (an engine call already under way finishes first: the
engine has one worker). The history and re-roll rules are untouched: the prepared request
carries the history's known candidates like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from daemon.history import GenerationRequest

log = logging.getLogger(__name__)

Run = Callable[[GenerationRequest], Awaitable[list[Any]]]


def fingerprint(request: GenerationRequest, pinned_seed: int | None) -> tuple:
    """What shapes a regenerate's answer; the seed only when the player pinned one."""
    return (request.kind, request.tokens, request.first_bar, request.last_bar, request.key,
            request.known, request.epoch, request.params.get("temperature"), pinned_seed)


@dataclass
class _Ahead:
    request: GenerationRequest
    key: tuple
    task: asyncio.Task[list[Any]]


class Preparer:
    """Holds at most one prepared (or preparing) regenerate answer."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._ahead: _Ahead | None = None
        self.prepared = 0  # preparations started
        self.hits = 0  # presses answered from a prepared candidate

    @property
    def ready(self) -> bool:
        """A prepared answer is there (not still being computed)."""
        a = self._ahead
        return a is not None and a.task.done() and not a.task.cancelled() \
            and a.task.exception() is None

    def prepare(self, request: GenerationRequest, pinned_seed: int | None) -> bool:
        """Start computing `request` unless the same one is ready or under way."""
        key = fingerprint(request, pinned_seed)
        if self._ahead is not None and self._ahead.key == key:
            return False
        self.discard()
        task = asyncio.get_running_loop().create_task(self._run(request), name="prepare")
        task.add_done_callback(_log_failure)
        self._ahead = _Ahead(request, key, task)
        self.prepared += 1
        log.debug("preparing a candidate for bars %d-%d", request.first_bar, request.last_bar)
        return True

    async def take(self, request: GenerationRequest,
                   pinned_seed: int | None) -> tuple[GenerationRequest, list[Any]] | None:
        """The prepared answer to `request` (awaited if still running), or None."""
        a = self._ahead
        if a is None or a.key != fingerprint(request, pinned_seed):
            return None
        self._ahead = None
        try:
            gens = await asyncio.shield(a.task)
        except Exception:  # logged by _log_failure; the press runs the engine itself
            return None
        self.hits += 1
        return a.request, gens

    def discard(self) -> None:
        a, self._ahead = self._ahead, None
        if a is not None and not a.task.done():
            a.task.cancel()  # the result is not wanted; a call under way still finishes

    async def close(self) -> None:
        a, self._ahead = self._ahead, None
        if a is not None:
            a.task.cancel()
            with contextlib.suppress(BaseException):
                await a.task


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("preparing a candidate failed: %s", task.exception())
