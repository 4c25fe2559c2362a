"""A private JACK server (dummy backend) for benchmarks and tests, started and stopped cleanly.

Two JACK facts shape this module:
- JACK keeps a registry of at most 8 servers in /dev/shm. A jackd that is killed (SIGKILL, or
  its parent died and nobody stopped it) leaves its entry behind, and only a server of the
  *same name* reclaims it; with a fresh unique name per run, 8 such leftovers make every
  later start fail with "Too many servers already active". So names come from a small pool
  (`<prefix>-<uid>-<slot>`) and a busy slot just moves on to the next one.
- jackd must never outlive the process that started it: it is started under
  `setpriv --pdeathsig TERM`, so it gets a SIGTERM (and unregisters cleanly) if its parent dies.
Its output goes to a log file, never to an undrained pipe (a full pipe blocks jackd's logging).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

POOL = 6  # slots tried per prefix; leaves room in JACK's 8-server registry for others


class JackdError(RuntimeError):
    """jackd is missing or would not start; the message says why."""


@dataclass
class JackServer:
    name: str
    process: subprocess.Popen
    log_path: Path
    period: int

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (and never auto-start another one)."""
        return dict(os.environ, JACK_DEFAULT_SERVER=self.name, JACK_NO_START_SERVER="1")


def _answers(name: str) -> bool:
    env = dict(os.environ, JACK_DEFAULT_SERVER=name, JACK_NO_START_SERVER="1")
    try:
        return subprocess.run(["jack_lsp"], env=env, capture_output=True,
                              timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_jack(prefix: str = "clsm-test", period: int = 256, *, realtime: bool = True,
               timeout: float = 10.0) -> JackServer:
    """Start `jackd -d dummy -r 48000 -p <period>` under a free pooled name; waits until it answers.

    Call it before any other JACK client of this server exists: readiness is checked with
    jack_lsp, a short-lived client (see docs on JACK client churn in daemon/midi_io.py).
    """
    jackd = shutil.which("jackd")
    if jackd is None:
        raise JackdError("jackd not installed (apt-get install --no-install-recommends jackd2)")
    setpriv = shutil.which("setpriv")
    last = ""
    for slot in range(POOL):
        name = f"{prefix}-{os.getuid()}-{slot}"
        if _answers(name):
            continue  # someone else's live server
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        cmd = [jackd] + ([] if realtime else ["--no-realtime"]) + [
            "-n", name, "-d", "dummy", "-r", "48000", "-p", str(period)]
        if setpriv is not None:
            cmd = [setpriv, "--pdeathsig", "TERM", *cmd]
        env = dict(os.environ, JACK_NO_AUDIO_RESERVATION="1")
        with os.fdopen(fd, "w") as logf:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT)
        server = JackServer(name, proc, Path(path), period)
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            if _answers(name):
                log.info("jackd %s up (period %d frames)", name, period)
                return server
            time.sleep(0.05)
        last = server.log_tail(5)
        stop_jack(server)
        if "already active" not in last and "Too many servers" not in last:
            break  # not a name clash: another slot will not help
    raise JackdError(f"jackd did not start: {last or 'no output'}")


def stop_jack(server: JackServer, timeout: float = 10.0) -> None:
    """SIGTERM and wait: a clean exit frees the server's registry entry (SIGKILL would not)."""
    proc = server.process
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("jackd %s ignored SIGTERM for %.0f s; killing it", server.name, timeout)
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(OSError):
        server.log_path.unlink()
