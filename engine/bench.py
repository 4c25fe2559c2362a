"""Engine benchmark (SPEC section 6): prints figures, asserts nothing about time.

    python -m engine.bench [--model models/clsm-default] [--threads 1] [--json]

Without --model a default-size model with random weights is exported to a temporary folder.
Measures, on `threads` torch threads: 1-4 bar infill (cold = prior + decode for a new context,
warm = same context again, whose prior is remembered), an 8-point interpolation and a
variation of a 4-bar target, the naive full-recompute decode of the same z (and whether its
tokens are identical), the eager backend, start-up (load + warm-up) in a fresh process and
peak resident memory. The machine may be shared: wall times come with the process CPU time
and the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine import export
from engine import tokens as tk
from engine.model import CLSM
from engine.runtime import Engine

TARGETS = {1: (3, 3), 2: (3, 4), 3: (3, 5), 4: (3, 6)}  # bars, both-sided context


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """p50 / p99 wall ms and p50 thread-CPU ms over `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return {"p50_ms": round(float(np.percentile(wall, 50)), 2),
            "p99_ms": round(float(np.percentile(wall, 99)), 2),
            "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 2), "n": repeats}


def startup(model_dir: Path, threads: int) -> dict:
    """Load + warm-up in a fresh interpreter, with its peak RSS after a few calls."""
    code = (
        "import json, resource, time; t0 = time.perf_counter()\n"
        "from engine.runtime import Engine\n"
        "t1 = time.perf_counter()\n"
        f"e = Engine.load({str(model_dir)!r}, threads={threads})\n"
        "t2 = time.perf_counter()\n"
        "toks = [30] * 128\n"
        "g = e.infill(toks, 3, 6, seed=0)\n"
        "e.interpolate(toks, 3, 6, g.z, e.infill(toks, 3, 6, seed=1).z, [i / 7 for i in range(8)])\n"
        "print(json.dumps({'import_s': t1 - t0, 'load_warm_s': t2 - t1, 'total_s': t2 - t0,\n"
        "  'load_ms': e.load_ms, 'warmup_ms': e.warmup_ms,\n"
        "  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return {k: round(v, 3) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def bench_engine(engine: Engine, tokens: list[int], repeats: int) -> dict:
    out: dict = {}
    for bars, (first, last) in TARGETS.items():
        def cold(first: int = first, last: int = last) -> None:
            engine._priors.clear()  # a new context: the prior runs again
            engine.infill(tokens, first, last, seed=1)

        out[f"infill_{bars}bar_cold"] = timed(cold, repeats)
        engine.infill(tokens, first, last, seed=0)
        out[f"infill_{bars}bar_warm"] = timed(
            lambda f=first, la=last: engine.infill(tokens, f, la, seed=2), repeats)
    first, last = TARGETS[4]
    za, zb = engine.infill(tokens, first, last, seed=1).z, engine.infill(tokens, first, last, seed=2).z
    alphas = [i / 7 for i in range(8)]
    out["interpolate_8pt_4bar"] = timed(
        lambda: engine.interpolate(tokens, first, last, za, zb, alphas), repeats)
    out["vary_4bar"] = timed(lambda: engine.vary(tokens, first, last, za, 0.5, seed=3), repeats)
    out["decode_4bar_given_z"] = timed(lambda: engine.infill(tokens, first, last, z=za), repeats)
    return out


def bench_naive(model: CLSM, engine: Engine, tokens: list[int], repeats: int) -> dict:
    out: dict = {}
    x = torch.tensor([tokens])
    for bars in (1, 4):
        first, last = TARGETS[bars]
        start, end = tk.target_steps(first, last)
        g = engine.infill(tokens, first, last, seed=1)
        z = torch.from_numpy(g.z)[None]
        with torch.inference_mode():
            naive = model.decode_naive(x, z, start, end - start)[0].tolist()
            out[f"naive_decode_{bars}bar"] = timed(
                lambda s=start, n=end - start, z=z: model.decode_naive(x, z, s, n), repeats)
        out[f"naive_decode_{bars}bar"]["identical_tokens"] = naive == g.tokens
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CLSM engine benchmark")
    parser.add_argument("--model", type=Path, help="model folder (default: random weights)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--naive-repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "clsm-random"
            model, source = export.random_model(Path(__file__).parent.parent
                                                / "configs" / "default.toml")
            export.export(model, model_dir, source=source)
        result: dict = {"model": str(args.model or "random default-size"),
                        "threads": args.threads, "torch": torch.__version__,
                        "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
        result["startup"] = startup(model_dir, args.threads)
        tokens = [int(t) for t in np.random.default_rng(0).integers(0, tk.N_SYMBOLS, tk.SEQ_LEN)]
        engines = {b: Engine.load(model_dir, backend=b, threads=args.threads)
                   for b in ("torchscript", "eager")}
        for name, engine in engines.items():
            result[name] = bench_engine(engine, tokens, args.repeats)
        ckpt = torch.load(model_dir / export.EAGER_FILE, weights_only=True)
        model = CLSM.from_checkpoint(ckpt).float().eval()
        result["naive"] = bench_naive(model, engines["torchscript"], tokens, args.naive_repeats)
    ts, naive = result["torchscript"], result["naive"]
    eager = result["eager"]
    pairs = {"1bar_vs_naive": (naive["naive_decode_1bar"], ts["infill_1bar_warm"]),
             "4bar_vs_naive": (naive["naive_decode_4bar"], ts["decode_4bar_given_z"]),
             "torchscript_vs_eager_4bar": (eager["decode_4bar_given_z"], ts["decode_4bar_given_z"]),
             "torchscript_vs_eager_interp": (eager["interpolate_8pt_4bar"],
                                             ts["interpolate_8pt_4bar"])}
    # CPU-time ratios too: on a shared machine the wall-time ratio mostly measures the load.
    result["speedup"] = {k: {"wall": round(slow["p50_ms"] / fast["p50_ms"], 1),
                             "cpu": round(slow["cpu_p50_ms"] / fast["cpu_p50_ms"], 1)}
                         for k, (slow, fast) in pairs.items()}
    result["peak_rss_mb_bench"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_table(result)


def print_table(r: dict) -> None:
    print(f"model: {r['model']}  threads: {r['threads']}  torch {r['torch']}  "
          f"load avg before/after: {r['loadavg_before']} / {r['loadavg_after']}")
    print(f"{'case':32s} {'backend':12s} {'p50 ms':>8s} {'p99 ms':>8s} {'cpu p50':>8s}")
    for backend in ("torchscript", "eager", "naive"):
        for case, m in r[backend].items():
            extra = f"  identical={m['identical_tokens']}" if "identical_tokens" in m else ""
            print(f"{case:32s} {backend:12s} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
                  f"{m['cpu_p50_ms']:8.2f}{extra}")
    print("speed-up:", r["speedup"])
    s = r["startup"]
    print(f"start-up (fresh process): import {s['import_s']:.2f} s + load/warm-up "
          f"{s['load_warm_s']:.2f} s (load {s['load_ms']:.0f} ms, warm-up "
          f"{s['warmup_ms']:.0f} ms); peak RSS {s['peak_rss_mb']:.0f} MB "
          f"(bench process with both backends: {r['peak_rss_mb_bench']:.0f} MB)")


if __name__ == "__main__":
    main()
