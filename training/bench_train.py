"""Training throughput on this machine: windows/s for configs x process counts, in one run.

    python -m training.bench_train --data cache/windows.npz [--config configs/default.toml
        --config configs/cpu.toml] [--procs 1 --procs 2] [--seconds 90] [--json]

Each cell is a real short run of training.train (one thread per process; torchrun for more
than one process) into a temporary folder; windows/s is measured over the second half of the
run (after start-up and the first steps), from the log's per-step times. Pause any other
training first (scripts/with_training_paused.sh) and say what else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from training.train import load_train_config


def measure(config: str, procs: int, data: str, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        train = ["-m", "training.train", "--config", config, "--data", data, "--out", out,
                 "--threads", "1", "--minutes", str(seconds / 60), "--quiet"]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={procs}", *train]
        else:
            cmd = [sys.executable, *train]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    half = [r for r in records if r["t"] >= records[-1]["t"] / 2]
    batch = load_train_config(config)["train"]["batch_size"] * procs
    steps_s = (half[-1]["step"] - half[0]["step"]) / max(1e-9, half[-1]["t"] - half[0]["t"])
    return {"config": config, "processes": procs, "steps": records[-1]["step"],
            "global_batch": batch, "steps_per_s": steps_s, "windows_per_s": steps_s * batch}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--procs", action="append", type=int, default=None)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    configs = args.config or ["configs/default.toml", "configs/cpu.toml"]
    rows = [measure(c, n, args.data, args.seconds) for c in configs for n in (args.procs or [1, 2])]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'config':24}{'procs':>6}{'batch':>7}{'steps/s':>9}{'windows/s':>11}")
    for r in rows:
        print(f"{r['config']:24}{r['processes']:>6}{r['global_batch']:>7}{r['steps_per_s']:>9.2f}"
              f"{r['windows_per_s']:>11.1f}")


if __name__ == "__main__":
    main()
