"""Evaluation (Akama, ISMIR 2021, Sec. 4) of CLSMs against the paper's VAE, plus what a player hears.

    python -m training.evaluate --checkpoint models/clsm-default [--checkpoint runs/X/ckpt.pt ..]
        [--baseline models/baselines/vae-g0.4.pt ..] [--lm models/baselines/lm.pt]
        --data cache/windows.npz|MIDI_DIR [--split test] [--n 128] [--batch 8] [--seed 0]
        [--decoding argmax|temperature=T|top_p=P[,temperature=T]] [--plot DIR]
        [--json | --markdown] [--out FILE.json] [--device auto|cpu|cuda]
    python -m training.evaluate --from FILE.json --markdown   # re-print a saved result

Every figure is reported per data set (pop909, nottingham: the songs' folder in the cache) and
per context case: "left" (the target is the window's last 1-4 bars: left context only) and
"other" (a target of 1-4 bars elsewhere: a right context, and a left one unless it starts the
window). The same seeded windows and targets (one length and start per batch) for every model.

The paper's figures (argmax decoding):
- recon_acc: argmax decode of the encoder's mean z (VAE: of the whole window; eq. 11 decodes
  xT given xCL only) against the real target;
- R2 / R4 / R8 (eq. 12, training/metrics.py): two draws of the prior (CLSM: p(w | xC, tau),
  interpolated in w and mapped by f^-1; VAE: N(0, I), linear in z) decoded at alpha = k/8;
- lm_nll: mean per-token NLL (nats) under the LM of the generated targets at all nine
  interpolation points alpha = k/8, in their windows (the reference: the real targets).
What a player hears (the --decoding rule, i.e. the daemon's):
- onset_rate, hold_share, rest_share of K = 8 re-rolls (prior draws) of each target;
- pc_fit: share of their onsets whose pitch class sounds in the context; pc_overlap: the
  duration-weighted pitch-class histogram overlap with the context (1 = same distribution);
- rerolls_distinct (of 8) and rerolls_distance (mean share of differing tokens over pairs);
  rerolls_ge15: share of re-roll pairs that differ in >= 15% of tokens (two independent prior
  draws: about the ceiling for vary_ge15_1.0, whose move in w, d sd, is 1/sqrt(2) of theirs);
- interp_distinct: distinct sequences among the nine interpolation points; interp_distinct_argmax:
  the same, argmax. Sampling shares one noise draw per window among re-rolls, interpolation
  and variations, as the engine does (its noise depends on the context only): only z moves;
- vary_change_0.5 / _1.0: share of tokens a variation z(d) = f^-1(f(z) + d eps) changes from its
  parent (same noise); vary_ge15_1.0: share of cases where delta 1.0 changes >= 15%
  (vary_ge15_1.0_barsN: the same over the targets of N bars);
- latent use: prior_sample_acc, the accuracy of decoding one prior draw (argmax) instead of the
  posterior mean: near recon_acc means the decoder barely uses z.
A MIDI folder as --data is one data set named after the folder (--split ignored). Saved results
are merged and printed by training/eval_report.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine import tokens as tk
from engine.device import DeviceError, add_device_argument, randn, resolve_device
from training import metrics
from training.baselines import TransformerLM, load_model
from training.data import windows_from_midi_folder
from training.eval_models import Decoding, ModelUnderTest, load_for_eval
from training.eval_report import CASES, format_markdown, format_table, load_saved, merge_results, unique_name

log = logging.getLogger("training.evaluate")

K_INTERP = 8  # decode alpha = k/8; R(2), R(4), R(8) use sub-grids of it
J_VALUES = (2, 4, 8)
K_REROLLS = 8
DELTAS = (0.5, 1.0)
TARGET_BARS = (1, 2, 3, 4)


# ----------------------------------------------------------------------------- data


def load_eval_sets(data: str | Path, split: str) -> dict[str, np.ndarray]:
    """{data set: untransposed windows (N, 128)} of a prepared cache's split, or of every MIDI
    file under a folder (one set named after it)."""
    if Path(data).is_dir():
        ws = windows_from_midi_folder(data, progress=False)
        if len(ws.windows) == 0:
            raise SystemExit(f"no 8-bar 4/4 melody windows in the MIDI files under {data}")
        return {Path(data).name: ws.windows}
    with np.load(data, allow_pickle=False) as cache:
        cache = {k: cache[k] for k in cache.files}
    names = [str(s) for s in cache["split_names"]]
    if split not in names:
        raise SystemExit(f"--split must be one of {names}, not {split!r}")
    in_split = cache["split"] == names.index(split)
    if "songs" in cache:  # training.prepare names songs "<data set>/<song>"
        dataset = np.array([str(s).split("/")[0] for s in cache["songs"]])[cache["song"]]
    else:
        dataset = np.full(len(in_split), Path(data).stem)
    sets = {name: cache["windows"][in_split & (dataset == name)] for name in sorted(set(dataset))}
    sets = {k: v for k, v in sets.items() if len(v)}
    if not sets:
        raise SystemExit(f"{data} has no {split!r} windows")
    return sets


def load_eval_windows(data: str | Path, split: str) -> np.ndarray:
    """All windows of load_eval_sets in one array (training/render.py)."""
    return np.concatenate(list(load_eval_sets(data, split).values()))


def case_batches(windows: np.ndarray, n: int, batch: int, seed: int, case: str):
    """[(x (B, 128), start, length)]: n seeded windows, one target per batch."""
    rng = np.random.default_rng([seed, CASES.index(case)])
    idx = rng.permutation(len(windows))[:n]
    out = []
    for i in range(0, len(idx), batch):
        length = tk.STEPS_PER_BAR * int(rng.choice(TARGET_BARS))
        if case == "left":
            start = tk.SEQ_LEN - length
        else:
            start = tk.STEPS_PER_BAR * int(rng.integers(0, (tk.SEQ_LEN - length) // tk.STEPS_PER_BAR))
        out.append((torch.from_numpy(windows[idx[i:i + batch]].astype(np.int64)), start, length))
    return out


def with_target(x: torch.Tensor, target: torch.Tensor, start: int) -> torch.Tensor:
    """Windows x (B, 128) repeated to target's batch (N = k B, rows grouped by k), target in place."""
    full = x.repeat(target.size(0) // x.size(0), 1)
    full[:, start:start + target.size(1)] = target
    return full


def context_of(x: torch.Tensor, start: int, length: int) -> list[list[int]]:
    return torch.cat([x[:, :start], x[:, start + length:]], dim=1).tolist()


# ----------------------------------------------------------------------------- one model, one case


class Tally:
    """Sums and lists of per-window figures, reduced to means at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.paths: list[list[list[int]]] = []

    def add(self, key: str, value: float | None, count: int = 1) -> None:
        if value is not None:
            self.sums[key] += value
            self.counts[key] += count

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts[key] else None


def add_player_figures(t: Tally, gen_targets: torch.Tensor, x: torch.Tensor, start: int,
                       length: int) -> None:
    """Token shares and pitch-class fit of targets (k B, length) generated for windows x (B, 128)."""
    arr = gen_targets.cpu().numpy()
    for key, value in metrics.token_shares(arr).items():
        t.add(key, value * arr.size, arr.size)
    contexts = context_of(x, start, length)
    for i, target in enumerate(arr.tolist()):
        fit, onsets, overlap = metrics.pitch_class_fit(target, contexts[i % len(contexts)])
        t.add("pc_fit", fit, onsets)
        t.add("pc_overlap", overlap)


@torch.no_grad()
def lm_target_nll(lm: TransformerLM, full: torch.Tensor, start: int, length: int) -> tuple[float, int]:
    nll = lm.token_nll(full)[:, start:start + length]
    return float(nll.sum()), nll.numel()


@torch.no_grad()
def evaluate_batch(m: ModelUnderTest, t: Tally, x: torch.Tensor, start: int, length: int,
                   lm: TransformerLM | None, decoding: Decoding, gen: torch.Generator) -> None:
    """Every figure of one batch, computed on the model's device; the seeded draws come from
    the CPU generator gen (the same figures on every device, up to rounding)."""
    x = x.to(m.device)
    B = x.size(0)
    truth = x[:, start:start + length]
    recon = m.decode(x, m.posterior_mean(x, start, length), start, length)
    t.add("recon_acc", float((recon == truth).sum()), truth.numel())

    mean, sd = m.prior(x, start, length)
    w = mean + sd * randn((K_REROLLS, *mean.shape), gen, m.device)  # (K, B, dz)
    alphas = (torch.arange(K_INTERP + 1, dtype=w.dtype, device=w.device) / K_INTERP)[:, None, None]
    w_path = (1 - alphas) * w[0] + alphas * w[1]  # (9, B, dz)
    z_path = m.to_z(w_path.reshape(-1, m.d_z))
    xs = x.repeat(K_INTERP + 1, 1)
    path = m.decode(xs, z_path, start, length).view(K_INTERP + 1, B, length)
    t.add("prior_sample_acc", float((path[0] == truth).sum()), truth.numel())
    t.paths += path.transpose(0, 1).tolist()
    t.add("interp_distinct_argmax", sum(metrics.distinct(p) for p in path.transpose(0, 1).tolist()), B)
    if lm is not None:
        nll, count = lm_target_nll(lm, with_target(x, path.reshape(-1, length), start), start, length)
        t.add("lm_nll", nll, count)

    # The daemon's decoding (engine/runtime.py): sampling noise belongs to the context, so the
    # re-rolls, the interpolation and the variations of one window share one noise draw.
    noise = decoding.noise((1, B, length), gen, m.device)
    if noise is not None:
        noise = noise.expand(K_REROLLS, -1, -1, -1)
    flat_noise = None if noise is None else noise.reshape(K_REROLLS * B, length, -1)
    z_rolls = m.to_z(w.reshape(-1, m.d_z))
    rolls = m.decode(x.repeat(K_REROLLS, 1), z_rolls, start, length, decoding, flat_noise)
    rolls = rolls.view(K_REROLLS, B, length)
    add_player_figures(t, rolls.reshape(-1, length), x, start, length)
    for i in range(B):
        t.add("rerolls_distinct", metrics.distinct(rolls[:, i].tolist()))
        t.add("rerolls_distance", metrics.mean_pairwise_distance(rolls[:, i].tolist()))
        t.add("rerolls_ge15", metrics.share_of_pairs_apart(rolls[:, i].tolist(), 0.15))
    if decoding.sampling:
        shared = noise[0].repeat(K_INTERP + 1, 1, 1)
        player_path = m.decode(xs, z_path, start, length, decoding, shared).view(K_INTERP + 1, B, length)
    else:
        player_path = path
    t.add("interp_distinct", sum(metrics.distinct(p) for p in player_path.transpose(0, 1).tolist()), B)
    parent = rolls[0]
    for delta in DELTAS:
        w_var = w[0] + delta * sd * randn(tuple(mean.shape), gen, m.device)
        child = m.decode(x, m.to_z(w_var), start, length, decoding,
                         None if noise is None else noise[0])
        for p_row, c_row in zip(parent.tolist(), child.tolist(), strict=True):
            change = metrics.changed_share(p_row, c_row)
            t.add(f"vary_change_{delta}", change)
            if delta == 1.0:
                t.add("vary_ge15_1.0", float(change >= 0.15))
                t.add(f"vary_ge15_1.0_bars{length // tk.STEPS_PER_BAR}", float(change >= 0.15))


def summarize(t: Tally) -> dict:
    out = {key: t.mean(key) for key in sorted(t.sums)}
    for J in J_VALUES:
        r = metrics.interpolation_ratio(t.paths, J)
        out[f"R{J}"], out[f"R{J}_pairs"], out[f"R{J}_excluded"] = r["R"], r["pairs"], r["excluded"]
    out.setdefault("lm_nll", None)
    return out


def evaluate_case(m: ModelUnderTest, batches, lm: TransformerLM | None, decoding: Decoding,
                  seed: int, desc: str) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t = Tally()
    for x, start, length in tqdm(batches, desc=desc, file=sys.stderr, dynamic_ncols=True,
                                 leave=False):
        evaluate_batch(m, t, x, start, length, lm, decoding, gen)
    return {"n": sum(len(b[0]) for b in batches), **summarize(t)}


def reference_case(batches, lm: TransformerLM | None) -> dict:
    """The real targets' figures (what generated ones are compared with)."""
    t = Tally()
    for x, start, length in batches:
        add_player_figures(t, x[:, start:start + length], x, start, length)
        if lm is not None:
            t.add("lm_nll", *lm_target_nll(lm, x.to(lm.head.weight.device), start, length))
    out = {key: t.mean(key) for key in sorted(t.sums)}
    out.setdefault("lm_nll", None)
    return out


# ----------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(getattr(args, "device", None) or "auto")
    except DeviceError as e:
        raise SystemExit(f"--device: {e}") from None
    decoding = Decoding.parse(args.decoding)
    sets = load_eval_sets(args.data, args.split)
    lm = None
    if args.lm:
        lm, kind = load_model(args.lm, device)
        if kind != "lm":
            raise SystemExit(f"--lm {args.lm} is a {kind} checkpoint, not an LM")
    models = [load_for_eval(p, device) for p in args.checkpoint + args.baseline]
    batches = {(ds, case): case_batches(w, args.n, args.batch, args.seed, case)
               for ds, w in sets.items() for case in CASES}
    result: dict = {
        "settings": {"checkpoints": args.checkpoint, "baselines": args.baseline, "lm": args.lm,
                     "data": str(args.data), "split": args.split, "n_per_set": args.n,
                     "batch": args.batch, "seed": args.seed, "decoding": str(decoding),
                     "interp_points": K_INTERP + 1, "rerolls": K_REROLLS, "deltas": list(DELTAS),
                     "torch_threads": args.threads, "device": str(device)},
        "reference": {ds: {case: reference_case(batches[ds, case], lm) for case in CASES}
                      for ds in sets},
        "models": {},
    }
    for m in models:
        entry = {"kind": m.kind, "path": m.path, "results": {}}
        for ds in sets:
            entry["results"][ds] = {case: evaluate_case(m, batches[ds, case], lm, decoding,
                                                        args.seed, f"{m.name} {ds} {case}")
                                    for case in CASES}
        result["models"][unique_name(m.name, result["models"])] = entry
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="from_json", action="append", default=[], metavar="FILE.json",
                   help="print (and plot) a saved result instead of evaluating; repeat to put "
                        "the models of results with the same settings in one table")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="CLSM checkpoint or model folder (repeat for several)")
    p.add_argument("--baseline", action="append", default=[], help="paper-VAE checkpoint (repeatable)")
    p.add_argument("--lm", default=None, help="transformer LM checkpoint (scores samples)")
    p.add_argument("--data", default=None, help="prepared .npz or a folder of MIDI files")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=128, help="windows per data set and case")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    add_device_argument(p, default="cpu")  # the shipped figures: CPU
    p.add_argument("--decoding", default="argmax",
                   help="player figures: argmax | temperature=T | top_p=P[,temperature=T]")
    p.add_argument("--plot", default=None, metavar="DIR", help="write the paper's Fig. 3b as PNGs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    try:
        Decoding.parse(args.decoding)
    except ValueError as e:
        p.error(str(e))
    if not args.from_json and (not args.checkpoint or not args.data):
        p.error("--checkpoint and --data are required (or --from a saved result)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.from_json:
        try:
            result = merge_results([load_saved(f) for f in args.from_json])
        except (OSError, ValueError) as e:
            p.error(str(e))
    else:
        result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from training.plots import plot_fig3b
        for path in plot_fig3b(result, Path(args.plot)):
            log.info("wrote %s", path)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_markdown(result) if args.markdown else format_table(result))


if __name__ == "__main__":
    main()
