"""Start-up time and idle CPU of the whole daemon, as a player starts it (issue 11).

`python -m daemon.bench_startup [--model DIR] [--repeats 5] [--idle-s 20] [--json]` starts a
private JACK server (dummy backend), then for each repeat runs `run_daemon.py --midi-api jack`
as a new process and reports:
- `ready_s`: process start to the daemon's "ready:" log line (imports, config, engine load
  and warm-up, ports open); also `engine_s`, to the engine's own "ready:" line (loaded and warm),
  and each run's `timeline` (the log lines up to ready, with their times);
- `idle_cpu_pct`: the daemon's CPU use (user + system, all threads, from /proc) over `idle_s`
  seconds after ready, transport playing, no input: the clock thread's own cost;
then ends it with SIGTERM and checks it exits 0. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.jackd import start_jack, stop_jack

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def one_start(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "run_daemon.py"), "--midi-api", "jack", "--port-name",
           f"bench{os.getpid()}", "--log-level", "INFO", *(["--model", args.model] if args.model
                                                            else [])]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    ready = threading.Event()
    lines: list[str] = []

    def read() -> None:  # stderr is drained for the whole run: a full pipe would block it
        assert proc.stderr is not None
        for line in proc.stderr:
            now = time.monotonic() - t0
            lines.append(f"{now:7.3f} {line.rstrip()[:160]}")
            if "engine" not in marks and re.search(r"engine\.runtime: engine .* ready:", line):
                marks["engine"] = now
            if re.search(r" daemon: ready:", line) and "ready" not in marks:
                marks["ready"] = now
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(args.timeout):
            tail = "\n".join(lines[-20:])
            raise RuntimeError(f"no 'ready:' line within {args.timeout:.0f} s; log tail:\n{tail}")
        cpu0, w0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle_s)
        cpu1, w1 = cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        reader.join(5)
    return {"ready_s": round(marks["ready"], 3), "engine_s": round(marks.get("engine", -1), 3),
            "idle_cpu_pct": round(100 * (cpu1 - cpu0) / (w1 - w0), 2), "exit_code": code,
            "timeline": [ln for ln in lines if float(ln.split()[0]) <= marks["ready"]]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="model folder (default: the config's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    server = start_jack("clsm-startup")
    try:
        env = dict(os.environ, JACK_DEFAULT_SERVER=server.name, JACK_NO_START_SERVER="1")
        runs = [one_start(args, env) for _ in range(args.repeats)]
    finally:
        stop_jack(server)
    summary = {key: {"p50": float(np.median([r[key] for r in runs])),
                     "max": float(max(r[key] for r in runs))}
               for key in ("ready_s", "engine_s", "idle_cpu_pct")}
    out = {"model": args.model or "(config default)", "repeats": args.repeats,
           "idle_s": args.idle_s, "runs": runs, "summary": summary,
           "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, s in summary.items():
            print(f"{key:14s} p50 {s['p50']:.3f}  max {s['max']:.3f}")
        print("exit codes:", [r["exit_code"] for r in runs])


if __name__ == "__main__":
    main()
