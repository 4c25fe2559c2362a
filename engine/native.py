"""The native decode loop and LSTM recurrence (engine/csrc/*.cpp) from Python.

Why: a decode step of the shipped model is ~80 PyTorch operator calls whose fixed cost (~110 us
a step) dwarfs the arithmetic; the C++ file does the whole decode of a target in one call
(issue 12, docs/engine-speed.md). It needs no PyTorch headers: the system C++ compiler builds
it in a few seconds (3-8 s measured here), once per machine and source version, into a cache directory
($CLSM_NATIVE_CACHE, else ~/.cache/clsm-coperformer); later processes only load it. Without a
compiler, or with CLSM_NATIVE=0, `library()` returns None and the engine keeps the TorchScript
parts, which always work.

The weights come from a model folder's `native_decoder.pt` and `native_prior.pt`
(engine/export.py writes them with `pack_decoder` / `pack_lstm`): plain float32 tensors in the
order the C++ code reads them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from engine import tokens as tk
from engine.fast import relative_table
from engine.model import Decoder

log = logging.getLogger("engine.runtime")

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("decoder.cpp", "lstm.cpp")
HEADERS = ("kernels.h",)
# -march=native: the library is built on the machine that runs it (the cache key holds the
# CPU's flags). No -ffast-math: sums keep their order, so tokens match PyTorch's.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC"]
FORMAT = 1  # of native_decoder.pt
REL_PAD = 16  # kPad in the C++ file: zeros after each relative-table row (whole-vector reads)
TOP_NAMES = ("embed", "pos", "latent_wt", "latent_b", "ln_w", "ln_b", "head_wt", "head_b")
LAYER_NAMES = ("ln1_w", "ln1_b", "qkv_wt", "qkv_b", "rel_t", "proj_wt", "proj_b", "ln2_w", "ln2_b",
               "cq_w", "cq_b", "ckv_wt", "ckv_b", "cp_wt", "cp_b", "ln3_w", "ln3_b", "ff1_wt",
               "ff1_b", "ff2_wt", "ff2_b")
CONFIG_KEYS = ("d_model", "n_heads", "d_ff", "n_layers", "n_pos", "n_out", "d_z", "l_z",
               "start_token")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("CLSM_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "clsm-coperformer"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process never loads a half-written file.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        subprocess.run([compiler, *FLAGS, "-o", str(lib), *(str(CSRC / f) for f in SOURCES)],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(lib, out)


def library() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None where it cannot be had."""
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("CLSM_NATIVE", "1") == "0":
            return None
        compiler = shutil.which("c++") or shutil.which("g++")
        try:
            sources = [(CSRC / f).read_bytes() for f in (*SOURCES, *HEADERS)]
            key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), str(compiler).encode(),
                                             _cpu_flags().encode(), platform.machine().encode()]))
            path = _cache_dir() / f"clsm_native-{key.hexdigest()[:16]}.so"
            if not path.is_file():
                if compiler is None:
                    log.warning("no C++ compiler: the engine decodes with TorchScript (slower)")
                    return None
                log.info("building the native decoder (once per machine): %s", path)
                _build(compiler, path)
            lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during every call
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            log.warning("native decoder unavailable (%s): the engine decodes with TorchScript",
                        str(detail).strip().splitlines()[-1][:200] if str(detail).strip() else e)
            return None
        p, i, f, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.clsm_decode.argtypes = [p, p, f, i64, i, p, i, i, i, f, p, f, i64, p]
        lib.clsm_decode.restype = i
        lib.clsm_lstm_layer.argtypes = [p, p, p, i, i, p, p]
        lib.clsm_lstm_layer.restype = i
        _library = lib
        return lib


def pack_decoder(decoder: Decoder) -> dict:
    """The decoder's weights as the C++ code reads them: x @ W^T products get W^T (in, out),
    queries pre-scaled by 1/sqrt(dh), relative embeddings expanded to every distance."""
    cfg = decoder.cfg
    d, n_pos = cfg.d_model, cfg.seq_len + 1
    scale = (d // cfg.n_heads) ** -0.5
    top = [decoder.embed.weight, decoder.pos.weight, decoder.latent.weight.t(), decoder.latent.bias,
           decoder.ln.weight, decoder.ln.bias, decoder.head.weight.t(), decoder.head.bias]
    layers = []
    for layer in decoder.layers:
        attn, cross = layer.self_attn, layer.cross_attn
        qkv_w, qkv_b = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
        qkv_w[:d] *= scale
        qkv_b[:d] *= scale
        ff1, ff2 = layer.ff.net[0], layer.ff.net[2]
        layers.append([layer.ln1.weight, layer.ln1.bias, qkv_w.t(), qkv_b,
                       relative_table(attn.rel, n_pos, attn.max_rel, False), attn.proj.weight.t(),
                       attn.proj.bias, layer.ln2.weight, layer.ln2.bias, cross.q.weight * scale,
                       cross.q.bias * scale, cross.kv.weight.t(), cross.kv.bias,
                       cross.proj.weight.t(), cross.proj.bias, layer.ln3.weight, layer.ln3.bias,
                       ff1.weight.t(), ff1.bias, ff2.weight.t(), ff2.bias])
    eps = {m.eps for layer in decoder.layers for m in (layer.ln1, layer.ln2, layer.ln3)}
    if len(eps | {decoder.ln.eps}) != 1:
        raise ValueError("the native decoder assumes one layer-norm eps")
    config = {"d_model": d, "n_heads": cfg.n_heads, "d_ff": cfg.d_ff, "n_layers": cfg.n_layers,
              "n_pos": n_pos, "n_out": cfg.n_out, "d_z": cfg.d_z, "l_z": cfg.l_z,
              "start_token": tk.START, "eps": float(decoder.ln.eps)}
    flat = {name: t for name, t in zip(TOP_NAMES, top, strict=True)}
    for i, ws in enumerate(layers):
        flat |= {f"{i}.{name}": t for name, t in zip(LAYER_NAMES, ws, strict=True)}
    tensors = {k: v.detach().float().contiguous().clone() for k, v in flat.items()}
    return {"format": FORMAT, "config": config, "tensors": tensors}


class NativeDecoder:
    """Callable like engine/fast.py's FastDecoder (same arguments and results)."""

    compiled_ahead = True  # no TorchScript profiling runs to warm up (Engine.warm_up)

    def __init__(self, lib: ctypes.CDLL, packed: dict):
        if packed.get("format") != FORMAT:
            raise ValueError(f"native decoder format {packed.get('format')!r}, expected {FORMAT}")
        cfg = packed["config"]
        self.lib, self.cfg = lib, cfg
        names = list(TOP_NAMES) + [f"{i}.{name}" for i in range(cfg["n_layers"])
                                   for name in LAYER_NAMES]
        self.weights = [packed["tensors"][name].float().contiguous() for name in names]
        self._check_shapes(names)
        self.weights = [torch.nn.functional.pad(t, (0, REL_PAD)) if name.endswith("rel_t") else t
                        for name, t in zip(names, self.weights, strict=True)]
        self._ptrs = (ctypes.c_void_p * len(names))(*[t.data_ptr() for t in self.weights])
        self._ints = (ctypes.c_int * len(CONFIG_KEYS))(*[int(cfg[k]) for k in CONFIG_KEYS])
        self.eps = float(cfg["eps"])

    def _check_shapes(self, names: list[str]) -> None:
        """A wrong file must raise here, not read past a buffer in C++."""
        c = self.cfg
        d, n, dz, lz, f = c["d_model"], c["n_pos"], c["d_z"], c["l_z"], c["d_ff"]
        want = {"pos": (n, d), "latent_wt": (dz, dz * lz), "latent_b": (dz * lz,), "ln_w": (d,),
                "ln_b": (d,), "head_wt": (d, c["n_out"]), "head_b": (c["n_out"],)}
        layer = {"qkv_wt": (d, 3 * d), "qkv_b": (3 * d,), "rel_t": (c["n_heads"], d // c["n_heads"],
                 2 * n - 1), "proj_wt": (d, d), "cq_w": (d, d), "ckv_wt": (dz, 2 * d),
                 "ckv_b": (2 * d,), "cp_wt": (d, d), "ff1_wt": (d, f), "ff1_b": (f,), "ff2_wt": (f, d)}
        for name, t in zip(names, self.weights, strict=True):
            shape = want.get(name, layer.get(name.split(".", 1)[-1]))
            if name == "embed":
                ok = t.dim() == 2 and t.size(1) == d and t.size(0) > c["start_token"]
            else:
                ok = shape is None and t.shape == (d,) or tuple(t.shape) == shape
            if not ok:
                raise ValueError(f"native decoder weight {name} has shape {tuple(t.shape)}")

    # the runtime treats parts like modules
    def eval(self) -> NativeDecoder:
        return self

    def float(self) -> NativeDecoder:
        return self

    def to(self, device: str | torch.device) -> NativeDecoder:
        if torch.device(device).type != "cpu":
            raise ValueError("the native decoder runs on the CPU only")
        return self

    def __call__(self, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
                 temperature: float = 0.0, gumbel: torch.Tensor | None = None,
                 top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        B = z.size(0)
        x = x.to(torch.int64).contiguous()
        z = z.float().contiguous()
        tokens = torch.empty((B, length), dtype=torch.int64)
        logits = torch.empty((B, length, self.cfg["n_out"]), dtype=torch.float32)
        g = None
        if gumbel is not None and temperature > 0.0:
            g = gumbel.float().expand(B, length, -1).contiguous()
        if x.dim() != 2 or x.size(1) != self.cfg["n_pos"] - 1 or x.size(0) not in (1, B):
            raise ValueError(f"x must be (1 or {B}, {self.cfg['n_pos'] - 1}), got {tuple(x.shape)}")
        if z.shape != (B, self.cfg["d_z"]):
            raise ValueError(f"z must be (B, {self.cfg['d_z']}), got {tuple(z.shape)}")
        rc = self.lib.clsm_decode(self._ptrs, self._ints, self.eps, x.data_ptr(), x.size(0),
                                  z.data_ptr(), B, int(start), int(length), float(temperature),
                                  g.data_ptr() if g is not None else None, float(top_p),
                                  tokens.data_ptr(), logits.data_ptr())
        if rc != 0:
            raise ValueError(f"native decode refused its arguments (code {rc}): start {start}, "
                             f"length {length}, batch {B}")
        return tokens, logits


def pack_lstm(lstm: torch.nn.LSTM) -> dict:
    """A bidirectional batch-first LSTM's weights for clsm_lstm_layer: per layer both
    directions' input weights side by side, transposed (d_in, 8H), their biases summed (8H),
    and each direction's recurrent weights transposed (H, 4H)."""
    if not (lstm.bidirectional and lstm.batch_first and lstm.bias) or lstm.proj_size:
        raise ValueError("pack_lstm expects a bidirectional, batch-first LSTM with biases")
    tensors = {}
    for i in range(lstm.num_layers):
        w = {d: getattr(lstm, f"weight_ih_l{i}{d}") for d in ("", "_reverse")}
        b = {d: getattr(lstm, f"bias_ih_l{i}{d}") + getattr(lstm, f"bias_hh_l{i}{d}")
             for d in ("", "_reverse")}
        tensors[f"{i}.wih_t"] = torch.cat([w[""], w["_reverse"]]).t()
        tensors[f"{i}.b"] = torch.cat([b[""], b["_reverse"]])
        tensors[f"{i}.whh_f"] = getattr(lstm, f"weight_hh_l{i}").t()
        tensors[f"{i}.whh_b"] = getattr(lstm, f"weight_hh_l{i}_reverse").t()
    tensors = {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}
    return {"format": FORMAT, "config": {"hidden": lstm.hidden_size, "layers": lstm.num_layers,
                                         "d_in": lstm.input_size}, "tensors": tensors}


class NativeLatent:
    """A scripted FastLatent whose Bi-LSTM recurrence runs in C++: callable like it (prior),
    with its flow_forward / flow_inverse."""

    def __init__(self, lib: ctypes.CDLL, latent: torch.jit.ScriptModule, packed: dict):
        if packed.get("format") != FORMAT:
            raise ValueError(f"native prior format {packed.get('format')!r}, expected {FORMAT}")
        cfg = packed["config"]
        self.lib, self.latent = lib, latent
        self.hidden, self.n_layers = int(cfg["hidden"]), int(cfg["layers"])
        H = self.hidden
        if H % 16 != 0:
            raise ValueError(f"the native LSTM needs a hidden size divisible by 16, not {H}")
        self.layers = []
        for i in range(self.n_layers):
            t = {k: packed["tensors"][f"{i}.{k}"].float().contiguous()
                 for k in ("wih_t", "b", "whh_f", "whh_b")}
            d_in = int(cfg["d_in"]) if i == 0 else 2 * H
            want = {"wih_t": (d_in, 8 * H), "b": (8 * H,), "whh_f": (H, 4 * H), "whh_b": (H, 4 * H)}
            for k, shape in want.items():
                if tuple(t[k].shape) != shape:
                    raise ValueError(f"native prior weight {i}.{k} has shape {tuple(t[k].shape)}")
            self.layers.append(t)
        self.flow_forward, self.flow_inverse = latent.flow_forward, latent.flow_inverse

    def eval(self) -> NativeLatent:
        return self

    def to(self, device: str | torch.device) -> NativeLatent:
        if torch.device(device).type != "cpu":
            raise ValueError("the native prior runs on the CPU only")
        return self

    def __call__(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.latent.trunk_rows(x, start, length)  # (B, T, D)
        T, H = h.size(1), self.hidden
        finals = torch.empty((h.size(0), 2 * H))
        for b in range(h.size(0)):
            inp = h[b]
            for i, t in enumerate(self.layers):
                gx = torch.addmm(t["b"], inp, t["wih_t"])  # every step's input projection at once
                out = torch.empty((T, 2 * H)) if i < self.n_layers - 1 else None
                rc = self.lib.clsm_lstm_layer(gx.data_ptr(), t["whh_f"].data_ptr(),
                                              t["whh_b"].data_ptr(), T, H,
                                              out.data_ptr() if out is not None else None,
                                              finals[b].data_ptr())
                if rc != 0:
                    raise ValueError(f"native LSTM refused its arguments (code {rc})")
                inp = out
        return self.latent.heads(finals)


def main() -> None:
    """`python -m engine.native`: build (or find) the library and say where it is."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lib = library()
    print(f"native decoder: {lib._name if lib is not None else 'unavailable'}")


if __name__ == "__main__":
    main()
