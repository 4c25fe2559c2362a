"""The paper's evaluation (Akama, ISMIR 2021, Sec. 4) of a CLSM against the VAE baseline.

    python -m training.evaluate --checkpoint runs/clsm/ckpt.pt [--baseline runs/vae/ckpt.pt]
        [--lm runs/lm/ckpt.pt] --data cache/windows.npz|MIDI_DIR [--split test] [--n 64]
        [--seed 0] [--batch 8] [--threads 1] [--naive] [--json]

On the same n windows (untransposed) and the same seeded targets for every model (|xT| uniform
in 1..4 bars, |xCL| uniform, as in training):
- recon_acc_general: accuracy of the argmax decode of the encoder's mean z at that target;
- recon_acc_left: the same with the target moved to the end (left context only);
- R2, R4, R8 (training/metrics.py): two latents of the same context (CLSM: two draws of
  p(w | xC, tau), interpolated in w and mapped back by f^-1; VAE: two draws of N(0, I),
  interpolated linearly in z) decoded at alpha = k/8, k = 0..8; R(J) uses the points j/J;
- lm_nll_target / lm_nll_window: mean per-token NLL (nats) under the LM of the generated target
  tokens (the alpha = 0 decode, a sample from each model's prior) / of the whole window with
  that target in place (so a target that clashes with the right context also costs);
  "reference" holds the same numbers for the real windows;
- onset_rate: share of generated target tokens that start a note (a pitch token), against the
  real windows' rate in "reference": a collapsed decoder (all holds or rests) shows up here.
A MIDI folder as --data is turned into windows on the fly (every window, --split ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from engine import tokens as tk
from engine.decoding import CachedDecoder
from engine.model import CLSM, gather_span
from training.baselines import LSTMVAE, TransformerLM, load_model
from training.data import load_windows, windows_from_midi_folder
from training.metrics import interpolation_ratio
from training.train import sample_targets

log = logging.getLogger("training.evaluate")

K_INTERP = 8  # decode alpha = k/8; R(2), R(4), R(8) use sub-grids of it
J_VALUES = (2, 4, 8)
TARGET_BARS = [1, 2, 3, 4]


def load_eval_windows(data: str | Path, split: str) -> np.ndarray:
    """Windows (N, 128) of a prepared cache's split, or of every MIDI file under a folder."""
    if Path(data).is_dir():
        ws = windows_from_midi_folder(data, progress=False)
        if len(ws.windows) == 0:
            raise SystemExit(f"no 8-bar 4/4 melody windows in the MIDI files under {data}")
        return ws.windows
    windows = load_windows(data, split)
    if len(windows) == 0:
        raise SystemExit(f"{data} has no {split!r} windows")
    return windows


# ----------------------------------------------------------------------------- model adapters


@torch.no_grad()
def decode(model: nn.Module, x: torch.Tensor, z: torch.Tensor, start: torch.Tensor,
           length: int, cached: CachedDecoder | None = None) -> torch.Tensor:
    """Argmax target tokens (B, length) for per-window starts, for a CLSM or the VAE.
    A CLSM decodes with `cached` (engine/decoding.py, same argmax, ~20x faster) when given,
    else with the reference full-recompute decode."""
    if isinstance(model, LSTMVAE) or cached is not None:
        out = torch.empty((x.size(0), length), dtype=torch.long)
        for s in start.unique().tolist():  # both decoders take one start per call
            rows = (start == s).nonzero()[:, 0]
            if cached is not None:
                out[rows] = cached(x[rows], z[rows], int(s), length)[0]
            else:
                out[rows] = model.decode(x[rows], z[rows], int(s), length)
        return out
    # CLSM: engine/model.py's decode_naive, generalised to one start per window.
    x = x.clone()
    rows = torch.arange(x.size(0))
    for k in range(length):
        logits = model.decoder(x, z, start, length)  # (B, 129, n_out); position t predicts x_t
        x[rows, start + k] = logits[rows, start + k].argmax(-1)
    return gather_span(x[:, :, None], start, length)[..., 0]


@torch.no_grad()
def latent_pair(model: nn.Module, x: torch.Tensor, start: torch.Tensor, length: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two draws in the space that is interpolated linearly (CLSM: w; VAE: z): (B, dz) each."""
    if isinstance(model, CLSM):
        mean, logvar = model.prior(x, start, length)
        sd = (0.5 * logvar).exp()
        return (mean + sd * torch.randn(mean.shape, generator=gen),
                mean + sd * torch.randn(mean.shape, generator=gen))
    d_z = model.cfg.d_z
    return (torch.randn((x.size(0), d_z), generator=gen), torch.randn((x.size(0), d_z), generator=gen))


def to_z(model: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return model.prior.flow.inverse(w) if isinstance(model, CLSM) else w


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def lm_nll(lm: TransformerLM, x: torch.Tensor, start: torch.Tensor, length: int) -> tuple[float, float]:
    """Sums of per-token NLL over the targets and over the whole windows."""
    nll = lm.token_nll(x)  # (B, 128)
    return float(gather_span(nll[:, :, None], start, length).sum()), float(nll.sum())


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, int]],
                   lm: TransformerLM | None, seed: int, name: str, naive: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cached = CachedDecoder(model.decoder).eval() if isinstance(model, CLSM) and not naive else None
    hits = {"general": [0, 0], "left": [0, 0]}
    paths: list[list[list[int]]] = []
    nll_t = nll_w = 0.0
    n_t = n_w = onsets = 0
    for x, start, length in tqdm(batches, desc=name, file=sys.stderr, dynamic_ncols=True):
        B = x.size(0)
        truth = gather_span(x[:, :, None], start, length)[..., 0]
        for case, s in (("general", start), ("left", torch.full_like(start, tk.SEQ_LEN - length))):
            mean, _ = model.encoder(x, s, length)
            pred = decode(model, x, mean, s, length, cached)
            target = gather_span(x[:, :, None], s, length)[..., 0]
            hits[case][0] += int((pred == target).sum())
            hits[case][1] += target.numel()
        w1, w2 = latent_pair(model, x, start, length, gen)
        alphas = torch.arange(K_INTERP + 1, dtype=w1.dtype) / K_INTERP  # (K+1,)
        w = (1 - alphas[None, :, None]) * w1[:, None] + alphas[None, :, None] * w2[:, None]
        z = to_z(model, w.reshape(B * (K_INTERP + 1), -1))
        rep = lambda t: t.repeat_interleave(K_INTERP + 1, dim=0)  # noqa: E731
        points = decode(model, rep(x), z, rep(start), length, cached).view(B, K_INTERP + 1, length)
        paths += points.tolist()
        onsets += int((points[:, 0] < tk.N_PITCHES).sum())
        if lm is not None:
            generated = x.clone()
            idx = start[:, None] + torch.arange(length)[None, :]
            generated.scatter_(1, idx, points[:, 0])
            t, wsum = lm_nll(lm, generated, start, length)
            nll_t, nll_w, n_t, n_w = nll_t + t, nll_w + wsum, n_t + truth.numel(), n_w + x.numel()
    out = {"recon_acc_general": hits["general"][0] / hits["general"][1],
           "recon_acc_left": hits["left"][0] / hits["left"][1],
           "onset_rate": onsets / sum(len(x) * length for x, _, length in batches)}
    for J in J_VALUES:
        r = interpolation_ratio(paths, J)
        out[f"R{J}"], out[f"R{J}_pairs"], out[f"R{J}_excluded"] = r["R"], r["pairs"], r["excluded"]
    out["lm_nll_target"] = nll_t / n_t if lm is not None else None
    out["lm_nll_window"] = nll_w / n_w if lm is not None else None
    return out


def make_batches(windows: np.ndarray, n: int, batch: int, seed: int):
    """n windows drawn without replacement (all if fewer), seeded targets as in training."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(windows))[:n]
    batches = []
    for i in range(0, len(idx), batch):
        x = torch.from_numpy(windows[idx[i:i + batch]].astype(np.int64))
        start, length = sample_targets(rng, len(x), TARGET_BARS)
        batches.append((x, start, length))
    return batches


def reference(lm: TransformerLM | None, batches) -> dict:
    n_target = sum(len(x) * length for x, _, length in batches)
    onsets = sum(int((gather_span(x[:, :, None], s, length) < tk.N_PITCHES).sum())
                 for x, s, length in batches)
    if lm is None:
        return {"lm_nll_target": None, "lm_nll_window": None, "onset_rate": onsets / n_target}
    t = w = 0.0
    n_t = n_w = 0
    for x, start, length in batches:
        bt, bw = lm_nll(lm, x, start, length)
        t, w, n_t, n_w = t + bt, w + bw, n_t + len(x) * length, n_w + x.numel()
    return {"lm_nll_target": t / n_t, "lm_nll_window": w / n_w, "onset_rate": onsets / n_target}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    windows = load_eval_windows(args.data, args.split)
    batches = make_batches(windows, args.n, args.batch, args.seed)
    lm = None
    if args.lm:
        lm, kind = load_model(args.lm)
        if kind != "lm":
            raise SystemExit(f"--lm {args.lm} is a {kind} checkpoint, not an LM")
    result: dict = {
        "settings": {"checkpoint": args.checkpoint, "baseline": args.baseline, "lm": args.lm,
                     "data": str(args.data), "split": args.split, "n": sum(len(b[0]) for b in batches),
                     "seed": args.seed, "interp_points": K_INTERP + 1},
        "reference": reference(lm, batches),
    }
    for name, path in (("clsm", args.checkpoint), ("vae", args.baseline)):
        if not path:
            result[name] = None
            continue
        model, kind = load_model(path)
        if kind == "lm":
            raise SystemExit(f"{path} is an LM checkpoint; it goes to --lm")
        result[name] = {"kind": kind, **evaluate_model(model, batches, lm, args.seed, name,
                                                            args.naive)}
    return result


def format_table(result: dict) -> str:
    keys = ["recon_acc_left", "recon_acc_general", "R2", "R4", "R8", "lm_nll_target", "lm_nll_window",
            "onset_rate"]
    rows = [("reference (real)", result["reference"])]
    rows += [(k, result[k]) for k in ("clsm", "vae") if result.get(k)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["model".ljust(18) + "".join(k.rjust(19) for k in keys)]
    lines += [name.ljust(18) + "".join(fmt(r.get(k)).rjust(19) for k in keys) for name, r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="CLSM checkpoint")
    p.add_argument("--baseline", default=None, help="VAE baseline checkpoint")
    p.add_argument("--lm", default=None, help="transformer LM checkpoint (scores samples)")
    p.add_argument("--data", required=True, help="prepared .npz or a folder of MIDI files")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=64, help="windows evaluated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--naive", action="store_true",
                   help="CLSM: the reference full-recompute decode instead of the cached one")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
