"""Where the argmax reconstruction goes wrong: teacher-forced against free-running decoding of
the encoder's mean z, on the evaluation's own windows and targets (training/evaluate.py).

    python -m training.decode_errors --checkpoint models/clsm-default [--checkpoint ...]
        --data cache/windows.npz [--split test] [--n 128] [--batch 8] [--seed 0] [--json]

Per data set and context case:
- tf_acc: teacher-forced accuracy (every target token predicted from the true ones before it);
  fr_acc: free-running argmax (evaluate.py's recon_acc). Their gap is what the decoder's own
  mistakes cost it once it feeds them back.
- tf_acc_prior / fr_acc_prior: the same with z = f^-1(mean of p(w | xC)) in place of the
  posterior mean: how much of the accuracy z carries at all.
- by_bar: both accuracies per bar of the target (bar 1 = the first regenerated bar).
- by_length: both accuracies per target length (1-4 bars), and the KL (nats, one posterior
  draw, as training computes it) and mean posterior standard deviation there: how much of z
  each length gets.
- exact: share of targets decoded without an error; first_error: mean position of the first
  error as a share of the target's length (1.0 when exact); after_first_error: accuracy of the
  tokens after it (does the decode find its way back?).
- errors: free-running errors by kind, as shares of all target tokens: missed_onset (truth a
  pitch, decoded hold or rest), extra_onset (truth hold or rest, decoded a pitch), wrong_pitch
  (both pitches; octave: 12 apart), hold_rest (hold and rest swapped).
- shifted: share of free-running errors that would be right one step early or late (a note
  placed a 16th off).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from engine import tokens as tk
from engine.model import gaussian_log_prob
from training.eval_models import ModelUnderTest, load_for_eval
from training.evaluate import CASES, case_batches, load_eval_sets

BARS = 4


def teacher_forced(m: ModelUnderTest, x: torch.Tensor, z: torch.Tensor, start: int,
                   length: int) -> torch.Tensor:
    """Argmax of the teacher-forced logits at the target positions: (B, length)."""
    starts = torch.full((x.size(0),), start, dtype=torch.long)
    logits = m.model.decoder(x, z, starts, length)  # logits for x_t at position t
    return logits[:, start:start + length].argmax(-1)


def kl_and_sd(m: ModelUnderTest, x: torch.Tensor, start: int, length: int,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: KL(q || p) from one posterior draw, and q's mean standard deviation."""
    starts = torch.full((x.size(0),), start, dtype=torch.long)
    mean, logvar = m.model.encoder(x, starts, length)
    sd = (0.5 * logvar).exp()
    z = mean + sd * torch.randn(mean.shape, generator=gen)
    p_mean, p_logvar = m.model.prior(x, starts, length)
    kl = gaussian_log_prob(z, mean, logvar) - m.model.prior.log_prob(z, p_mean, p_logvar)
    return kl, sd.mean(-1)


def prior_mode_z(m: ModelUnderTest, x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    mean, _ = m.prior(x, start, length)
    return m.to_z(mean)


def error_kinds(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Counts of each kind of error (see the module doc)."""
    p_pitch, t_pitch = pred < tk.N_PITCHES, truth < tk.N_PITCHES
    wrong = pred != truth
    both = wrong & p_pitch & t_pitch
    return {
        "missed_onset": float((wrong & t_pitch & ~p_pitch).sum()),
        "extra_onset": float((wrong & ~t_pitch & p_pitch).sum()),
        "wrong_pitch": float(both.sum()),
        "octave": float((both & ((pred - truth).abs() == 12)).sum()),
        "hold_rest": float((wrong & ~t_pitch & ~p_pitch).sum()),
    }


def shifted_errors(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Errors whose decoded token is the truth one step before or after."""
    wrong = pred != truth
    early = torch.zeros_like(wrong)
    late = torch.zeros_like(wrong)
    early[:, :-1] = pred[:, :-1] == truth[:, 1:]
    late[:, 1:] = pred[:, 1:] == truth[:, :-1]
    return float((wrong & (early | late)).sum())


def first_errors(pred: torch.Tensor, truth: torch.Tensor) -> list[tuple[int, int, int]]:
    """Per row: (first error position or length, right tokens after it, tokens after it)."""
    out = []
    for p, t in zip(pred.tolist(), truth.tolist(), strict=True):
        first = next((i for i, (a, b) in enumerate(zip(p, t, strict=True)) if a != b), len(t))
        rest = list(zip(p[first + 1:], t[first + 1:], strict=True))
        out.append((first, sum(a == b for a, b in rest), len(rest)))
    return out


@torch.no_grad()
def analyse_case(m: ModelUnderTest, batches, seed: int = 0) -> dict:
    sums: dict[str, float] = defaultdict(float)
    gen = torch.Generator().manual_seed(seed)
    for x, start, length in batches:
        truth = x[:, start:start + length]
        z = m.posterior_mean(x, start, length)
        z_prior = prior_mode_z(m, x, start, length)
        tf = teacher_forced(m, x, z, start, length)
        fr = m.decode(x, z, start, length)
        tf_p = teacher_forced(m, x, z_prior, start, length)
        fr_p = m.decode(x, z_prior, start, length)
        sums["tokens"] += truth.numel()
        sums["targets"] += truth.size(0)
        bars = length // tk.STEPS_PER_BAR
        sums[f"len{bars}_tokens"] += truth.numel()
        sums[f"len{bars}_tf"] += float((tf == truth).sum())
        sums[f"len{bars}_fr"] += float((fr == truth).sum())
        kl, sd = kl_and_sd(m, x, start, length, gen)
        sums[f"len{bars}_targets"] += truth.size(0)
        sums[f"len{bars}_kl"] += float(kl.sum())
        sums[f"len{bars}_sd"] += float(sd.sum())
        for key, pred in (("tf_acc", tf), ("fr_acc", fr), ("tf_acc_prior", tf_p),
                          ("fr_acc_prior", fr_p)):
            sums[key] += float((pred == truth).sum())
        for b in range(length // tk.STEPS_PER_BAR):
            span = slice(b * tk.STEPS_PER_BAR, (b + 1) * tk.STEPS_PER_BAR)
            sums[f"bar{b + 1}_tokens"] += truth[:, span].numel()
            sums[f"bar{b + 1}_tf"] += float((tf[:, span] == truth[:, span]).sum())
            sums[f"bar{b + 1}_fr"] += float((fr[:, span] == truth[:, span]).sum())
        for first, right, after in first_errors(fr, truth):
            sums["exact"] += float(first == length)
            sums["first_error"] += first / length
            sums["after_right"] += right
            sums["after_tokens"] += after
        for key, count in error_kinds(fr, truth).items():
            sums[key] += count
        sums["errors"] += float((fr != truth).sum())
        sums["shifted"] += shifted_errors(fr, truth)
    n, tokens = sums["targets"], sums["tokens"]
    out = {"targets": int(n)}
    for key in ("tf_acc", "fr_acc", "tf_acc_prior", "fr_acc_prior"):
        out[key] = sums[key] / tokens
    out["by_bar"] = {str(b): {"tf": sums[f"bar{b}_tf"] / sums[f"bar{b}_tokens"],
                              "fr": sums[f"bar{b}_fr"] / sums[f"bar{b}_tokens"]}
                     for b in range(1, BARS + 1) if sums[f"bar{b}_tokens"]}
    out["by_length"] = {str(b): {"tf": sums[f"len{b}_tf"] / sums[f"len{b}_tokens"],
                                 "fr": sums[f"len{b}_fr"] / sums[f"len{b}_tokens"],
                                 "kl": sums[f"len{b}_kl"] / sums[f"len{b}_targets"],
                                 "posterior_sd": sums[f"len{b}_sd"] / sums[f"len{b}_targets"]}
                        for b in range(1, BARS + 1) if sums[f"len{b}_tokens"]}
    out["exact"] = sums["exact"] / n
    out["first_error"] = sums["first_error"] / n
    out["after_first_error"] = sums["after_right"] / max(sums["after_tokens"], 1.0)
    out["errors"] = {k: sums[k] / tokens for k in
                     ("missed_onset", "extra_onset", "wrong_pitch", "octave", "hold_rest")}
    out["shifted"] = sums["shifted"] / max(sums["errors"], 1.0)
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    sets = load_eval_sets(args.data, args.split)
    result: dict = {"settings": {"data": str(args.data), "split": args.split, "n_per_set": args.n,
                                 "batch": args.batch, "seed": args.seed}, "models": {}}
    for path in args.checkpoint:
        m = load_for_eval(path)
        if m.kind != "clsm":
            raise SystemExit(f"{path} is a {m.kind} checkpoint: decode_errors reads a CLSM's parts")
        result["models"][path] = {
            ds: {case: analyse_case(m, case_batches(w, args.n, args.batch, args.seed, case),
                                args.seed)
                 for case in CASES} for ds, w in sets.items()}
    return result


def format_table(result: dict) -> str:
    lines = []
    for path, per_set in result["models"].items():
        lines.append(f"## {path}")
        lines.append("set/case | tf | fr | tf prior | fr prior | fr by bar 1-4 | tf by bar 1-4 | "
                     "fr by length 1-4 | KL by length 1-4 | "
                     "exact | first err | after | missed on | extra on | pitch (oct) | "
                     "hold/rest | shifted")
        for ds, cases in per_set.items():
            for case, r in cases.items():
                bars = r["by_bar"]
                fr_bars = " ".join(f"{bars[b]['fr']:.2f}" for b in sorted(bars))
                tf_bars = " ".join(f"{bars[b]['tf']:.2f}" for b in sorted(bars))
                lengths = r["by_length"]
                fr_len = " ".join(f"{lengths[b]['fr']:.2f}" for b in sorted(lengths))
                kl_len = " ".join(f"{lengths[b]['kl']:.0f}" for b in sorted(lengths))
                e = r["errors"]
                lines.append(
                    f"{ds}/{case} | {r['tf_acc']:.3f} | {r['fr_acc']:.3f} | "
                    f"{r['tf_acc_prior']:.3f} | {r['fr_acc_prior']:.3f} | {fr_bars} | {tf_bars} | "
                    f"{fr_len} | {kl_len} | "
                    f"{r['exact']:.2f} | {r['first_error']:.2f} | {r['after_first_error']:.2f} | "
                    f"{e['missed_onset']:.3f} | {e['extra_onset']:.3f} | "
                    f"{e['wrong_pitch']:.3f} ({e['octave']:.3f}) | {e['hold_rest']:.3f} | "
                    f"{r['shifted']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a model folder or training checkpoint (repeatable)")
    p.add_argument("--data", required=True, help="a prepared cache or a MIDI folder")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=128, help="windows per data set and case")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if args.json else format_table(result))


if __name__ == "__main__":
    main()
