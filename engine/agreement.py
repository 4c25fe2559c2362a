"""Token agreement of a reduced-precision backend with the float32 one (issue 12).

    python -m engine.agreement --model models/clsm-default --data cache/windows.npz \\
        [--split test] [--n 256] [--backend fast-bf16] [--reference fast]
        [--temperature 1.0 --top-p 0.9] [--json]

For each of n windows of the split (read only), a target of 1-4 bars at a random place (seeded),
z drawn from the prior with the same seed by both backends, argmax-decoded (or sampled with
--temperature > 0, the same noise in both): the share of
target tokens (and of whole targets) that come out identical, and how far z moved.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from engine import tokens as tk
from engine.runtime import Engine


def load_split(path: Path, split: str) -> np.ndarray:
    """Untransposed windows (N, 128) of one split of a training.prepare cache."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(s) for s in z["split_names"]]
        return z["windows"][z["split"] == names.index(split)]


def agreement(model: Path, windows: np.ndarray, n: int, backend: str, reference: str,
              seed: int = 0, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """temperature 0 = argmax; > 0 = sampling (the daemon's default decoding), with the same
    Gumbel noise in both backends (the engine derives it from the context)."""
    test, ref = (Engine.load(model, backend=b, threads=1, temperature=temperature, top_p=top_p)
                 for b in (backend, reference))
    rng = np.random.default_rng(seed)
    same_tokens = total_tokens = same_targets = 0
    dz = []
    picks = rng.choice(len(windows), size=min(n, len(windows)), replace=False)
    for i, w in enumerate(picks):
        bars = int(rng.integers(1, tk.MAX_TARGET_BARS + 1))
        first = int(rng.integers(1, tk.N_BARS - bars + 2))
        tokens = [int(t) for t in windows[w]]
        a = test.infill(tokens, first, first + bars - 1, seed=i)
        b = ref.infill(tokens, first, first + bars - 1, seed=i)
        same = int(np.sum(np.array(a.tokens) == np.array(b.tokens)))
        same_tokens += same
        total_tokens += len(b.tokens)
        same_targets += same == len(b.tokens)
        dz.append(float(np.abs(a.z - b.z).max()))
    return {"backend": backend, "reference": reference, "windows": len(picks),
            "target_tokens": total_tokens,
            "identical_token_share": round(same_tokens / total_tokens, 5),
            "identical_target_share": round(same_targets / len(picks), 4),
            "max_abs_dz_p50": round(float(np.median(dz)), 6),
            "max_abs_dz_max": round(float(np.max(dz)), 6)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="training.prepare cache (.npz)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--backend", default="fast-bf16")
    parser.add_argument("--reference", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = argmax")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus when sampling")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = agreement(args.model, load_split(args.data, args.split), args.n, args.backend,
                       args.reference, args.seed, args.temperature, args.top_p)
    result |= {"model": str(args.model), "data": str(args.data), "split": args.split,
               "temperature": args.temperature, "top_p": args.top_p}
    print(json.dumps(result, indent=2 if args.json else None))


if __name__ == "__main__":
    main()
