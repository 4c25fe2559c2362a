"""Render infills and interpolations of a CLSM as MIDI files and piano-roll PNGs.

    python -m training.render --model models/clsm-default|runs/clsm/ckpt.pt --data FILE-or-DIR
        --out DIR [--split test] [--n 3] [--bars 4-5] [--J 4] [--seed 0] [--bpm 120]

For each of n windows, with the target bars replaced: two infills (two draws of p(z | xC, tau),
argmax decoded) and the interpolation between them at alpha = j/J. Writes per window
  w{i}_original.mid, w{i}_infill_a.mid, w{i}_infill_b.mid   (8 bars each)
  w{i}_interpolation.mid   (the J+1 interpolated 8-bar sequences one after the other)
  w{i}.png                 (piano rolls, context shaded as in the paper's Fig. 1)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pretty_midi
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # the object API needs no display backend

from engine import tokens as tk
from engine.decoding import CachedDecoder
from engine.model import CLSM
from training.baselines import load_model
from training.evaluate import load_eval_windows

log = logging.getLogger("training.render")

CHECKPOINT_NAMES = ("ckpt.pt", "eager.pt", "model.pt", "weights.pt")


def find_checkpoint(model: str | Path) -> Path:
    """A checkpoint file, or a model folder (models/clsm-default) holding one of CHECKPOINT_NAMES
    or a single *.pt."""
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return pts[0]
    raise SystemExit(f"no checkpoint at {model}: give a .pt file or a folder with one of "
                     f"{', '.join(CHECKPOINT_NAMES)}")


def tokens_to_midi(sequences: list[list[int]], bpm: float) -> pretty_midi.PrettyMIDI:
    """8-bar token sequences played one after the other, one 16th per step."""
    step_s = 60.0 / bpm / 4
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    inst = pretty_midi.Instrument(program=0, name="melody")
    for k, seq in enumerate(sequences):
        offset = k * len(seq) * step_s
        for n in tk.tokens_to_notes(seq):
            inst.notes.append(pretty_midi.Note(n.velocity, n.pitch, offset + n.start * step_s,
                                               offset + n.end * step_s))
    pm.instruments.append(inst)
    return pm


def draw_roll(ax: Axes, seq: list[int], start: int, length: int, title: str) -> None:
    """Notes as bars on a step x pitch grid; the context (outside the target) shaded grey."""
    for a, b in ((0, start), (start + length, tk.SEQ_LEN)):
        if b > a:
            ax.axvspan(a, b, color="0.85", zorder=0)
    for n in tk.tokens_to_notes(seq):
        inside = start <= n.start < start + length
        ax.barh(n.pitch, n.end - n.start, left=n.start, height=0.8,
                color="tab:red" if inside else "0.3", zorder=2)
    for bar in range(0, tk.SEQ_LEN + 1, tk.STEPS_PER_BAR):
        ax.axvline(bar, color="0.6", lw=0.5, zorder=1)
    ax.set_xlim(0, tk.SEQ_LEN)
    ax.set_ylim(tk.PITCH_MIN - 1, tk.PITCH_MAX + 1)
    ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    ax.set_yticks([])
    ax.set_xticks([])


def render_window(model: CLSM, window: np.ndarray, start: int, length: int, J: int,
                  gen: torch.Generator) -> dict[str, list[list[int]]]:
    """Original, two infills and the J+1 interpolation points as full 8-bar token lists."""
    x = torch.from_numpy(window.astype(np.int64))[None]
    starts = torch.tensor([start])
    mean, logvar = model.prior(x, starts, length)
    sd = (0.5 * logvar).exp()
    w1 = mean + sd * torch.randn(mean.shape, generator=gen)
    w2 = mean + sd * torch.randn(mean.shape, generator=gen)
    alphas = torch.arange(J + 1, dtype=w1.dtype)[:, None] / J
    z = model.prior.flow.inverse((1 - alphas) * w1 + alphas * w2)  # (J+1, dz)
    xs = x.repeat(J + 1, 1)
    targets, _ = CachedDecoder(model.decoder).eval()(xs, z, start, length)
    xs[:, start:start + length] = targets
    points = xs.tolist()
    return {"original": x.tolist(), "infill_a": [points[0]], "infill_b": [points[-1]],
            "interpolation": points}


def save_png(path: Path, seqs: dict[str, list[list[int]]], start: int, length: int) -> None:
    rows = [("original", seqs["original"][0])]
    J = len(seqs["interpolation"]) - 1
    rows += [(f"alpha={j}/{J}", s) for j, s in enumerate(seqs["interpolation"])]
    fig = Figure(figsize=(10, 1.0 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), 1, sharex=True)
    for ax, (title, seq) in zip(np.atleast_1d(axes), rows, strict=True):
        draw_roll(ax, seq, start, length, title)
    fig.suptitle(f"CLSM infill of bars {start // 16 + 1}-{(start + length) // 16} "
                 "(context shaded) and interpolation between two infills", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@torch.no_grad()
def render(args: argparse.Namespace) -> list[Path]:
    torch.set_num_threads(args.threads)
    model, kind = load_model(find_checkpoint(args.model))
    if kind != "clsm":
        raise SystemExit(f"{args.model} is a {kind} checkpoint; render draws CLSM infills")
    first, last = (int(b) for b in args.bars.split("-")) if "-" in args.bars else (int(args.bars),) * 2
    start, end = tk.target_steps(first, last)
    windows = load_eval_windows(args.data, args.split)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, idx in enumerate(rng.permutation(len(windows))[:args.n]):
        seqs = render_window(model, windows[idx], start, end - start, args.J, gen)
        for name, s in seqs.items():
            path = out / f"w{i}_{name}.mid"
            tokens_to_midi(s, args.bpm).write(str(path))
            written.append(path)
        save_png(out / f"w{i}.png", seqs, start, end - start)
        written.append(out / f"w{i}.png")
        log.info("window %d: infill A %s", idx, tk.format_tokens(seqs["infill_a"][0][start:end]))
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/clsm-default", help="model folder or checkpoint file")
    p.add_argument("--data", required=True, help="prepared .npz or a folder of MIDI files")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=3, help="windows rendered")
    p.add_argument("--bars", default="4-5", help="target bars, 1-based, e.g. 4-5 or 3")
    p.add_argument("--J", type=int, default=4, help="interpolation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bpm", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for path in render(args):
        print(path)


if __name__ == "__main__":
    main()
