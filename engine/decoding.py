"""Inference parts of the CLSM with a key/value cache (SPEC section 2 and 6).

Two plain `nn.Module`s, written so that TorchScript can compile them (engine/export.py does
that; this file knows nothing about TorchScript files) and so that they also run as they are
(the `eager` backend):

  LatentPart     the prior p(w | xC, tau) (trunk -> mean, log-variance) and the flow f, f^-1
  CachedDecoder  argmax / Gumbel-max decoding of xT given z and the context, one query
                 position per step against cached keys and values

Decoder indexing is engine/model.py's: y = [s, x_0 .. x_127]; the logits at y position t predict
x_t; the target x_a .. x_{a+T-1} sits at y positions a+1 .. a+T. Context positions never attend
to the target, so one pass over all 129 positions (target keys masked) yields every context
key/value and the logits of x_a. Each further step runs one query position p = a+1+k.

Speed-ups over the reference (all exact up to float rounding):
- q is pre-scaled by 1/sqrt(dh), so neither q.k nor the relative term needs a division;
- the relative embeddings are expanded once to every distance -128..128 (clipped as in
  training) and stored after the keys in one cache tensor, so q.k and q.e come from one matmul
  and the step's relative logits are a slice instead of a gather;
- cross-attention to the lz latent vectors is folded per z into two small matrices
  (q-projection x memory keys, memory values x output projection): 2 matmuls per step.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import tokens as tk
from engine.layers import DecoderLayer
from engine.model import Decoder, Prior, replace_target


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with -inf outside the nucleus: the fewest most likely tokens whose probabilities
    reach top_p (Holtzman et al. 2020); the most likely token always stays."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


class LatentPart(nn.Module):
    """p(w | xC, tau) and the flow f: z -> w (both directions), batch-first."""

    def __init__(self, prior: Prior):
        super().__init__()
        self.trunk = copy.deepcopy(prior.trunk)
        # Two lists over the same couplings: TorchScript cannot iterate a ModuleList backwards.
        self.couplings = copy.deepcopy(prior.flow.couplings)
        self.couplings_rev = nn.ModuleList(list(self.couplings)[::-1])

    def forward(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 128) -> mean, logvar of p(w | xC, tau), each (B, dz). Target tokens ignored."""
        starts = torch.full((x.size(0),), start, dtype=torch.long, device=x.device)
        return self.trunk(replace_target(x, starts, length, tk.POS), starts, length)

    @torch.jit.export
    def flow_forward(self, z: torch.Tensor) -> torch.Tensor:
        """w = f(z)."""
        for c in self.couplings:
            z, _ = c(z)
        return z

    @torch.jit.export
    def flow_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """z = f^-1(w)."""
        for c in self.couplings_rev:
            w = c.inverse(w)
        return w


class CachedLayer(nn.Module):
    """One decoder layer's weights, rearranged for the cached path."""

    def __init__(self, layer: DecoderLayer, n_pos: int):
        super().__init__()
        attn, cross = layer.self_attn, layer.cross_attn
        self.n_heads, self.d_head = attn.n_heads, attn.d_head
        d = attn.n_heads * attn.d_head
        self.ln1, self.ln2, self.ln3 = (copy.deepcopy(m) for m in (layer.ln1, layer.ln2, layer.ln3))
        scale = 1.0 / math.sqrt(attn.d_head)
        w, b = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
        w[:d] *= scale  # pre-scaled queries: the relative term shares the same division
        b[:d] *= scale
        self.register_buffer("qkv_w", w)
        self.register_buffer("qkv_b", b)
        self.proj = copy.deepcopy(attn.proj)
        # rel_ext[h, n_pos - 1 + dist] for dist = -(n_pos-1) .. n_pos-1, clipped like training.
        dist = torch.arange(-(n_pos - 1), n_pos).clamp(-attn.max_rel, attn.max_rel) + attn.max_rel
        # Stored transposed, like the key cache, so that q @ keys needs no copy.
        rel_ext = attn.rel.detach()[:, dist].transpose(1, 2).contiguous()  # (H, dh, 2n-1)
        self.register_buffer("rel_ext_t", rel_ext)
        self.register_buffer("cq_w", cross.q.weight.detach().clone() * scale)
        self.register_buffer("cq_b", cross.q.bias.detach().clone() * scale)
        self.cross_kv = copy.deepcopy(cross.kv)
        self.cross_proj = copy.deepcopy(cross.proj)
        self.ff1, self.ff2 = copy.deepcopy(layer.ff.net[0]), copy.deepcopy(layer.ff.net[2])

    def cross_memory(self, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fold the cross-attention for latents zt (B, lz, dz): returns m (B, D, H*lz),
        m_bias (B, 1, H*lz) and vp (B, H*lz, D) so that for queries x (B, L, D)
        cross(x) = softmax_lz(x @ m + m_bias) @ vp + proj bias."""
        B, lz, _ = zt.shape
        H, dh = self.n_heads, self.d_head
        k, v = self.cross_kv(zt).split(H * dh, dim=-1)
        k = k.view(B, lz, H, dh)
        v = v.view(B, lz, H, dh)
        wq = self.cq_w.view(H, dh, -1)  # (H, dh, D)
        m = torch.einsum("hed,blhe->bdhl", wq, k).reshape(B, -1, H * lz)
        m_bias = torch.einsum("he,blhe->bhl", self.cq_b.view(H, dh), k).reshape(B, 1, H * lz)
        wp = self.cross_proj.weight.view(-1, H, dh)  # (D, H, dh)
        vp = torch.einsum("blhe,ohe->bhlo", v, wp).reshape(B, H * lz, -1)
        return m, m_bias, vp

    def cross(self, x: torch.Tensor, m: torch.Tensor, m_bias: torch.Tensor,
              vp: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        att = torch.baddbmm(m_bias, x, m).view(B, L, self.n_heads, -1).softmax(-1)
        return torch.bmm(att.view(B, L, -1), vp) + self.cross_proj.bias

    def context(self, h: torch.Tensor, key_bias: torch.Tensor, m: torch.Tensor,
                m_bias: torch.Tensor, vp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All n positions at once; key_bias (1, 1, 1, n) is -inf on target keys.
        h may have batch 1 while the latents (m, m_bias, vp) have batch Bz: the first layer's
        self-attention does not depend on z, so interpolation points share it.
        Returns the layer output (Bz, n, D), the transposed key cache (Bz, H, dh, n) and the
        value cache (Bz, H, n, dh)."""
        B, n, D = h.shape
        Bz = m.size(0)
        H, dh = self.n_heads, self.d_head
        q, k, v = F.linear(self.ln1(h), self.qkv_w, self.qkv_b).view(B, n, 3, H, dh).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, n, dh)
        k_t = k.transpose(-2, -1).contiguous()  # (B, H, dh, n)
        # Relative logits per head over all B*n queries (one GEMM per head, the weights are
        # shared across the batch), then the skew rel[i, j] = r[i, (n-1) + j - i] by a
        # pad-free reshape (Music Transformer).
        r = q.transpose(0, 1).reshape(H, B * n, dh) @ self.rel_ext_t  # (H, B*n, 2n-1)
        r = r.view(H, B, n * (2 * n - 1))[..., n - 1: n - 1 + n * (2 * n - 2)]
        rel = r.reshape(H, B, n, 2 * n - 2)[..., :n].transpose(0, 1)  # (B, H, n, n)
        att = (q @ k_t + rel + key_bias).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, n, D)
        h = h + self.proj(y)
        if Bz != B:  # the caches get written per batch row later: real copies
            h = h.expand(Bz, -1, -1)
            k_t = k_t.expand(Bz, -1, -1, -1).contiguous()
            v = v.expand(Bz, -1, -1, -1)
        h = h + self.cross(self.ln2(h), m, m_bias, vp)
        h = h + self.ff2(F.relu(self.ff1(self.ln3(h))))
        return h, k_t, v.contiguous()

    def step(self, h: torch.Tensor, p: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
             key_bias: torch.Tensor, m: torch.Tensor, m_bias: torch.Tensor,
             vp: torch.Tensor) -> torch.Tensor:
        """One query position p: h (B, 1, D); writes its key/value into the caches in place."""
        B = h.size(0)
        H, dh = self.n_heads, self.d_head
        n = v_cache.size(2)
        q, k, v = F.linear(self.ln1(h), self.qkv_w, self.qkv_b).view(B, 3, H, dh).unbind(1)
        k_cache[:, :, :, p] = k
        v_cache[:, :, p] = v
        # key j sits at distance j - p: rel_ext_t column n-1 + j - p
        e = self.rel_ext_t[:, :, n - 1 - p: 2 * n - 1 - p]  # (H, dh, n)
        rel = (q.transpose(0, 1) @ e).transpose(0, 1).unsqueeze(2)  # (B, H, 1, n)
        att = (q.unsqueeze(2) @ k_cache + rel + key_bias).softmax(-1)
        y = (att @ v_cache).view(B, 1, H * dh)
        h = h + self.proj(y)
        h = h + self.cross(self.ln2(h), m, m_bias, vp)
        return h + self.ff2(F.relu(self.ff1(self.ln3(h))))


class CachedDecoder(nn.Module):
    """p(xT | z, xC, tau) decoded token by token with a key/value cache."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        cfg = decoder.cfg
        self.n_pos = cfg.seq_len + 1
        self.l_z, self.d_z = cfg.l_z, cfg.d_z
        self.embed, self.pos = copy.deepcopy(decoder.embed), copy.deepcopy(decoder.pos)
        self.latent = copy.deepcopy(decoder.latent)
        self.layers = nn.ModuleList(CachedLayer(layer, self.n_pos) for layer in decoder.layers)
        self.ln, self.head = copy.deepcopy(decoder.ln), copy.deepcopy(decoder.head)

    def forward(self, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
                temperature: float = 0.0, gumbel: torch.Tensor | None = None,
                top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B or 1, 128) tokens (target positions ignored), z (B, dz); the target is
        x[:, start:start+length]; x with batch 1 is shared by every z (interpolation).
        Argmax, or with temperature > 0 and gumbel (B, length, n_out) Gumbel noise, a sample
        from softmax(logits / temperature), restricted to the top_p nucleus when top_p < 1.
        Returns tokens (B, length) and the logits they
        were chosen from (B, length, n_out)."""
        B = z.size(0)
        n = self.n_pos
        dev = x.device
        y = torch.cat([torch.full_like(x[:, :1], tk.START), x], dim=1)  # (Bx, n)
        h = self.embed(y) + self.pos.weight  # (Bx, n, D)
        ar = torch.arange(n, device=dev)
        neg_inf = torch.tensor(float("-inf"), device=dev, dtype=h.dtype)
        zero = torch.zeros((), device=dev, dtype=h.dtype)
        is_target = (ar > start) & (ar <= start + length)
        ctx_bias = torch.where(is_target, neg_inf, zero).view(1, 1, 1, n)
        # Step k queries position p = start+1+k and must not see targets after p.
        qpos = torch.arange(length, device=dev) + start + 1
        step_bias = torch.where(is_target[None, :] & (ar[None, :] > qpos[:, None]), neg_inf, zero)
        zt = self.latent(z).view(B, self.l_z, self.d_z)
        mems: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        kes: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        for layer in self.layers:
            m, m_bias, vp = layer.cross_memory(zt)
            h, ke, v = layer.context(h, ctx_bias, m, m_bias, vp)
            mems.append((m, m_bias, vp))
            kes.append(ke)
            vs.append(v)
        logits = self.head(self.ln(h[:, start]))  # (B, n_out): predicts x_start
        out_tokens = torch.empty((B, length), dtype=torch.long, device=dev)
        out_logits = torch.empty((B, length, logits.size(-1)), dtype=logits.dtype, device=dev)
        for k in range(length):
            out_logits[:, k] = logits
            if gumbel is not None and temperature > 0.0:
                scaled = logits / temperature
                if top_p < 1.0:
                    scaled = nucleus(scaled, top_p)
                token = (scaled + gumbel[:, k]).argmax(-1)
            else:
                token = logits.argmax(-1)
            out_tokens[:, k] = token
            if k == length - 1:
                break
            p = start + 1 + k
            h = (self.embed(token) + self.pos.weight[p]).unsqueeze(1)  # (B, 1, D)
            bias = step_bias[k]
            for i, step_layer in enumerate(self.layers):
                m, m_bias, vp = mems[i]
                h = step_layer.step(h, p, kes[i], vs[i], bias, m, m_bias, vp)
            logits = self.head(self.ln(h[:, 0]))
        return out_tokens, out_logits
