"""The engine, run apart from the timing path: a worker thread or a spawned process.

The engine is synchronous and CPU-heavy. In a thread it shares the GIL with the clock thread
(torch ops release it, Python glue does not); in a process (multiprocessing "spawn", engine
loaded in the child) nothing is shared. `bench_timing` measures both; config
`[daemon] engine_worker` picks one. `Coalescer` keeps at most one request in flight plus the
latest pending one, so a fast knob never queues up stale work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineLoadError(RuntimeError):
    """The engine could not be loaded; the message names the model directory."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker needs to build the engine itself (picklable, for spawn)."""

    kind: str = "real"  # real | fake
    model_dir: str = "models/clsm-default"
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # engine config; fake: busy_ms, load
    busy_ms: float = 0.0  # artificial CPU load per call (benchmarks)
    busy_kind: str = "python"  # python (holds the GIL) | torch (releases it in ops)


class BusyEngine:
    """Wraps an engine and burns CPU on every call, like a real model would."""

    def __init__(self, inner: Any, busy_ms: float, kind: str = "python") -> None:
        self._inner, self._busy_s, self._kind = inner, busy_ms / 1000.0, kind

    def _burn(self) -> None:
        end = time.perf_counter() + self._busy_s
        if self._kind == "torch":
            import torch
            a = torch.randn(256, 256)
            while time.perf_counter() < end:
                a = torch.tanh(a @ a)  # ops release the GIL, glue between them does not
            return
        x = 0
        while time.perf_counter() < end:  # pure Python: holds the GIL throughout
            x = (x * 31 + 7) % 1000003

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "info" or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._burn()
            return attr(*args, **kwargs)
        return call


def build_engine(spec: EngineSpec) -> Any:
    """Build the engine in the worker (thread or child process)."""
    if spec.kind == "real" or spec.busy_kind == "torch":
        import torch  # only then: importing it costs seconds of start-up
        torch.set_num_threads(spec.threads)
    if spec.kind == "fake":
        from daemon.fake_engine import FakeEngine
        engine: Any = FakeEngine()
    else:
        engine = _load_real(spec)
    return BusyEngine(engine, spec.busy_ms, spec.busy_kind) if spec.busy_ms > 0 else engine


def resolve_model_dir(path: str | Path) -> Path:
    """A relative model path is looked up from the working directory, then in the source
    checkout this package runs from (so `clsm-daemon` finds models/clsm-default anywhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_dir():
        return p
    checkout = Path(__file__).resolve().parent.parent / p
    return checkout if checkout.is_dir() else p


def _load_real(spec: EngineSpec) -> Any:
    model_dir = resolve_model_dir(spec.model_dir)
    try:
        from engine import runtime
    except ImportError as e:
        raise EngineLoadError(
            f"cannot load the model from {model_dir.resolve()}: the engine runtime "
            f"(engine/runtime.py) is not available ({e}); run with --engine fake to try the "
            "daemon without a model") from e
    if not model_dir.is_dir():
        raise EngineLoadError(
            f"model directory {model_dir.resolve()} does not exist; pass --model DIR (a model "
            "folder: models/clsm-default of a clone of the repository, or one written by "
            "clsm-export) or run with --engine fake. A pip-installed clsm-daemon ships no model "
            "(the default one is 34 MB and stays in the repository)")
    try:
        return runtime.Engine.load(model_dir, threads=spec.threads, **spec.options)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one clear error
        raise EngineLoadError(f"cannot load the model from {model_dir.resolve()}: {e}") from e


# --- workers ------------------------------------------------------------------------------

_engine: Any = None  # the engine of this worker (thread pool of 1, or the child process)


def _init(spec: EngineSpec) -> None:
    global _engine
    if multiprocessing.parent_process() is not None:
        # Ctrl-C (and a closed terminal's SIGHUP) reach the whole process group; the parent
        # decides when the child ends.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _engine = build_engine(spec)


def _call(method: str, args: tuple, kwargs: dict) -> Any:
    return getattr(_engine, method)(*args, **kwargs)


def _run_request(request: Any) -> list[Any]:
    from daemon.buffer import run_request  # the request's own rules (re-roll) run here too
    return run_request(_engine, request)


@contextlib.contextmanager
def _sighup_blocked() -> Iterator[None]:
    """SIGHUP blocked in this thread meanwhile (issue 15, defect 6).

    A closed terminal sends SIGHUP to the whole process group. The daemon ends every note and
    then its engine process; but multiprocessing's resource tracker, which ignores only SIGINT
    and SIGTERM, died of it, and the parent then printed a warning and a traceback per
    semaphore. A process inherits its parent's signal mask across fork and exec, so the tracker
    and the engine child started here never see SIGHUP; they end when the daemon ends them."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _start_resource_tracker() -> None:
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # now, under the mask, not at the pool's first lock


class EngineWorker:
    """`async with EngineWorker(spec, "process") as w: gen = await w.call("infill", ...)`."""

    def __init__(self, spec: EngineSpec, kind: str = "process") -> None:
        if kind not in ("thread", "process"):
            raise ValueError(f"engine worker must be thread or process, not {kind!r}")
        self.spec, self.kind = spec, kind
        self._pool: Executor | None = None
        self.engine_info: dict = {}

    async def start(self) -> EngineWorker:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            if self.kind == "thread":
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="engine")
                started = loop.run_in_executor(self._pool, _init, self.spec)
            else:
                with _sighup_blocked():  # the processes started here inherit the blocked SIGHUP
                    _start_resource_tracker()
                    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
                    self._pool = ProcessPoolExecutor(1, mp_context=ctx)
                    started = loop.run_in_executor(self._pool, _init, self.spec)  # spawns it
            await started
            self.engine_info = await self.call("info")
        except BaseException:
            await self.close()
            raise
        log.info("engine %s ready in a %s worker (%.2f s)", self.engine_info.get("name", "?"),
                 self.kind, time.perf_counter() - t0)
        return self

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._pool is None:
            raise RuntimeError("engine worker is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _call, method, args, kwargs)

    async def run_request(self, request: Any) -> list[Any]:
        """daemon.buffer.run_request on the worker's engine: the generations of a request."""
        if self._pool is None:
            raise RuntimeError("engine worker is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _run_request, request)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Do not block the loop on a call still running; the child exits with the pool.
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> EngineWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Superseded(Exception):
    """A pending request was replaced by a newer one before it ran."""


class Coalescer:
    """At most one job in flight plus the latest pending; older pending jobs are superseded."""

    def __init__(self) -> None:
        self._running = False
        self._pending: tuple[Callable[[], Awaitable[Any]], asyncio.Future] | None = None

    @property
    def busy(self) -> bool:
        return self._running

    async def run(self, job: Callable[[], Awaitable[T]]) -> T:
        """Run `job` now, or after the one in flight; raises Superseded if replaced first."""
        if self._running:
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            if self._pending is not None and not self._pending[1].done():  # may be cancelled
                self._pending[1].set_exception(Superseded())
            self._pending = (job, fut)
            try:
                job, _ = await fut  # woken with the job to run by the finishing one
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._hand_over()  # handed the slot, cancelled before running: pass it on
                raise
        self._running = True
        try:
            return await job()
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        self._running = False
        while self._pending is not None:
            nxt, self._pending = self._pending, None
            if not nxt[1].done():  # its caller may have been cancelled meanwhile
                self._running = True  # hand over without a gap a third caller could take
                nxt[1].set_result(nxt)
                break
