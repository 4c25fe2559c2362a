"""Export a CLSM checkpoint as a model folder the runtime loads (SPEC section 6).

    python -m engine.export --checkpoint runs/clsm/ckpt.pt --out models/clsm-default [--fp16]
    python -m engine.export --random --config configs/default.toml --out /tmp/clsm-random

A model folder holds
  latent.pt      TorchScript LatentPart: prior trunk -> (mean, logvar), flow forward / inverse
  decoder.pt     TorchScript CachedDecoder: context pass + the whole cached decode loop in one
                 scripted call (no Python per step)
  fast_latent.pt, fast_decoder.pt, fast_latent_bf16.pt
                 TorchScript FastLatent / FastDecoder (engine/fast.py) for the `fast` backend,
                 the prior's Bi-LSTM in bfloat16 in the last one (`fast-bf16`, reduced precision)
  native_decoder.pt, native_prior.pt
                 float32 weights arranged for engine/native.py's C++ decode and Bi-LSTM
                 recurrence (plain tensors): `fast` uses them where the library builds (the
                 prior with fast_latent.pt's trunk), the TorchScript parts otherwise
  eager.pt       the plain state dict {model, model_args} for the `eager` backend
  manifest.json  format version, vocabulary, model_args, source checkpoint sha256, torch
                 version, every file with its sha256

All TorchScript code of the project lives in this module, so a move to torch.export touches
this file only (ENGINEERING.md trap 7).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from engine import tokens as tk
from engine.decoding import CachedDecoder, LatentPart
from engine.fast import FastDecoder, FastLatent
from engine.model import CLSM, CLSMConfig, count_parameters
from engine.native import pack_decoder, pack_lstm

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATENT_FILE = "latent.pt"
DECODER_FILE = "decoder.pt"
EAGER_FILE = "eager.pt"
FAST_LATENT_FILE = "fast_latent.pt"
FAST_LATENT_BF16_FILE = "fast_latent_bf16.pt"
FAST_DECODER_FILE = "fast_decoder.pt"
NATIVE_DECODER_FILE = "native_decoder.pt"
NATIVE_PRIOR_FILE = "native_prior.pt"


def vocabulary() -> dict:
    """The token encoding a model was trained with; the runtime refuses any other."""
    return {"size": tk.VOCAB_SIZE, "n_symbols": tk.N_SYMBOLS, "pitch_min": tk.PITCH_MIN,
            "pitch_max": tk.PITCH_MAX, "rest": tk.REST, "hold": tk.HOLD, "start": tk.START,
            "pos": tk.POS, "pad": tk.PAD, "seq_len": tk.SEQ_LEN,
            "steps_per_bar": tk.STEPS_PER_BAR}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_parts(model: CLSM) -> tuple[LatentPart, CachedDecoder]:
    """The inference parts (eager modules) of a CLSM, in eval mode."""
    model = model.eval()
    return LatentPart(model.prior).eval(), CachedDecoder(model.decoder).eval()


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch.jit.* warn that TorchScript is deprecated on every call: known (this module is
    the one place to change for torch.export), so keep logs clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield


def script_parts(latent: LatentPart,
                 decoder: CachedDecoder) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    with _quiet_jit():
        s_latent, s_decoder = torch.jit.script(latent), torch.jit.script(decoder)
        # Freezing inlines the weights and lets TorchScript fold and fuse the small ops of a
        # step: about 15-20% off a decode on one CPU thread, same tokens.
        methods = ["flow_forward", "flow_inverse"]
        s_latent = torch.jit.optimize_for_inference(
            torch.jit.freeze(s_latent, preserved_attrs=methods), other_methods=methods)
        s_decoder = torch.jit.optimize_for_inference(torch.jit.freeze(s_decoder))
        return s_latent, s_decoder


def build_fast_parts(model: CLSM, lstm_bf16: bool = False) -> tuple[FastLatent, FastDecoder]:
    """The fast inference parts (eager modules) of a CLSM, in eval mode."""
    model = model.eval()
    return FastLatent(model.prior, lstm_bf16).eval(), FastDecoder(model.decoder).eval()


def script_fast_parts(latent: FastLatent, decoder: FastDecoder,
                      optimize: bool = False) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """The fast parts, frozen. Not optimize_for_inference by default: it rewrites every
    linear as a matmul and an add, two calls per linear in a decode step where one does."""
    with _quiet_jit():
        methods = ["flow_forward", "flow_inverse", "trunk_rows", "heads"]
        s_latent = torch.jit.freeze(torch.jit.script(latent), preserved_attrs=methods)
        s_decoder = torch.jit.freeze(torch.jit.script(decoder))
        if optimize:
            s_latent = torch.jit.optimize_for_inference(s_latent, other_methods=methods)
            s_decoder = torch.jit.optimize_for_inference(s_decoder)
        return s_latent, s_decoder


def load_scripted(path: Path, device: str = "cpu") -> torch.jit.ScriptModule:
    """Load one TorchScript part; raises RuntimeError / OSError if it is unreadable."""
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def export(model: CLSM, out: Path, *, source: dict, fp16: bool = False) -> dict:
    """Write the model folder `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    latent, decoder = script_parts(*build_parts(model))
    fast_latent, fast_decoder = script_fast_parts(*build_fast_parts(model))
    fast_latent_bf16, _ = script_fast_parts(*build_fast_parts(model, lstm_bf16=True))
    state = model.state_dict()
    if fp16:  # the eager weights at half size; the frozen TorchScript parts stay float32
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with _quiet_jit():
        torch.jit.save(latent, str(out / LATENT_FILE))
        torch.jit.save(decoder, str(out / DECODER_FILE))
        torch.jit.save(fast_latent, str(out / FAST_LATENT_FILE))
        torch.jit.save(fast_latent_bf16, str(out / FAST_LATENT_BF16_FILE))
        torch.jit.save(fast_decoder, str(out / FAST_DECODER_FILE))
    torch.save({"model": state, "model_args": model.model_args()}, out / EAGER_FILE)
    torch.save(pack_decoder(model.decoder), out / NATIVE_DECODER_FILE)  # float32 also with --fp16
    torch.save(pack_lstm(model.prior.trunk.lstm), out / NATIVE_PRIOR_FILE)
    names = (LATENT_FILE, DECODER_FILE, FAST_LATENT_FILE, FAST_LATENT_BF16_FILE, FAST_DECODER_FILE,
             NATIVE_DECODER_FILE, NATIVE_PRIOR_FILE, EAGER_FILE)
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
             for name in names}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": out.name,
        "vocab": vocabulary(),
        "model_args": model.model_args(),
        "params": {"total": count_parameters(model),
                   "inference": count_parameters(model.prior) + count_parameters(model.decoder)},
        "dtype": "float16" if fp16 else "float32",
        "source": source,
        "torch_version": torch.__version__,
        "parts": {"latent": LATENT_FILE, "decoder": DECODER_FILE, "eager": EAGER_FILE,
                  "fast_latent": FAST_LATENT_FILE, "fast_latent_bf16": FAST_LATENT_BF16_FILE,
                  "fast_decoder": FAST_DECODER_FILE, "native_decoder": NATIVE_DECODER_FILE,
                  "native_prior": NATIVE_PRIOR_FILE},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s (%d files, %.1f MB)", out, len(files),
             sum(f["bytes"] for f in files.values()) / 1e6)
    return manifest


def model_from_checkpoint(path: Path) -> tuple[CLSM, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = CLSM.from_checkpoint(ckpt)
    source = {"kind": "checkpoint", "path": str(path), "sha256": sha256_file(path),
              "step": ckpt.get("step")}
    return model, source


def random_model(config: Path | None, seed: int = 0) -> tuple[CLSM, dict]:
    """A model with random weights of the config's [model] sizes (benchmarks, tests)."""
    args: dict = {}
    if config is not None:
        with open(config, "rb") as f:
            args = tomllib.load(f).get("model", {})
    torch.manual_seed(seed)
    model = CLSM(CLSMConfig.from_dict(args))
    source = {"kind": "random", "seed": seed, "config": str(config) if config else None}
    return model, source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", type=Path, help="training checkpoint (runs/clsm/ckpt.pt)")
    group.add_argument("--random", action="store_true", help="random weights (benchmarks)")
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"),
                        help="sizes for --random ([model] section)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--fp16", action="store_true", help="store the eager weights as float16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            parser.error(f"no checkpoint at {args.checkpoint}")
        model, source = model_from_checkpoint(args.checkpoint)
    else:
        model, source = random_model(args.config, args.seed)
    manifest = export(model, args.out, source=source, fp16=args.fp16)
    print(f"wrote {args.out} ({manifest['params']['inference']:,} inference parameters)")


if __name__ == "__main__":
    main()
