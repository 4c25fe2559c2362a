"""The training run's validation figures for saved models, over as many batches as asked:

    python -m training.validate CKPT_OR_MODEL_FOLDER... [--data cache/windows.npz] [--batches 40]
        [--batch 32] [--free-batches N]

Teacher-forced reconstruction (nats/token), accuracy and KL from one posterior draw, beta 1, on
the same fixed, seeded batches of the valid split as training.train's validation (its first
[train] valid_batches of them, at the CPU configs' batch of 32 unless --batch says otherwise):
the run's log figures for any checkpoint, e.g. over more
batches than the run used. The posterior draws are seeded here (in the run they come from the
training's random stream), so the same checkpoint gives the same figures. --free-batches N adds
fr_acc, the free-running argmax accuracy over the first N batches (the run's valid_free_batches).
"""

from __future__ import annotations

import argparse
import json

import torch

from training.eval_models import load_for_eval
from training.train import DEFAULT_PATH, load_train_config, validate
from training.windows import load_windows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="+", help="training checkpoints or model folders")
    p.add_argument("--data", default="cache/windows.npz")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch", type=int, default=32, help="windows per batch (the run's batch_size)")
    p.add_argument("--free-batches", type=int, default=0,
                   help="of those, decode this many freely too (fr_acc)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tcfg = load_train_config(DEFAULT_PATH)["train"]
    valid = load_windows(args.data, "valid")
    if len(valid) == 0:
        raise SystemExit(f"{args.data} has no valid windows")
    for path in args.checkpoint:
        m = load_for_eval(path)
        if m.kind != "clsm":
            raise SystemExit(f"{path} is a {m.kind} checkpoint, not a CLSM")
        torch.manual_seed(tcfg["seed"])  # the posterior draws: the same figures every time
        figures = validate(m.model, valid, tcfg["seed"], args.batches, args.batch,
                           tcfg["target_bars"], free_batches=args.free_batches)
        print(json.dumps({"checkpoint": path, "batches": args.batches, "batch": args.batch,
                          **{k: round(v, 4) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
