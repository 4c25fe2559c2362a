"""The fast inference parts (issue 12): the same functions as engine/decoding.py's LatentPart
and CachedDecoder, same call signatures, arranged for fewer and cheaper operations per step.

Plain `nn.Module`s written for TorchScript (engine/export.py compiles them; this file knows
nothing about TorchScript files). On one CPU thread a decode step is a few hundred kFLOP, so
its cost is mostly the operator calls, not arithmetic; everything here cuts calls or their
cost (measured figures and what is still missing: docs/engine-speed.md):

FastLatent (prior trunk + flow)
- q pre-scaled by 1/sqrt(dh); relative logits from one matmul against the relative embeddings
  expanded to every distance (clipped as in training), skewed by a strided view;
- the last transformer layer runs its queries, feed-forward and final norm on the target rows
  only (the Bi-LSTM reads nothing else);
- the Bi-LSTM optionally in bfloat16 (`lstm_bf16`): its recurrent weights (1 MB per step and
  direction at the paper's sizes) are what the prior waits for; a reduced-precision path.

FastDecoder (cached decode)
- the context pass runs on the context rows only (the target rows are decoded step by step
  anyway): for a 4-bar target that is half the rows; the last layer's output at one row;
- each head's query carries one extra constant 1 and each cached key one extra "mask" entry
  (0 once written, -1e9 before): future-target masking costs no operation; keys and values sit
  interleaved in one cache per layer, written once a step;
- the relative term for query p is a free slice of the expanded embeddings: at batch 1 added to
  the keys before one matmul (q . k + q . e = q . (k + e)), at batch > 1 one product per head;
- weights pre-transposed for x @ w_t (MKL's NN path, ~2x faster than linear's NT at M=1);
- the decode loop (argmax or Gumbel-max sampling with temperature and top-p) runs inside the
  module: one call per infill, no Python between steps.
All of it is exact up to float rounding (tests/test_fast.py: identical argmax tokens).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import tokens as tk
from engine.decoding import nucleus
from engine.layers import DecoderLayer, EncoderLayer
from engine.model import Decoder, Prior

MASKED = -1e9  # not -inf: 0 * -inf would be nan in the matmul; exp(-1e9) is exactly 0 anyway


def relative_table(rel: torch.Tensor, n_pos: int, max_rel: int, extra_row: bool) -> torch.Tensor:
    """rel (H, 2*max_rel+1, dh) -> (H, dh [+1], 2*n_pos-1): column n_pos-1+d holds the
    embedding of distance d = -(n_pos-1)..n_pos-1, clipped to +-max_rel as in training."""
    dist = torch.arange(-(n_pos - 1), n_pos).clamp(-max_rel, max_rel) + max_rel
    table = rel.detach()[:, dist].transpose(1, 2)  # (H, dh, 2n-1)
    if extra_row:  # the mask entry of the keys: the relative term adds nothing to it
        table = torch.cat([table, torch.zeros_like(table[:, :1])], dim=1)
    return table.contiguous()


def skew(r: torch.Tensor, first_row: int, n_rows: int, n_keys: int) -> torch.Tensor:
    """r (G, n_rows, 2*n_keys-1) with r[g, i, n_keys-1+d] the logit of distance d for query
    position first_row+i -> (G, n_rows, n_keys) with out[g, i, j] = r[g, i, n_keys-1+j-(first_row+i)].
    A strided view (Music Transformer's skewing), no copy and no gather."""
    r = r.contiguous()
    w = 2 * n_keys - 1
    return r.as_strided((r.size(0), n_rows, n_keys), (n_rows * w, w - 1, 1),
                        r.storage_offset() + n_keys - 1 - first_row)


class FastEncoderLayer(nn.Module):
    """A pre-LN relative-attention encoder layer (no mask) with pre-scaled queries."""

    def __init__(self, layer: EncoderLayer, n_pos: int):
        super().__init__()
        attn = layer.attn
        self.n_heads, self.d_head = attn.n_heads, attn.d_head
        d = attn.n_heads * attn.d_head
        self.ln1, self.ln2 = copy.deepcopy(layer.ln1), copy.deepcopy(layer.ln2)
        scale = 1.0 / math.sqrt(attn.d_head)
        w, b = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
        w[:d] *= scale
        b[:d] *= scale
        self.register_buffer("qkv_w", w)
        self.register_buffer("qkv_b", b)
        self.register_buffer("rel_t", relative_table(attn.rel, n_pos, attn.max_rel, False))
        self.proj = copy.deepcopy(attn.proj)
        self.ff1, self.ff2 = copy.deepcopy(layer.ff.net[0]), copy.deepcopy(layer.ff.net[2])

    def forward(self, h: torch.Tensor, first: int, rows: int) -> torch.Tensor:
        """h (B, L, D) -> the layer's output for rows first..first+rows-1: (B, rows, D)."""
        B, L, D = h.shape
        H, dh = self.n_heads, self.d_head
        qkv = F.linear(self.ln1(h), self.qkv_w, self.qkv_b)  # (B, L, 3D)
        q = qkv[:, first:first + rows, :D].reshape(B, rows, H, dh).transpose(1, 2)  # (B,H,r,dh)
        k = qkv[:, :, D:2 * D].reshape(B, L, H, dh).permute(0, 2, 3, 1)  # (B, H, dh, L)
        v = qkv[:, :, 2 * D:].reshape(B, L, H, dh).transpose(1, 2)  # (B, H, L, dh)
        # One matmul per head against the shared table (heads first, batch rows stacked).
        r = q.transpose(0, 1).reshape(H, B * rows, dh) @ self.rel_t  # (H, B*rows, 2L-1)
        rel = skew(r.view(H * B, rows, 2 * L - 1), first, rows, L)
        rel = rel.view(H, B, rows, L).transpose(0, 1)  # (B, H, rows, L)
        att = torch.softmax(q @ k + rel, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, rows, D)
        h = h[:, first:first + rows] + self.proj(y)
        return h + self.ff2(F.relu(self.ff1(self.ln2(h))))


class FastLatent(nn.Module):
    """p(w | xC, tau) and the flow f: z -> w; the interface of decoding.LatentPart."""

    def __init__(self, prior: Prior, lstm_bf16: bool = False):
        super().__init__()
        trunk = prior.trunk
        self.seq_len = trunk.pos.num_embeddings
        self.embed, self.pos = copy.deepcopy(trunk.embed), copy.deepcopy(trunk.pos)
        self.layers = nn.ModuleList(FastEncoderLayer(layer, self.seq_len) for layer in trunk.layers)
        self.ln = copy.deepcopy(trunk.ln)
        self.lstm_bf16 = lstm_bf16
        self.lstm = copy.deepcopy(trunk.lstm)
        if lstm_bf16:
            self.lstm = self.lstm.to(torch.bfloat16)
        self.mean, self.logvar = copy.deepcopy(trunk.mean), copy.deepcopy(trunk.logvar)
        # Two lists over the same couplings: TorchScript cannot iterate a ModuleList backwards.
        self.couplings = copy.deepcopy(prior.flow.couplings)
        self.couplings_rev = nn.ModuleList(list(self.couplings)[::-1])

    def forward(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 128) -> mean, logvar of p(w | xC, tau), each (B, dz). Target tokens ignored."""
        h = self.trunk_rows(x, start, length)  # (B, T, D)
        if self.lstm_bf16:
            _, (h_n, _) = self.lstm(h.to(torch.bfloat16))
            h_n = h_n.float()
        else:
            _, (h_n, _) = self.lstm(h)
        return self.heads(torch.cat([h_n[-2], h_n[-1]], dim=-1))  # forward's last, backward's first

    # The two halves around the Bi-LSTM, exported so that engine/native.py can run the
    # recurrence in C++ between them.
    @torch.jit.export
    def trunk_rows(self, x: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """The Bi-LSTM's input: the encoder's normed output at the target rows (B, T, D)."""
        x = x.clone()
        x[:, start:start + length] = tk.POS
        h = self.embed(x) + self.pos.weight[:x.size(1)]  # (B, L, D)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):  # the last one: the rows the Bi-LSTM reads
            h = layer(h, start, length) if i == last else layer(h, 0, h.size(1))
        return self.ln(h)

    @torch.jit.export
    def heads(self, h_lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[h_l; h_r] (B, 2 d_lstm) -> mean, logvar."""
        return self.mean(h_lr), self.logvar(h_lr)

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


def _with_extra_row(w: torch.Tensor, b: torch.Tensor, n_heads: int, extra: float,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (H*dh, D) projection and its bias -> (H*(dh+1), D): each head gets one more output,
    constant `extra` (zero weights, bias `extra`)."""
    d_in = w.size(1)
    w = (w * scale).view(n_heads, -1, d_in)
    b = (b * scale).view(n_heads, -1)
    w = torch.cat([w, torch.zeros(n_heads, 1, d_in)], dim=1).reshape(-1, d_in)
    b = torch.cat([b, torch.full((n_heads, 1), extra)], dim=1).reshape(-1)
    return w, b


class FastLayer(nn.Module):
    """One decoder layer's weights, rearranged for the fast cached path."""

    def __init__(self, layer: DecoderLayer, n_pos: int):
        super().__init__()
        attn, cross = layer.self_attn, layer.cross_attn
        H, dh = attn.n_heads, attn.d_head
        d = H * dh
        self.n_heads, self.d_head = H, dh
        self.masked = MASKED
        self.ln1, self.ln2, self.ln3 = (copy.deepcopy(m) for m in (layer.ln1, layer.ln2, layer.ln3))
        w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
        scale = 1.0 / math.sqrt(dh)
        wq, bq = _with_extra_row(w[:d], b[:d], H, 1.0, scale)  # queries end in a constant 1
        wk, bk = _with_extra_row(w[d:2 * d], b[d:2 * d], H, 0.0, 1.0)  # keys in a 0 (unmasked)
        # Keys and values interleaved per head, [k_h (dh+1), v_h (dh)]: one cache, one write a step.
        wkv = torch.cat([wk.view(H, dh + 1, -1), w[2 * d:].view(H, dh, -1)], dim=1).reshape(-1, d)
        bkv = torch.cat([bk.view(H, dh + 1), b[2 * d:].view(H, dh)], dim=1).reshape(-1)
        self.register_buffer("qkv_wt", torch.cat([wq, wkv]).t().contiguous())
        self.register_buffer("qkv_b", torch.cat([bq, bkv]).contiguous())
        rel_t = relative_table(attn.rel, n_pos, attn.max_rel, True)  # (H, dh+1, 2n-1)
        self.register_buffer("rel_t", rel_t)
        self.register_buffer("rel_tt", rel_t.transpose(1, 2).contiguous())  # (H, 2n-1, dh+1)
        self.register_buffer("proj_wt", attn.proj.weight.detach().t().contiguous())
        self.register_buffer("proj_b", attn.proj.bias.detach().clone())
        self.register_buffer("cq_w", cross.q.weight.detach().clone() * scale)
        self.register_buffer("cq_b", cross.q.bias.detach().clone() * scale)
        self.cross_kv = copy.deepcopy(cross.kv)
        self.cross_proj = copy.deepcopy(cross.proj)
        ff1, ff2 = layer.ff.net[0], layer.ff.net[2]
        self.register_buffer("ff1_wt", ff1.weight.detach().t().contiguous())
        self.register_buffer("ff1_b", ff1.bias.detach().clone())
        self.register_buffer("ff2_wt", ff2.weight.detach().t().contiguous())
        self.register_buffer("ff2_b", ff2.bias.detach().clone())

    def ff(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.ff1_wt + self.ff1_b) @ self.ff2_wt + self.ff2_b

    def cross_memory(self, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-attention to latents zt (B, lz, dz) folded into m (B, D, H*lz), m_bias
        (B, 1, H*lz) and vp (B, H*lz, D): cross(x) = softmax_lz(x @ m + m_bias) @ vp + bias."""
        B, lz, _ = zt.shape
        H, dh = self.n_heads, self.d_head
        k, v = self.cross_kv(zt).split(H * dh, dim=-1)
        k = k.view(B, lz, H, dh)
        v = v.view(B, lz, H, dh)
        m = torch.einsum("hed,blhe->bdhl", self.cq_w.view(H, dh, -1), k).reshape(B, -1, H * lz)
        m_bias = torch.einsum("he,blhe->bhl", self.cq_b.view(H, dh), k).reshape(B, 1, H * lz)
        vp = torch.einsum("blhe,ohe->bhlo", v, self.cross_proj.weight.view(-1, H, dh))
        return m, m_bias, vp.reshape(B, H * lz, -1)

    def cross(self, x: torch.Tensor, m: torch.Tensor, m_bias: torch.Tensor,
              vp: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        att = torch.baddbmm(m_bias, x, m).view(B, L, self.n_heads, -1).softmax(-1)
        return torch.baddbmm(self.cross_proj.bias, att.view(B, L, -1), vp)

    def context(self, h: torch.Tensor, rel_idx: torch.Tensor, split: int, n_target: int,
                first: int, rows: int, m: torch.Tensor, m_bias: torch.Tensor,
                vp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context rows only: h (Bh, nc, D) holds decoder positions 0..split-1 and
        split+n_target..; rel_idx (nc, nc) indexes their relative distances in rel_t.
        Keys and values come from all nc rows, the output from rows first..first+rows-1 only
        (the last layer needs one row: the one that predicts the first target token).
        Bh may be 1 while the latents have batch Bz (interpolation: the first layer's
        self-attention does not depend on z). Returns the output (Bz, rows, D) and the
        key/value cache (Bz, H, n, 2*dh+1) over all n positions: [key (dh+1), value (dh)] per
        head and position, the target's keys masked until written."""
        B, nc, D = h.shape
        Bz = m.size(0)
        H, dh = self.n_heads, self.d_head
        dq = H * (dh + 1)
        qkv = self.ln1(h) @ self.qkv_wt + self.qkv_b
        q = qkv[:, first:first + rows, :dq].reshape(B, rows, H, dh + 1).transpose(1, 2)
        kv = qkv[..., dq:].reshape(B, nc, H, 2 * dh + 1).transpose(1, 2)  # (B, H, nc, 2dh+1)
        r = q.transpose(0, 1).reshape(H, B * rows, dh + 1) @ self.rel_t  # (H, B*rows, 2n-1)
        idx = rel_idx[first:first + rows].expand(H, B, rows, nc)
        rel = r.view(H, B, rows, -1).gather(-1, idx).transpose(0, 1)  # (B, H, rows, nc)
        att = torch.softmax(q @ kv[..., :dh + 1].transpose(-1, -2) + rel, dim=-1)
        y = (att @ kv[..., dh + 1:]).transpose(1, 2).reshape(B, rows, D)
        h = h[:, first:first + rows] + (y @ self.proj_wt + self.proj_b)
        if Bz != B:
            h, kv = h.expand(Bz, -1, -1), kv.expand(Bz, -1, -1, -1)
        h = h + self.cross(self.ln2(h), m, m_bias, vp)
        h = h + self.ff(self.ln3(h))
        target = torch.zeros((Bz, H, n_target, 2 * dh + 1), dtype=h.dtype, device=h.device)
        target[..., dh] = self.masked
        return h, torch.cat([kv[:, :, :split], target, kv[:, :, split:]], dim=2)

    def step(self, h: torch.Tensor, p: int, kv_cache: torch.Tensor, m: torch.Tensor,
             m_bias: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
        """One query position p: h (B, D); writes its key and value into the cache.
        Weights pre-transposed: x @ w_t is about twice as fast as linear(x, w) on these tiny
        shapes (MKL's NN path vs NT); TorchScript runs an addmm as mm + add anyway."""
        B, D = h.shape
        H, dh = self.n_heads, self.d_head
        dq = H * (dh + 1)
        n = kv_cache.size(2)
        qkv = torch.mm(self.ln1(h), self.qkv_wt) + self.qkv_b  # (B, dq + H*(2dh+1))
        kv_cache.select(2, p).copy_(qkv[:, dq:].view(B, H, 2 * dh + 1))  # mask entry -> 0
        q = qkv[:, :dq].view(B, H, 1, dh + 1)
        keys = kv_cache[..., :dh + 1]  # (B, H, n, dh+1)
        # key j sits at distance j - p: relative table row n-1 + j - p
        if B == 1:  # q.(k + e) in one product: fewest calls
            att = q @ (keys + self.rel_tt[:, n - 1 - p: 2 * n - 1 - p]).transpose(-1, -2)
        else:  # one (B, dh+1) x (dh+1, n) product per head instead of adding e to every row
            rel = torch.bmm(q.view(B, H, dh + 1).transpose(0, 1),
                            self.rel_t[:, :, n - 1 - p: 2 * n - 1 - p])  # (H, B, n)
            att = q @ keys.transpose(-1, -2) + rel.transpose(0, 1).unsqueeze(2)
        y = (torch.softmax(att, dim=-1) @ kv_cache[..., dh + 1:]).view(B, D)  # (B,H,1,dh)
        h = h + (torch.mm(y, self.proj_wt) + self.proj_b)
        x = self.ln2(h).unsqueeze(1)  # (B, 1, D)
        att = torch.baddbmm(m_bias, x, m).view(B, 1, H, -1).softmax(-1).view(B, 1, -1)
        h = h + torch.baddbmm(self.cross_proj.bias, att, vp).view(B, D)
        return h + self.ff(self.ln3(h))


class FastDecoder(nn.Module):
    """p(xT | z, xC, tau) decoded in one call; the interface of decoding.CachedDecoder."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        cfg = decoder.cfg
        self.n_pos = cfg.seq_len + 1
        self.l_z, self.d_z = cfg.l_z, cfg.d_z
        self.embed, self.pos = copy.deepcopy(decoder.embed), copy.deepcopy(decoder.pos)
        self.latent = copy.deepcopy(decoder.latent)
        self.layers = nn.ModuleList(FastLayer(layer, self.n_pos) for layer in decoder.layers)
        self.ln = copy.deepcopy(decoder.ln)
        self.register_buffer("head_wt", decoder.head.weight.detach().t().contiguous())
        self.register_buffer("head_b", decoder.head.bias.detach().clone())

    def forward(self, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
                temperature: float = 0.0, gumbel: torch.Tensor | None = None,
                top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B or 1, 128) tokens (target positions ignored), z (B, dz); the target is
        x[:, start:start+length]; x with batch 1 is shared by every z (interpolation).
        Argmax, or with temperature > 0 and gumbel (B, length, n_out) Gumbel noise, a sample
        from softmax(logits / temperature), restricted to the top_p nucleus when top_p < 1.
        Returns tokens (B, length) and the logits they were chosen from (B, length, n_out)."""
        B = z.size(0)
        n = self.n_pos
        dev = x.device
        y = torch.cat([torch.full_like(x[:, :1], tk.START), x], dim=1)  # (Bx, n)
        h = self.embed(y) + self.pos.weight  # (Bx, n, D)
        split = start + 1  # decoder positions 0..start are the start symbol and xCL
        h = torch.cat([h[:, :split], h[:, split + length:]], dim=1)  # context rows (Bx, nc, D)
        ar = torch.arange(n, device=dev)
        pos_c = torch.cat([ar[:split], ar[split + length:]])
        rel_idx = n - 1 + pos_c[None, :] - pos_c[:, None]  # (nc, nc)
        zt = self.latent(z).view(B, self.l_z, self.d_z)
        mems: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        caches: list[torch.Tensor] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            m, m_bias, vp = layer.cross_memory(zt)
            # the last layer's output is needed at one row: decoder position start
            first, rows = (start, 1) if i == last else (0, h.size(1))
            h, kv_cache = layer.context(h, rel_idx, split, length, first, rows, m, m_bias, vp)
            mems.append((m, m_bias, vp))
            caches.append(kv_cache)
        logits = torch.mm(self.ln(h[:, -1]), self.head_wt) + self.head_b  # predicts x_start
        # lists, stacked once at the end: an append is no operator call, a slice write is two
        out_tokens: list[torch.Tensor] = []
        out_logits: list[torch.Tensor] = []
        sample = gumbel is not None and temperature > 0.0
        for k in range(length):
            out_logits.append(logits)
            if sample and gumbel is not None:
                scaled = logits / temperature
                if top_p < 1.0:
                    scaled = nucleus(scaled, top_p)
                token = (scaled + gumbel[:, k]).argmax(-1)
            else:
                token = logits.argmax(-1)
            out_tokens.append(token)
            if k == length - 1:
                break
            p = split + k
            h = self.embed(token) + self.pos.weight[p]  # (B, D)
            for i, step_layer in enumerate(self.layers):
                m, m_bias, vp = mems[i]
                h = step_layer.step(h, p, caches[i], m, m_bias, vp)
            logits = torch.mm(self.ln(h), self.head_wt) + self.head_b
        return torch.stack(out_tokens, dim=1), torch.stack(out_logits, dim=1)
