"""Transformer building blocks of the CLSM (engine/model.py): relative self-attention, the
decoder's cross-attention to the latent vectors, and the pre-LN encoder and decoder layers.
Kept apart from the model so that model.py reads as the paper's parts (encoder, prior, flow,
decoder); engine/fast.py and engine/decoding.py reuse the layers' weights in their cached forms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:  # the config lives with the model, which imports this module
    from engine.model import CLSMConfig


class RelativeAttention(nn.Module):
    """Multi-head attention with learned relative position logits (Shaw et al. 2018; the
    memory-light form of Music Transformer): logit_ij = q_i . (k_j + e_{clip(j - i)}) / sqrt(dh).
    Relative terms are computed as q @ E^T over all distances, then gathered."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0
        self.n_heads, self.d_head, self.max_rel = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.max_rel
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.rel = nn.Parameter(torch.randn(cfg.n_heads, 2 * cfg.max_rel + 1, self.d_head) * 0.02)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        shape = (B, L, self.n_heads, self.d_head)
        return (q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2),
                v.view(shape).transpose(1, 2))  # 3 x (B, H, L, dh)

    def relative_logits(self, q: torch.Tensor, pos_q: torch.Tensor,
                        pos_k: torch.Tensor) -> torch.Tensor:
        """q . e_{clip(j - i)} for every query i and key j: (B, H, Lq, Lk)."""
        B, H, Lq, _ = q.shape
        Lk = pos_k.size(0)
        rel_idx = (pos_k[None, :] - pos_q[:, None]).clamp(-self.max_rel, self.max_rel) + self.max_rel
        rel_logits = torch.einsum("bhqd,hrd->bhqr", q, self.rel)  # (B, H, Lq, 2M+1)
        return rel_logits.gather(-1, rel_idx[None, None].expand(B, H, Lq, Lk))

    def relative_logits_square(self, q: torch.Tensor) -> torch.Tensor:
        """Same for self-attention over positions 0..L-1 with L-1 <= max_rel, by the "skewing"
        trick (Music Transformer, extended to both directions): q @ E^T over the 2L-1 distances,
        then a pad-free reshape instead of a gather (much cheaper in training)."""
        B, H, L, _ = q.shape
        e = self.rel[:, self.max_rel - (L - 1): self.max_rel + L]  # distances -(L-1)..L-1
        x = torch.einsum("bhqd,hrd->bhqr", q, e)  # (B, H, L, 2L-1): column r = distance r-(L-1)
        # out[i, j] = x[i, j - i + L - 1] = flat[(L - 1) + i * (2L - 2) + j]
        flat = x.reshape(B, H, L * (2 * L - 1))[..., L - 1: L - 1 + L * (2 * L - 2)]
        return flat.reshape(B, H, L, 2 * L - 2)[..., :L]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rel_logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """q (B,H,Lq,dh), k/v (B,H,Lk,dh), rel_logits (B,H,Lq,Lk), allowed (B|1,Lq,Lk) bool.
        No dropout on the attention map: on 2 CPU cores it cost a fifth of a training step."""
        B, H, Lq, dh = q.shape
        att = (q @ k.transpose(-2, -1) + rel_logits) / math.sqrt(dh)  # (B, H, Lq, Lk)
        if allowed is not None:
            att = att.masked_fill(~allowed[:, None], float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, Lq, H * dh)
        return self.proj(y)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Self-attention over positions `pos` = 0..L-1."""
        q, k, v = self.split(x)
        if q.size(2) - 1 <= self.max_rel:
            rel = self.relative_logits_square(q)
        else:
            rel = self.relative_logits(q, pos, pos)
        return self.attend(q, k, v, rel, allowed)


class CrossAttention(nn.Module):
    """Plain multi-head attention from the decoder to the latent vectors Z~ (no positions)."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_z, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def memory(self, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = zt.shape
        k, v = self.kv(zt).split(self.n_heads * self.d_head, dim=-1)
        shape = (B, L, self.n_heads, self.d_head)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)  # (B, H, lz, dh)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q = self.q(x).view(B, L, self.n_heads, self.d_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1) / math.sqrt(self.d_head)).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.ReLU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer with relative self-attention."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn, self.ff = RelativeAttention(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), pos, None))
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    """Pre-LN transformer decoder layer: masked relative self-attention, cross-attention to Z~."""

    def __init__(self, cfg: CLSMConfig):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn, self.cross_attn, self.ff = (RelativeAttention(cfg), CrossAttention(cfg),
                                                    FeedForward(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor,
                zt: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x), pos, allowed))
        mk, mv = self.cross_attn.memory(zt)
        x = x + self.drop(self.cross_attn.attend(self.ln2(x), mk, mv))
        return x + self.ff(self.ln3(x))
