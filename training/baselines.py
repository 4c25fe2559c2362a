"""Baselines for the paper's evaluation (Akama, ISMIR 2021, Sec. 4): the paper's VAE (eqs. 9-11)
and the 2-layer transformer LM that scores generated melodies.

    python -m training.baselines --kind vae|lm --data cache/windows.npz --out runs/NAME
        [--config configs/cpu.toml] [--gamma 0.4] [--anneal-steps N] [--minutes M]
        [--max-steps N] [--threads 1] [--device auto|cpu|cuda]

VAE baseline, the paper's eqs. 9-11 (sizes from the config's [model], i.e. equal to the CLSM's):
  encoder  q(z | x)           embed the whole window x -> 2-layer Bi-LSTM -> [h_l; h_r]
                              -> two SELU MLPs -> mean, log-variance (as the CLSM's encoder head)
  prior    p(z) = N(0, I)
  decoder  p(x | z)           (h0, c0) = tanh(Linear(z)) for each LSTM layer; an autoregressive
                              LSTM over [s, x_0 .. x_126] (teacher forced) and Softmax(Linear(h_t))
                              predicts x_t: the whole window is reconstructed.
  loss     sum_t -log p(x_t | x_<t, z) + gamma * KL(q || N(0, I)) (analytic), the sum as in
           eq. 10, divided by 128 so that logs read per token; gamma annealed linearly from 0
           over --anneal-steps. The paper's grid is gamma in {0.1, ..., 1.0, 2.0}; 0.4 is its
           comparison point (and the default).
  infill / interpolation (eq. 11): xT is decoded given xCL only (the left context is fed,
           then the target generated); the right context cannot be used. Interpolation is
           linear in z between two draws of N(0, I).
LM: causal 2-layer transformer (the CLSM's sizes: d 128, ff 256, 8 heads, learned positions) over
[s, x_0..x_126] predicting x_0..x_127 (32 musical symbols), trained on lm_train, valid on lm_valid.

Checkpoints use training/train.py's dict {model, optimizer, model_args, step, config, metrics};
the model kind ("vae" | "lm") is in model_args["kind"] and config["kind"] (train.py's
save_checkpoint has no extra key; see `checkpoint_kind`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import tokens as tk
from engine.decoding import nucleus
from engine.model import CLSM, count_parameters, mlp
from training.accel import Precision
from training.train import (
    load_checkpoint,
    load_train_config,
    resume_path,
    run_arguments,
    run_device,
    save_checkpoint,
    training_loop,
    validate,
)
from training.windows import load_windows

log = logging.getLogger("training.baselines")

CLSM_ONLY_KEYS = ("own_guesses", "word_dropout")  # [train] keys of the CLSM's decoder input
PAPER_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0)


# ----------------------------------------------------------------------------- VAE


@dataclass
class VAEConfig:
    n_in: int = tk.N_SYMBOLS + 1  # 32 musical symbols + the start symbol `s`
    n_out: int = tk.N_SYMBOLS  # predicts musical symbols only
    d_embed: int = 128  # token embedding size (the CLSM's d_model)
    d_lstm: int = 256  # Bi-LSTM per direction, and the decoder LSTM
    n_lstm_layers: int = 2
    d_mlp: int = 512  # mean / log-variance MLPs
    d_z: int = 128
    dropout: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def like_clsm(cls, model: dict) -> VAEConfig:
        """The CLSM config's sizes ([model] of a TOML config)."""
        return cls(d_embed=model["d_model"], d_lstm=model["d_lstm"],
                   n_lstm_layers=model["n_lstm_layers"], d_mlp=model["d_mlp"], d_z=model["d_z"],
                   dropout=model["dropout"])


class PaperVAE(nn.Module):
    """The paper's VAE baseline (eqs. 9-11): whole-window encoder and reconstruction."""

    kind = "vae"

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_in, cfg.d_embed)
        drop = cfg.dropout if cfg.n_lstm_layers > 1 else 0.0
        self.enc = nn.LSTM(cfg.d_embed, cfg.d_lstm, cfg.n_lstm_layers, batch_first=True,
                           bidirectional=True, dropout=drop)
        self.mean = mlp(2 * cfg.d_lstm, cfg.d_mlp, cfg.d_z)
        self.logvar = mlp(2 * cfg.d_lstm, cfg.d_mlp, cfg.d_z)
        self.init_state = nn.Linear(cfg.d_z, 2 * cfg.n_lstm_layers * cfg.d_lstm)  # z -> (h0, c0)
        self.dec = nn.LSTM(cfg.d_embed, cfg.d_lstm, cfg.n_lstm_layers, batch_first=True,
                           dropout=drop)
        self.head = nn.Linear(cfg.d_lstm, cfg.n_out)

    def encoder(self, x: torch.Tensor, start: torch.Tensor | None = None, length: int = 0):
        """q(z | x) over the whole window (start / length accepted for a common call and
        ignored: eq. 9 has no target position). Returns mean, logvar (B, dz)."""
        _, (h_n, _) = self.enc(self.embed(x))
        h_lr = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2*d_lstm): last layer, both ways
        return self.mean(h_lr), self.logvar(h_lr)

    def state(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, d = self.cfg.n_lstm_layers, self.cfg.d_lstm
        hc = torch.tanh(self.init_state(z)).view(z.size(0), 2, L, d).permute(1, 2, 0, 3)
        return hc[0].contiguous(), hc[1].contiguous()  # 2 x (L, B, d)

    def logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Teacher-forced over y = [s, x_0..x_126]: (B, 128, n_out), position t predicts x_t."""
        y = torch.cat([torch.full_like(x[:, :1], tk.START), x[:, :-1]], dim=1)
        h, _ = self.dec(self.embed(y), self.state(z))
        return self.head(h)

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None, length: int = 0,
                beta: float = 1.0, free_bits: float = 0.0):
        """beta is gamma here. Returns (total, parts) with total = (Lrec + gamma KL) / 128."""
        mean, logvar = self.encoder(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        kl = (0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar)).sum(-1).mean()
        logits = self.logits(x, z)  # (B, 128, n_out)
        rec = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x.reshape(-1))
        total = rec + beta * torch.clamp(kl, min=free_bits) / x.size(1)
        acc = (logits.argmax(-1) == x).float().mean()
        return total, {"rec": rec.detach(), "kl": kl.detach(), "acc": acc}  # no read-back

    @torch.no_grad()
    def decode(self, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
               temperature: float = 0.0, gumbel: torch.Tensor | None = None,
               top_p: float = 1.0) -> torch.Tensor:
        """xT given z and the left context x[:, :start] (eq. 11): (B, length). Argmax, or with
        temperature > 0 and gumbel (B, length, n_out) a sample of softmax(logits / T) within
        the top_p nucleus (the CLSM engine's decoding rules)."""
        y = torch.cat([torch.full_like(x[:, :1], tk.START), x[:, :start]], dim=1)
        h, state = self.dec(self.embed(y), self.state(z))
        out = []
        for k in range(length):
            logits = self.head(h[:, -1])
            if gumbel is not None and temperature > 0.0:
                logits = logits / temperature
                if top_p < 1.0:
                    logits = nucleus(logits, top_p)
                logits = logits + gumbel[:, k]
            token = logits.argmax(-1)
            out.append(token)
            h, state = self.dec(self.embed(token)[:, None], state)
        return torch.stack(out, dim=1)

    def model_args(self) -> dict:
        return {**asdict(self.cfg), "kind": self.kind}


# ----------------------------------------------------------------------------- LM


@dataclass
class LMConfig:
    n_in: int = tk.N_SYMBOLS + 1  # 32 musical symbols + `s`
    n_out: int = tk.N_SYMBOLS
    seq_len: int = tk.SEQ_LEN
    d_model: int = 128
    d_ff: int = 256
    n_heads: int = 8
    n_layers: int = 2
    dropout: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class TransformerLM(nn.Module):
    kind = "lm"

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_in, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) -> (B, L, n_out); position t predicts x_t from x_0..x_{t-1}."""
        L = x.size(1)
        y = torch.cat([torch.full_like(x[:, :1], tk.START), x[:, :-1]], dim=1)
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=x.device)
        h = self.layers(self.embed(y) + self.pos.weight[:L], mask=mask, is_causal=True)
        return self.head(self.ln(h))

    def token_nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of every token, nats: (B, L)."""
        logits = self.logits(x)
        return F.cross_entropy(logits.transpose(1, 2), x, reduction="none")

    def forward(self, x: torch.Tensor, start: torch.Tensor | None = None, length: int = 0,
                beta: float = 0.0, free_bits: float = 0.0):
        logits = self.logits(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x.reshape(-1))
        acc = (logits.argmax(-1) == x).float().mean()
        return loss, {"rec": loss.detach(), "acc": acc}  # 0-d tensors: no read-back

    def model_args(self) -> dict:
        return {**asdict(self.cfg), "kind": self.kind}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_kind(ckpt: dict) -> str:
    """"clsm" (training/train.py's checkpoints), "vae" or "lm"."""
    return ckpt.get("kind") or ckpt.get("model_args", {}).get("kind") or "clsm"


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """Any checkpoint of this project (CLSM, VAE, LM), saved on any device -> (model in eval
    mode on `device`, kind)."""
    ckpt = load_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind == "vae":
        model: nn.Module = PaperVAE(VAEConfig.from_dict(ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    elif kind == "lm":
        model = TransformerLM(LMConfig.from_dict(ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = CLSM.from_checkpoint(ckpt)
    return model.to(device).eval(), kind


# ----------------------------------------------------------------------------- training


def new_model(kind: str, model_cfg: dict) -> nn.Module:
    """A fresh baseline: the VAE with the CLSM config's sizes, the LM with the paper's."""
    return PaperVAE(VAEConfig.like_clsm(model_cfg)) if kind == "vae" else TransformerLM(LMConfig())


def train(args: argparse.Namespace) -> Path:
    config = {"kind": args.kind, **load_train_config(args.config)}
    tcfg = config["train"]
    if args.kind == "vae":  # gamma takes the place of the CLSM's beta in the shared loop
        tcfg["beta_kl"] = args.gamma
        tcfg["beta_anneal_steps"] = args.anneal_steps
        tcfg["free_bits"] = 0.0
    tcfg["valid_free_batches"] = 0  # the free-running check decodes a CLSM
    for key in CLSM_ONLY_KEYS:  # a branch's config may carry them: these models have no such input
        if tcfg.get(key, 0.0):
            log.warning("[train] %s = %s is the CLSM's: the %s trains without it", key, tcfg[key],
                        args.kind)
        tcfg[key] = 0.0
    device = run_device(args, tcfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    torch.set_num_threads(args.threads)
    torch.manual_seed(tcfg["seed"])
    rng = np.random.default_rng(tcfg["seed"])
    splits = ("train", "valid") if args.kind == "vae" else ("lm_train", "lm_valid")
    train_w, valid_w = (load_windows(args.data, s) for s in splits)
    if len(train_w) == 0:
        raise SystemExit(f"{args.data} has no {splits[0]} windows; run training.prepare first")
    if len(valid_w) == 0:
        valid_w = train_w[:256]
    model = new_model(args.kind, config["model"])
    step = 0
    resume = resume_path(args, out)
    if resume:  # the snapshot's own sizes and step (the config's sizes may differ)
        ckpt = load_checkpoint(resume)
        model, _ = load_model(resume)
        model.train()
        step = ckpt["step"]
        rng = np.random.default_rng([tcfg["seed"], step])
    model = model.to(device)  # before the optimiser: its loaded state follows the parameters
    opt = torch.optim.Adam(model.parameters(), lr=tcfg["lr"], betas=tuple(tcfg["betas"]))
    if resume:
        opt.load_state_dict(ckpt["optimizer"])
        log.info("resumed from %s at step %d", resume, step)
    # float32 on the CPU as before; mixed precision on CUDA as the CLSM's ([train] bf16)
    precision = Precision.choose(device, tcfg["bf16"] and device.type == "cuda")
    log.info("%s with %d parameters; %d %s / %d %s windows; %s, mixed precision %s", args.kind,
             count_parameters(model), len(train_w), splits[0], len(valid_w), splits[1], device,
             precision)

    step, metrics = training_loop(model, opt, train_w, valid_w, rng, tcfg=tcfg, config=config,
                                  out=out, step=step, max_steps=args.max_steps, minutes=args.minutes,
                                  precision=precision, quiet=args.quiet)
    metrics["valid"] = validate(model, valid_w, tcfg["seed"], 4, tcfg["batch_size"],
                                tcfg["target_bars"], precision)
    save_checkpoint(ckpt_path, model, opt, step, config, metrics)  # type: ignore[arg-type]
    print(f"{args.kind} step {step}: {metrics['windows']} windows in {metrics['seconds']:.1f} s "
          f"= {metrics['windows_per_s']:.1f} windows/s; valid {metrics['valid']}; checkpoint {ckpt_path}")
    return ckpt_path


def main(argv: list[str] | None = None) -> None:
    p = run_arguments(__doc__.splitlines()[0], default_threads=1)
    p.add_argument("--kind", choices=("vae", "lm"), required=True)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from out/ckpt.pt, or from CKPT (a committed snapshot)")
    p.add_argument("--gamma", type=float, default=0.4,
                   help=f"VAE KL weight (paper's grid {PAPER_GAMMAS}; 0.4 its comparison point)")
    p.add_argument("--anneal-steps", type=int, default=2000, help="VAE: gamma rises from 0 over")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
