"""Resumable training state small enough to commit: python -m training.snapshot RUN/ckpt.pt
checkpoints/NAME.pt

The checkpoint keeps everything a resume needs (weights, optimizer, step, config, RNG) but
stores Adam's two moment estimates in bf16: they are running averages that Adam only divides
and scales, and bf16 keeps fp32's exponent range, so the resumed run is indistinguishable (the
test resumes from one and checks the step count and the loss). Weights stay fp32: Adam's
updates are smaller than bf16's resolution. Resume on a fresh clone with
    python -m training.train ... --resume checkpoints/NAME.pt
(training.baselines takes --resume the same way). With --ship: weights only, fp16, for
`training.evaluate` (the baselines under models/baselines/).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from training.train import load_checkpoint

MOMENTS = ("exp_avg", "exp_avg_sq")


def shrink(ckpt: dict) -> dict:
    """A copy of the checkpoint with Adam's moments in bf16."""
    opt = ckpt["optimizer"]
    state = {k: {name: (v.to(torch.bfloat16) if name in MOMENTS else v) for name, v in s.items()}
             for k, s in opt["state"].items()}
    return {**ckpt, "optimizer": {**opt, "state": state}}


def for_evaluation(ckpt: dict) -> dict:
    """Weights only, in fp16 (the evaluation computes in fp32): what models/baselines/ ships."""
    model = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    return {k: v for k, v in ckpt.items() if k not in ("optimizer", "torch_rng", "model")} | {"model": model}


def write_snapshot(src: str | Path, dst: str | Path, ship: bool = False) -> int:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    ckpt = load_checkpoint(src)
    torch.save(for_evaluation(ckpt) if ship else shrink(ckpt), tmp)
    os.replace(tmp, dst)
    return dst.stat().st_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="a training checkpoint (RUN/ckpt.pt)")
    p.add_argument("dst", help="where to write the committed snapshot")
    p.add_argument("--ship", action="store_true",
                   help="weights only in fp16, for evaluation (models/baselines/), not resumable")
    args = p.parse_args(argv)
    size = write_snapshot(args.src, args.dst, args.ship)
    print(f"{args.dst}: {size / 2**20:.1f} MiB (step {load_checkpoint(args.dst)['step']})")


if __name__ == "__main__":
    main()
