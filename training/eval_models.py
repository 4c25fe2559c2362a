"""What training/evaluate.py needs of a model, the same calls for the CLSM and the paper's VAE:
the posterior mean, draws of the prior in the space that is interpolated linearly (CLSM: w of
p(w | xC, tau), mapped to z by f^-1; VAE: z of N(0, I)), and decoding with a chosen rule.

Decoding rules (`--decoding`): "argmax" (the paper's, Sec. 3.5), "temperature=T",
"top_p=P" (temperature 1) or "top_p=P,temperature=T". Sampling uses Gumbel noise drawn by
the caller, so the same noise can be shared along an interpolation or by a variation and its
parent: what then changes between them is z alone (as in the daemon).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from engine import export
from engine import tokens as tk
from engine.decoding import CachedDecoder
from engine.model import CLSM
from training.baselines import PaperVAE, load_model


@dataclass(frozen=True)
class Decoding:
    temperature: float = 0.0  # 0 = argmax
    top_p: float = 1.0

    @property
    def sampling(self) -> bool:
        return self.temperature > 0.0

    @classmethod
    def parse(cls, text: str) -> Decoding:
        if text.strip() == "argmax":
            return cls()
        values = {"temperature": 1.0, "top_p": 1.0}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in values:
                raise ValueError(f"decoding must be argmax, temperature=T, top_p=P or "
                                 f"top_p=P,temperature=T; got {text!r}")
            values[key.strip()] = float(value)
        if not (0.0 < values["temperature"] <= 10.0 and 0.0 < values["top_p"] <= 1.0):
            raise ValueError(f"temperature must be in (0, 10] and top_p in (0, 1]; got {text!r}")
        return cls(**values)

    def __str__(self) -> str:
        if not self.sampling:
            return "argmax"
        return (f"temperature={self.temperature:g}" if self.top_p == 1.0
                else f"top_p={self.top_p:g},temperature={self.temperature:g}")

    def noise(self, shape: tuple[int, ...], gen: torch.Generator,
              device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Gumbel noise (..., n_out) for sampling, on `device`; None for argmax. Drawn from the
        CPU generator gen: a seed gives the same noise on every device."""
        if not self.sampling:
            return None
        u = torch.rand((*shape, tk.N_SYMBOLS), generator=gen).clamp_(1e-9, 1 - 1e-7)
        return (-(-u.log()).log()).to(device)


ARGMAX = Decoding()


class ModelUnderTest:
    """A CLSM or a paper VAE, in eval mode, with the evaluation's common calls."""

    def __init__(self, model: nn.Module, name: str, path: str):
        self.model, self.name, self.path = model.eval(), name, path
        self.kind = "vae" if isinstance(model, PaperVAE) else "clsm"
        self.cached = CachedDecoder(model.decoder).eval() if isinstance(model, CLSM) else None
        self.d_z = model.cfg.d_z
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor, start: int, length: int) -> torch.Tensor:
        mean, _ = self.model.encoder(x, torch.full((x.size(0),), start, device=x.device), length)
        return mean

    @torch.no_grad()
    def prior(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation (B, dz) of the Gaussian that is interpolated in."""
        if isinstance(self.model, CLSM):
            mean, logvar = self.model.prior(x, torch.full((x.size(0),), start, device=x.device),
                                            length)
            return mean, (0.5 * logvar).exp()
        zeros = torch.zeros(x.size(0), self.d_z, device=x.device)
        return zeros, torch.ones_like(zeros)

    @torch.no_grad()
    def to_z(self, w: torch.Tensor) -> torch.Tensor:
        return self.model.prior.flow.inverse(w) if isinstance(self.model, CLSM) else w

    @torch.no_grad()
    def decode(self, x: torch.Tensor, z: torch.Tensor, start: int, length: int,
               decoding: Decoding = ARGMAX, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Target tokens (N, length) for z (N, dz); x (N or 1, 128)."""
        if x.size(0) == 1 and z.size(0) > 1 and self.cached is None:
            x = x.expand(z.size(0), -1)
        if self.cached is not None:
            return self.cached(x, z, start, length, decoding.temperature, noise, decoding.top_p)[0]
        return self.model.decode(x, z, start, length, decoding.temperature, noise, decoding.top_p)


def load_for_eval(path: str | Path, device: str | torch.device = "cpu") -> ModelUnderTest:
    """A training checkpoint (CLSM or VAE) or a shipped model folder (models/clsm-default),
    saved on any device, computed on `device`."""
    path = Path(path)
    if path.is_dir():
        manifest = path / export.MANIFEST
        if not manifest.is_file():
            raise SystemExit(f"{path} is a folder without {export.MANIFEST}: not a model folder")
        ckpt = torch.load(path / export.EAGER_FILE, map_location="cpu", weights_only=True)
        return ModelUnderTest(CLSM.from_checkpoint(ckpt).float().to(device), path.name, str(path))
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}")
    model, kind = load_model(path, device)
    if kind == "lm":
        raise SystemExit(f"{path} is an LM checkpoint; it goes to --lm")
    name = path.parent.name if path.name == "ckpt.pt" else path.stem
    return ModelUnderTest(model.float(), name, str(path))
