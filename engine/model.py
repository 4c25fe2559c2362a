"""The Contextual Latent Space Model (Akama, ISMIR 2021), SPEC section 2.

One sequence x of 128 tokens; the target xT = x[a:b] sits between a left context xCL = x[:a]
and a right context xCR = x[b:]; tau = (a, b) is the positional information.

  encoder   q(z | x, tau)         transformer (relative attention) -> Bi-LSTM over xT -> MLPs
  prior     p(z | xC, tau)        same trunk on x with xT replaced by `p` -> Gaussian p(w | xC, tau),
                                  and a RealNVP flow f: z -> w (no context input)
  decoder   p(xT | z, xC, tau)    `s` + x -> transformer decoder (relative self-attention with the
                                  three-segment mask, cross-attention to Z~ = lz vectors from z)

Decoder indexing: the decoder input is y = [s, x_0, ..., x_127] (129 positions); the output at y
position t predicts x_t. So x_a (the first target token) is predicted from y position a, which holds
the last left-context token (or `s`), and the target tokens themselves sit at y positions a+1..b.
Context positions (everything but a+1..b) never attend to the target, so their keys and values do
not depend on it: the engine computes them once and decodes the target with a cache.

The transformer layers (relative self-attention, cross-attention to Z~) are in engine/layers.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import tokens as tk
from engine.layers import DecoderLayer, EncoderLayer


@dataclass
class CLSMConfig:
    vocab_size: int = tk.VOCAB_SIZE  # 32 musical symbols + s, p, pad
    n_out: int = tk.N_SYMBOLS  # the decoder predicts musical symbols only
    seq_len: int = tk.SEQ_LEN  # 8 bars x 16 steps
    d_model: int = 128  # token embedding size
    d_ff: int = 256  # transformer hidden (feed-forward) size
    n_heads: int = 8
    n_layers: int = 2  # in the encoder, the prior trunk and the decoder
    dropout: float = 0.1
    max_rel: int = 128  # relative distances are clipped to +-max_rel
    d_lstm: int = 256  # Bi-LSTM hidden size per direction
    n_lstm_layers: int = 2
    d_mlp: int = 512  # mean / log-variance MLPs
    d_z: int = 128  # latent size
    l_z: int = 4  # number of latent vectors Z~ the decoder attends to
    n_flow: int = 4  # RealNVP affine-coupling layers
    d_flow: int = 256  # hidden size of the flow's scale and bias nets
    flow_slope: float = 0.01  # LeakyReLU negative slope in the flow nets

    @classmethod
    def from_dict(cls, d: dict) -> CLSMConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ----------------------------------------------------------------------------- encoder / prior


def gather_span(h: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """h (B, L, D), start (B,) -> h[b, start_b : start_b + length] as (B, length, D)."""
    idx = start[:, None] + torch.arange(length, device=h.device)[None, :]  # (B, T)
    return h.gather(1, idx[:, :, None].expand(-1, -1, h.size(-1)))


class Trunk(nn.Module):
    """Embedding + positions -> transformer encoder (relative attention, no mask) ->
    target positions -> Bi-LSTM -> [h_l; h_r] -> SELU MLPs -> (mean, log-variance)."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_lstm, cfg.n_lstm_layers, batch_first=True,
                            bidirectional=True, dropout=cfg.dropout)
        self.mean = mlp(2 * cfg.d_lstm, cfg.d_mlp, cfg.d_z)
        self.logvar = mlp(2 * cfg.d_lstm, cfg.d_mlp, cfg.d_z)

    def forward(self, x: torch.Tensor, start: torch.Tensor, length: int):
        B, L = x.shape
        pos = torch.arange(L, device=x.device)
        h = self.drop(self.embed(x) + self.pos(pos))  # (B, 128, d)
        for layer in self.layers:
            h = layer(h, pos)
        h = gather_span(self.ln(h), start, length)  # (B, |xT|, d)
        _, (h_n, _) = self.lstm(h)  # h_n (layers * 2, B, d_lstm)
        h_lr = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # forward's last, backward's first: (B, 2*d_lstm)
        return self.mean(h_lr), self.logvar(h_lr)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SELU(), nn.Linear(d_hidden, d_out))


def replace_target(x: torch.Tensor, start: torch.Tensor, length: int, token: int) -> torch.Tensor:
    """x with x[b, start_b : start_b + length] set to `token`."""
    steps = torch.arange(x.size(1), device=x.device)[None, :]
    inside = (steps >= start[:, None]) & (steps < start[:, None] + length)
    return x.masked_fill(inside, token)


class Encoder(nn.Module):
    """q(z | x, tau)."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.trunk = Trunk(cfg)

    def forward(self, x: torch.Tensor, start: torch.Tensor, length: int):
        return self.trunk(x, start, length)


class Coupling(nn.Module):
    """RealNVP affine coupling: the half `cond` conditions an affine map of the other half."""

    def __init__(self, cfg: CLSMConfig, flip: bool):
        super().__init__()
        half = cfg.d_z // 2
        self.flip = flip

        def net(tanh: bool) -> nn.Sequential:
            layers = [nn.Linear(half, cfg.d_flow), nn.LeakyReLU(cfg.flow_slope),
                      nn.Linear(cfg.d_flow, cfg.d_flow), nn.LeakyReLU(cfg.flow_slope),
                      nn.Linear(cfg.d_flow, half)]
            nn.init.zeros_(layers[-1].weight)  # start as the identity map
            nn.init.zeros_(layers[-1].bias)
            return nn.Sequential(*layers, nn.Tanh()) if tanh else nn.Sequential(*layers)

        self.scale, self.bias = net(tanh=True), net(tanh=False)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, dim=-1)
        return (b, a) if self.flip else (a, b)

    def join(self, cond: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        return torch.cat([moved, cond] if self.flip else [cond, moved], dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, moved = self.halves(z)
        s = self.scale(cond)
        return self.join(cond, moved * s.exp() + self.bias(cond)), s.sum(-1)

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        cond, moved = self.halves(w)
        return self.join(cond, (moved - self.bias(cond)) * (-self.scale(cond)).exp())


class Flow(nn.Module):
    """f: z -> w, a stack of affine couplings with alternating halves. No context input."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.couplings = nn.ModuleList(Coupling(cfg, flip=i % 2 == 1) for i in range(cfg.n_flow))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns w = f(z) and log|det df/dz| (B,)."""
        logdet = torch.zeros(z.shape[:-1], device=z.device, dtype=z.dtype)
        for c in self.couplings:
            z, ld = c(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        for c in self.couplings[::-1]:
            w = c.inverse(w)
        return w


class Prior(nn.Module):
    """p(z | xC, tau): a Gaussian p(w | xC, tau) from the trunk on x with xT replaced by `p`,
    pulled back through the flow: log p(z) = log N(f(z); mu, sigma) + log|det df/dz|."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.trunk = Trunk(cfg)
        self.flow = Flow(cfg)

    def forward(self, x: torch.Tensor, start: torch.Tensor, length: int):
        """Mean and log-variance of p(w | xC, tau); target tokens in x are ignored."""
        return self.trunk(replace_target(x, start, length, tk.POS), start, length)

    def log_prob(self, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        w, logdet = self.flow(z)
        return gaussian_log_prob(w, mean, logvar) + logdet


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (((x - mean) ** 2) * (-logvar).exp() + logvar + math.log(2 * math.pi)).sum(-1)


# ----------------------------------------------------------------------------- decoder


def decoder_mask(start: torch.Tensor, length: int, n_pos: int) -> torch.Tensor:
    """allowed[b, i, j] over decoder positions (n_pos = 1 + seq_len).

    Target tokens x_a..x_{b-1} sit at decoder positions a+1..b. Positions of `s`, xCL and xCR
    attend to everything except xT; positions of xT attend to everything except future xT."""
    pos = torch.arange(n_pos, device=start.device)
    is_t = (pos[None, :] > start[:, None]) & (pos[None, :] <= start[:, None] + length)  # (B, n)
    key_t, query_t = is_t[:, None, :], is_t[:, :, None]
    not_future = pos[None, :, None] >= pos[None, None, :]  # j <= i
    return ~key_t | (query_t & not_future)  # (B, n, n)


def mix_into_target(x: torch.Tensor, other: torch.Tensor, start: torch.Tensor, length: int,
                    share: float) -> torch.Tensor:
    """x with each target token replaced, with probability `share`, by other's token at the same
    position (own guesses: guesses[:, t] predicts x_t; word dropout: all `p`); context tokens
    are never replaced."""
    pos = torch.arange(x.size(1), device=x.device)
    in_target = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + length)
    swap = in_target & (torch.rand(x.shape, device=x.device) < share)
    return torch.where(swap, other, x)


class Decoder(nn.Module):
    """p(xT | z, xC, tau)."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len + 1, cfg.d_model)
        self.latent = nn.Linear(cfg.d_z, cfg.d_z * cfg.l_z)  # z -> Z~ (lz vectors)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_out)

    def latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent(z).view(z.size(0), self.cfg.l_z, self.cfg.d_z)  # (B, lz, dz)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.full_like(x[:, :1], tk.START)
        return torch.cat([s, x], dim=1)  # (B, 129)

    def forward(self, x: torch.Tensor, z: torch.Tensor, start: torch.Tensor, length: int,
                read: torch.Tensor | None = None):
        """Teacher-forced logits for every decoder position: (B, 129, n_out); the logits
        predicting x_t are at position t. read (B, 128), when given, is what the decoder reads
        in place of x (x with some target tokens replaced; CLSM.forward)."""
        y = self.inputs(x if read is None else read)
        pos = torch.arange(y.size(1), device=x.device)
        h = self.drop(self.embed(y) + self.pos(pos))
        allowed = decoder_mask(start, length, y.size(1))
        zt = self.latents(z)
        for layer in self.layers:
            h = layer(h, pos, allowed, zt)
        return self.head(self.ln(h))


# ----------------------------------------------------------------------------- CLSM


class CLSM(nn.Module):
    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.prior = Prior(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor, start: torch.Tensor, length: int, beta: float = 1.0,
                free_bits: float = 0.0, own_guesses: float = 0.0, word_dropout: float = 0.0):
        """Loss for a batch whose targets all have `length` steps, starting at start (B,).

        Returns (total, parts): total = (1/|xT|) Lrec + beta * KL, the negative of the paper's
        objective; parts holds rec, kl and accuracy as detached 0-d tensors on the batch's
        device (float() them to log: on CUDA a read-back waits for the GPU).
        free_bits > 0 (not in the paper) replaces KL by max(KL, free_bits) in the total: below
        that many nats the KL term has no gradient, so z is not squeezed out of use.
        own_guesses > 0 (not in the paper; parallel scheduled sampling, Duckworth et al. 2019)
        feeds the decoder that share of its own teacher-forced argmax guesses in place of the
        target tokens it reads, so that it learns to go on after its own mistakes as it must
        when decoding freely; the loss still asks for the true tokens.
        word_dropout > 0 (not in the paper; Bowman et al. 2016) has the decoder read that share
        of the target tokens as `p` (after any own guesses), so that it must take more of the
        target from z; the loss still asks for the true tokens."""
        mean, logvar = self.encoder(x, start, length)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # one sample
        p_mean, p_logvar = self.prior(x, start, length)
        kl = (gaussian_log_prob(z, mean, logvar) - self.prior.log_prob(z, p_mean, p_logvar)).mean()
        read = None  # the paper: the decoder reads x itself
        if own_guesses > 0:
            with torch.no_grad():
                guesses = self.decoder(x, z, start, length)[:, :-1].argmax(-1)  # (B, 128)
            read = mix_into_target(x, guesses, start, length, own_guesses)
        if word_dropout > 0:
            dropped = torch.full_like(x, tk.POS)
            read = mix_into_target(x if read is None else read, dropped, start, length, word_dropout)
        logits = gather_span(self.decoder(x, z, start, length, read=read), start, length)
        target = gather_span(x[:, :, None], start, length)[..., 0]  # (B, T)
        rec = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1))
        total = rec + beta * torch.clamp(kl, min=free_bits)
        acc = (logits.argmax(-1) == target).float().mean()
        return total, {"rec": rec.detach(), "kl": kl.detach(), "acc": acc}

    @torch.no_grad()
    def prior_latent(self, x: torch.Tensor, start: torch.Tensor, length: int,
                     eps: torch.Tensor | None = None):
        """Draw z ~ p(z | xC, tau) by w = mean + sigma * eps, z = f^-1(w). eps=0 gives the mode
        of p(w). Returns z, w, mean, logvar."""
        mean, logvar = self.prior(x, start, length)
        if eps is None:
            eps = torch.randn_like(mean)
        w = mean + (0.5 * logvar).exp() * eps
        return self.prior.flow.inverse(w), w, mean, logvar

    @torch.no_grad()
    def decode_naive(self, x: torch.Tensor, z: torch.Tensor, start: int | torch.Tensor,
                     length: int) -> torch.Tensor:
        """Reference argmax decode that recomputes the whole decoder at every step: (B, length).
        start is one step for the batch or one per window (B,)."""
        x = x.clone()
        starts = (start if isinstance(start, torch.Tensor)
                  else torch.full((x.size(0),), start, dtype=torch.long, device=x.device))
        rows = torch.arange(x.size(0), device=x.device)
        for i in range(length):
            logits = self.decoder(x, z, starts, length)
            x[rows, starts + i] = logits[rows, starts + i].argmax(-1)
        return gather_span(x[:, :, None], starts, length)[..., 0]

    def model_args(self) -> dict:
        return asdict(self.cfg)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> CLSM:
        model = cls(CLSMConfig.from_dict(ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
