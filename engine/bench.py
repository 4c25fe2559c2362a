"""Engine benchmark (SPEC section 6, issue 12): prints figures, asserts nothing about time.

    python -m engine.bench [--model models/clsm-default | --config configs/default.toml]
                           [--threads 1] [--json] [--profile]
                           [--cpu-config configs/cpu.toml | --no-cpu-config]
                           [--device cpu|cuda|auto]

Without --model a default-size model with random weights is exported to a temporary folder; a
model folder exported before the fast parts existed is re-exported from its eager weights to a
temporary folder (noted in the result). Measures, on `threads` torch threads, for every
backend side by side (torchscript = the classic parts, fast = engine/fast.py's trunk with the
native C++ decode and Bi-LSTM of engine/native.py, fast-bf16 = the same decode with a bfloat16
TorchScript Bi-LSTM, fast-script = engine/fast.py all in TorchScript, eager): 1-4 bar infill
(cold = prior + decode for a new context, warm = same context again, whose prior is
remembered), an 8-point interpolation and a variation of a 4-bar target, the
decoder alone (context pass and per-token cost), the naive full-recompute decode of the same z
(and whether tokens are identical), start-up (load + warm-up) in a fresh process and peak
resident memory; then the same for a random model of the CPU config. The machine may be
shared: wall times come with the process CPU time and the load average. --device cuda runs
every backend on the GPU (the fast ones with their TorchScript loop: the C++ decode is
CPU-only), timing after a device synchronisation; that path has not run on a GPU (README).
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
from engine.device import DeviceError, add_device_argument, resolve_device, synchronize
from engine.model import CLSM
from engine.profile_step import decode_profile, latent_profile
from engine.runtime import Engine

TARGETS = {1: (3, 3), 2: (3, 4), 3: (3, 5), 4: (3, 6)}  # bars, both-sided context


def timed(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> dict:
    """p50 / p99 wall ms and p50 thread-CPU ms over `repeats` calls (each waits for the device:
    CUDA returns before its work is done)."""
    wall, cpu = [], []
    device = device or torch.device("cpu")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        synchronize(device)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return {"p50_ms": round(float(np.percentile(wall, 50)), 2),
            "p99_ms": round(float(np.percentile(wall, 99)), 2),
            "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 2), "n": repeats}


def startup(model_dir: Path, threads: int, backend: str = "torchscript",
            device: str = "cpu") -> dict:
    """Load + warm-up in a fresh interpreter, with its peak RSS after a few calls (VmHWM, not
    ru_maxrss: Linux carries ru_maxrss over an exec, so the child would report the bench
    process's own peak)."""
    code = (
        "import json, time; t0 = time.perf_counter()\n"
        "from engine.runtime import Engine\n"
        "t1 = time.perf_counter()\n"
        f"e = Engine.load({str(model_dir)!r}, threads={threads}, backend={backend!r}, "
        f"device={device!r})\n"
        "t2 = time.perf_counter()\n"
        "toks = [30] * 128\n"
        "g = e.infill(toks, 3, 6, seed=0)\n"
        "e.interpolate(toks, 3, 6, g.z, e.infill(toks, 3, 6, seed=1).z, [i / 7 for i in range(8)])\n"
        "print(json.dumps({'import_s': t1 - t0, 'load_warm_s': t2 - t1, 'total_s': t2 - t0,\n"
        "  'load_ms': e.load_ms, 'warmup_ms': e.warmup_ms,\n"
        "  'peak_rss_mb': [int(l.split()[1]) / 1024 for l in open('/proc/self/status')\n"
        "                  if l.startswith('VmHWM:')][0]}))\n")
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


def bench_decoder(engine: Engine, tokens: list[int], repeats: int) -> dict:
    """The decoder alone for a 4-bar target: the context pass (+ the first token) and the cost
    of each further token, (t64 - t1) / 63."""
    first, last = TARGETS[4]
    start, end = tk.target_steps(first, last)
    x = torch.tensor([tokens], device=engine.device)
    z = torch.from_numpy(engine.infill(tokens, first, last, seed=1).z)[None].to(engine.device)
    with torch.inference_mode():
        one = timed(lambda: engine.decoder(x, z, start, 1, 0.0, None), repeats, engine.device)
        full = timed(lambda: engine.decoder(x, z, start, end - start, 0.0, None), repeats,
                     engine.device)
    steps = end - start - 1
    return {"context_and_first_token_ms": one["p50_ms"], "decode_64_tokens_ms": full["p50_ms"],
            "per_token_ms": round((full["p50_ms"] - one["p50_ms"]) / steps, 4),
            "per_token_cpu_ms": round((full["cpu_p50_ms"] - one["cpu_p50_ms"]) / steps, 4)}


def same_tokens(engines: dict[str, Engine], tokens: list[int]) -> dict:
    """Per backend, the share of target tokens equal to the eager backend's (argmax infill of
    1-4 bar targets for 3 seeds, and an 8-point interpolation)."""
    def outputs(e: Engine) -> list[int]:
        out: list[int] = []
        for first, last in TARGETS.values():
            for seed in range(3):
                out += e.infill(tokens, first, last, seed=seed).tokens
        za = engines["eager"].infill(tokens, 3, 6, seed=1).z
        zb = engines["eager"].infill(tokens, 3, 6, seed=2).z
        for g in e.interpolate(tokens, 3, 6, za, zb, [i / 7 for i in range(8)]):
            out += g.tokens
        return out
    ref = outputs(engines["eager"])
    return {name: round(float(np.mean(np.array(outputs(e)) == np.array(ref))), 4)
            for name, e in engines.items() if name != "eager"}


def bench_naive(model: CLSM, engine: Engine, tokens: list[int], repeats: int,
                others: dict[str, Engine] | None = None) -> dict:
    """model: the eager CLSM on the engine's device."""
    out: dict = {}
    x = torch.tensor([tokens], device=engine.device)
    for bars in (1, 4):
        first, last = TARGETS[bars]
        start, end = tk.target_steps(first, last)
        g = engine.infill(tokens, first, last, seed=1)
        z = torch.from_numpy(g.z)[None].to(engine.device)
        with torch.inference_mode():
            naive = model.decode_naive(x, z, start, end - start)[0].tolist()
            out[f"naive_decode_{bars}bar"] = timed(
                lambda s=start, n=end - start, z=z: model.decode_naive(x, z, s, n), repeats,
                engine.device)
        out[f"naive_decode_{bars}bar"]["identical_tokens"] = naive == g.tokens
        for name, other in (others or {}).items():
            same = other.infill(tokens, first, last, z=g.z).tokens == naive
            out[f"naive_decode_{bars}bar"][f"identical_tokens_{name}"] = same
    return out


BACKENDS = ("torchscript", "fast", "fast-bf16", "fast-script", "eager")


def prepare_folder(model: Path | None, config: Path, tmp: Path, label: str) -> tuple[Path, str]:
    """The folder to benchmark and a note on where it came from."""
    if model is None:
        weights, source = export.random_model(config)
        export.export(weights, tmp / label, source=source)
        shown = config.resolve()
        root = Path(__file__).resolve().parents[1]
        shown = shown.relative_to(root) if root in shown.parents else Path(config.name)
        return tmp / label, f"random weights, {shown}"  # no machine paths in saved results
    manifest = json.loads((model / export.MANIFEST).read_text())
    if "fast_decoder" in manifest.get("parts", {}):
        return model, str(model)
    ckpt = torch.load(model / manifest["parts"]["eager"], map_location="cpu", weights_only=True)
    export.export(CLSM.from_checkpoint(ckpt).float(), tmp / label, source=manifest.get("source", {}))
    return tmp / label, (f"{model} re-exported from its eager weights ({manifest.get('dtype')}) "
                         f"to a temporary folder: it has no fast parts")


def bench_folder(model_dir: Path, note: str, args: argparse.Namespace) -> dict:
    device = str(args.device)
    result: dict = {"model": note, "threads": args.threads, "torch": torch.__version__,
                    "device": device, "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
    result["startup"] = startup(model_dir, args.threads, device=device)
    result["startup_fast"] = startup(model_dir, args.threads, "fast", device)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, tk.N_SYMBOLS, tk.SEQ_LEN)]
    engines = {b: Engine.load(model_dir, backend=b, threads=args.threads, device=device)
               for b in BACKENDS}
    for name, engine in engines.items():
        result[name] = bench_engine(engine, tokens, args.repeats)
    result["decoder_only"] = {name: bench_decoder(e, tokens, args.repeats)
                              for name, e in engines.items()}
    ckpt = torch.load(model_dir / export.EAGER_FILE, map_location="cpu", weights_only=True)
    model = CLSM.from_checkpoint(ckpt).float().to(args.device).eval()
    result["naive"] = bench_naive(model, engines["torchscript"], tokens, args.naive_repeats,
                                  {"fast": engines["fast"]})
    result["token_agreement_with_eager"] = same_tokens(engines, tokens)
    if args.profile:
        first, last = TARGETS[4]
        start, end = tk.target_steps(first, last)
        x = torch.tensor([tokens], device=args.device)
        z = torch.from_numpy(engines["eager"].infill(tokens, first, last, seed=1).z)[None]
        z = z.to(args.device)
        result["profile"] = {name: {"decode_4bar": decode_profile(engines[name].decoder, x, z, start,
                                                                  end - start),
                                    "prior_4bar": latent_profile(engines[name].latent, x, start,
                                                                 end - start)}
                             for name in ("torchscript", "fast-script", "fast")}
    ts, naive, eager, fast = result["torchscript"], result["naive"], result["eager"], result["fast"]
    pairs = {"1bar_vs_naive": (naive["naive_decode_1bar"], ts["infill_1bar_warm"]),
             "4bar_vs_naive": (naive["naive_decode_4bar"], ts["decode_4bar_given_z"]),
             "torchscript_vs_eager_4bar": (eager["decode_4bar_given_z"], ts["decode_4bar_given_z"]),
             "torchscript_vs_eager_interp": (eager["interpolate_8pt_4bar"],
                                             ts["interpolate_8pt_4bar"]),
             "fast_1bar_vs_naive": (naive["naive_decode_1bar"], fast["infill_1bar_warm"]),
             "fast_4bar_vs_naive": (naive["naive_decode_4bar"], fast["decode_4bar_given_z"]),
             "fast_vs_torchscript_4bar_cold": (ts["infill_4bar_cold"], fast["infill_4bar_cold"]),
             "fast_vs_torchscript_4bar_warm": (ts["infill_4bar_warm"], fast["infill_4bar_warm"]),
             "fast_vs_torchscript_interp": (ts["interpolate_8pt_4bar"],
                                            fast["interpolate_8pt_4bar"]),
             "fast-bf16_vs_torchscript_4bar_cold": (ts["infill_4bar_cold"],
                                                    result["fast-bf16"]["infill_4bar_cold"]),
             "fast_vs_fast-script_4bar_cold": (result["fast-script"]["infill_4bar_cold"],
                                               fast["infill_4bar_cold"]),
             "fast_vs_fast-script_interp": (result["fast-script"]["interpolate_8pt_4bar"],
                                            fast["interpolate_8pt_4bar"])}
    # CPU-time ratios too: on a shared machine the wall-time ratio mostly measures the load.
    result["speedup"] = {k: {"wall": round(slow["p50_ms"] / fast_["p50_ms"], 1),
                             "cpu": round(slow["cpu_p50_ms"] / fast_["cpu_p50_ms"], 1)}
                         for k, (slow, fast_) in pairs.items()}
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CLSM engine benchmark")
    parser.add_argument("--model", type=Path, help="model folder (default: random weights)")
    root = Path(__file__).parent.parent
    parser.add_argument("--config", type=Path, default=root / "configs" / "default.toml",
                        help="sizes of the random model when there is no --model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--naive-repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also profile a 4-bar decode and prior per backend (torch.profiler)")
    parser.add_argument("--cpu-config", type=Path, default=root / "configs" / "cpu.toml",
                        help="also bench a random model of this config")
    parser.add_argument("--no-cpu-config", action="store_true", help="skip the CPU-config run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_argument(parser, default="cpu")
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except DeviceError as e:
        parser.exit(2, f"engine.bench: --device: {e}\n")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, note = prepare_folder(args.model, args.config, Path(tmp), "clsm-main")
        result = bench_folder(folder, note, args)
        if not args.no_cpu_config:
            folder, note = prepare_folder(None, args.cpu_config, Path(tmp), "clsm-cpu-config")
            result["cpu_config"] = bench_folder(folder, note, args)
    result["peak_rss_mb_bench"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_table(result)
    if "cpu_config" in result:
        print()
        print_table(result["cpu_config"] | {"peak_rss_mb_bench": result["peak_rss_mb_bench"]})


def print_table(r: dict) -> None:
    print(f"model: {r['model']}  threads: {r['threads']}  device: {r.get('device', 'cpu')}  "
          f"torch {r['torch']}  "
          f"load avg before/after: {r['loadavg_before']} / {r['loadavg_after']}")
    print(f"{'case':32s} {'backend':12s} {'p50 ms':>8s} {'p99 ms':>8s} {'cpu p50':>8s}")
    for backend in (*BACKENDS, "naive"):
        for case, m in r[backend].items():
            extra = "".join(f"  {k}={v}" for k, v in m.items() if k.startswith("identical"))
            print(f"{case:32s} {backend:12s} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
                  f"{m['cpu_p50_ms']:8.2f}{extra}")
    for backend, d in r["decoder_only"].items():
        print(f"decoder only, {backend:12s} context + 1st token {d['context_and_first_token_ms']:.2f} ms,"
              f" per further token {d['per_token_ms'] * 1e3:.0f} us (cpu {d['per_token_cpu_ms'] * 1e3:.0f})")
    print("token agreement with eager:", r["token_agreement_with_eager"])
    print("speed-up:", r["speedup"])
    for key, name in (("startup", "torchscript"), ("startup_fast", "fast")):
        s = r[key]
        print(f"start-up {name} (fresh process): import {s['import_s']:.2f} s + load/warm-up "
              f"{s['load_warm_s']:.2f} s (load {s['load_ms']:.0f} ms, warm-up "
              f"{s['warmup_ms']:.0f} ms); peak RSS {s['peak_rss_mb']:.0f} MB")
    print(f"bench process peak RSS (all backends): {r['peak_rss_mb_bench']:.0f} MB")
    for name, p in r.get("profile", {}).items():
        print(f"profile {name}: {json.dumps(p)}")


if __name__ == "__main__":
    main()
