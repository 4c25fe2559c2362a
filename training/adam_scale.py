"""How close a run's Adam state is to Adam's eps, per part of the CLSM.

    python -m training.adam_scale runs/clsm-cpu/ckpt.pt [more checkpoints ...]

Adam steps by lr * m / (sqrt(v) + eps): a weight whose gradient RMS sqrt(v) is near eps (1e-8)
takes a shorter step than its gradient's scale alone would give. The prior and the flow learn
from the KL term alone, so their gradients shrink with beta; this prints, for the encoder, the
prior (its trunk and flow) and the decoder, the median sqrt(v) and the share of weights under
1e-8 (step at least halved) and under 1e-7 (shortened by 9% or more). A resumable snapshot
(training.snapshot) stores the moments in bf16: a close enough reading of their scale.
"""

from __future__ import annotations

import argparse

import torch

from engine.model import CLSM

PARTS = ("encoder.", "prior.", "decoder.")


def adam_scale(ckpt: dict) -> dict[str, dict[str, float]]:
    """{part: {median_rms, share_below_1e-8, share_below_1e-7}} of a training checkpoint."""
    names = [name for name, _ in CLSM.from_checkpoint(ckpt).named_parameters()]
    state = ckpt["optimizer"]["state"]  # keyed by the parameter's index in model.parameters()
    out = {}
    for part in PARTS:
        rms = torch.cat([state[i]["exp_avg_sq"].float().flatten().sqrt()
                         for i, name in enumerate(names) if name.startswith(part) and i in state])
        out[part.rstrip(".")] = {"median_rms": rms.median().item(),
                                 "share_below_1e-8": (rms < 1e-8).float().mean().item(),
                                 "share_below_1e-7": (rms < 1e-7).float().mean().item()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    for path in args.checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        beta = ckpt.get("config", {}).get("train", {}).get("beta_kl")
        print(f"{path}: step {ckpt['step']}, beta_kl {beta}")
        for part, figures in adam_scale(ckpt).items():
            print(f"  {part:8s} median sqrt(v) {figures['median_rms']:.2e}   under 1e-8 "
                  f"{figures['share_below_1e-8']:.3f}   under 1e-7 {figures['share_below_1e-7']:.3f}")


if __name__ == "__main__":
    main()
