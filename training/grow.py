"""Widen a resumable CLSM state's Bi-LSTMs and mean / log-variance MLPs (the encoder's and the
prior's: d_lstm, d_mlp) without changing what it computes, so a run can go on at the paper's
sizes instead of starting again:

    python -m training.grow STATE OUT [--d-lstm 256] [--d-mlp 512] [--l-z 8]   # default: unchanged

The old units keep their weights and read nothing from the new ones (those weights are zero);
the new units start from the bigger model's own initialisation, and what they feed into the old
computation (the next LSTM layer's and the MLPs' columns for them, the last MLP layer's columns
for new hidden units) starts at zero. The widened model's mean and log-variance equal the old
ones, so its loss at the first step is the old loss; gradients reach every new weight at once
(the zero columns multiply nonzero activations). Adam's moments are carried over for the old
entries; a new entry starts with no momentum and the mean second moment of its tensor's old
entries, so its first steps are as large as its neighbours' and no larger.

--l-z (a multiple of the state's l_z) gives the decoder more latent vectors Z~ to attend to: the
new ones are copies of the old (rows of z -> Z~ repeated, Adam's moments too). Cross-attention
over k copies of each key and value gives the same output (each copy gets 1/k of the weight the
original had), so the function is kept; a tiny relative perturbation (1e-4) of the copies lets
them drift apart, as copies with equal gradients never would.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from pathlib import Path

import torch

from engine.model import CLSM, CLSMConfig

GATES = 4  # an LSTM's weight rows are the gates i, f, g, o, d_lstm rows each
LSTM_PARAM = re.compile(r"\.lstm\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)")
MLP_PARAM = re.compile(r"\.(mean|logvar)\.(0|2)\.(weight|bias)$")


def prefix(old: int, new: int) -> torch.Tensor:
    """Old units are the first ones: a mask over the new size."""
    mask = torch.zeros(new, dtype=torch.bool)
    mask[:old] = True
    return mask


def blocks(old: int, new: int, n_blocks: int) -> torch.Tensor:
    """n_blocks side-by-side groups (LSTM gates; forward / backward halves), each widened."""
    return prefix(old, new).repeat(n_blocks)


def old_entries(name: str, old: CLSMConfig, new: CLSMConfig) -> tuple[torch.Tensor, ...] | None:
    """Per dimension, which entries of the widened tensor hold the old ones; None: unchanged."""
    h_old, h_new, m_old, m_new = old.d_lstm, new.d_lstm, old.d_mlp, new.d_mlp
    if match := LSTM_PARAM.search(name):
        kind, layer = match.group(1), int(match.group(2))
        rows = blocks(h_old, h_new, GATES)
        if kind.startswith("bias"):
            return (rows,)
        if kind == "weight_hh":
            return rows, prefix(h_old, h_new)
        if layer == 0:  # reads the transformer's output, whose size does not change
            return rows, torch.ones(old.d_model, dtype=torch.bool)
        return rows, blocks(h_old, h_new, 2)  # reads [forward; backward] of the layer below
    if match := MLP_PARAM.search(name):
        layer, kind = match.group(2), match.group(3)
        if layer == "0":  # [h_l; h_r] -> hidden
            rows = prefix(m_old, m_new)
            return (rows,) if kind == "bias" else (rows, blocks(h_old, h_new, 2))
        if kind == "weight":  # hidden -> z
            return torch.ones(old.d_z, dtype=torch.bool), prefix(m_old, m_new)
    return None


def widen_tensor(old_value: torch.Tensor, fresh: torch.Tensor,
                 where: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """fresh with the old values in place and the old rows' columns for new inputs zeroed."""
    out = fresh.detach().clone()
    if len(where) == 1:
        out[where[0]] = old_value
        return out
    rows, cols = where
    old_rows = out[rows]
    old_rows[:, ~cols] = 0.0  # old units read nothing from new ones
    old_rows[:, cols] = old_value
    out[rows] = old_rows
    return out


def widen_moments(state: dict, where: tuple[torch.Tensor, ...], shape: torch.Size) -> dict:
    """Adam's state for a widened tensor: old entries carried, new ones with no momentum and the
    old entries' mean second moment."""
    out = dict(state)
    mask = torch.zeros(shape, dtype=torch.bool)
    if len(where) == 1:
        mask[where[0]] = True
    else:
        mask[where[0][:, None] & where[1][None, :]] = True
    for name, fill in (("exp_avg", None), ("exp_avg_sq", "mean")):
        old = state[name].float()
        value = old.mean() if fill == "mean" else torch.zeros(())
        new = torch.full(shape, float(value), dtype=torch.float32)
        new[mask] = old.reshape(-1)
        out[name] = new.to(state[name].dtype)
    return out


def grow(ckpt: dict, d_lstm: int, d_mlp: int, seed: int = 0) -> dict:
    """A resumable checkpoint with d_lstm / d_mlp widened (no narrower than they were)."""
    old_cfg = CLSMConfig.from_dict(ckpt["model_args"])
    if d_lstm < old_cfg.d_lstm or d_mlp < old_cfg.d_mlp:
        raise SystemExit(f"can only widen: the state has d_lstm {old_cfg.d_lstm}, d_mlp "
                         f"{old_cfg.d_mlp}; asked for {d_lstm}, {d_mlp}")
    new_cfg = dataclasses.replace(old_cfg, d_lstm=d_lstm, d_mlp=d_mlp)
    torch.manual_seed(seed)
    bigger = CLSM(new_cfg)
    fresh = bigger.state_dict()
    names = list(fresh)
    if list(ckpt["model"]) != names:
        raise SystemExit("the state's parameters are not a CLSM's of this code: cannot widen")
    model, opt_state = {}, {}
    param_names = [n for n, _ in bigger.named_parameters()]  # the optimiser's state indices
    for name in names:
        where = old_entries(name, old_cfg, new_cfg)
        old_value = ckpt["model"][name]
        model[name] = old_value if where is None else widen_tensor(old_value.float(), fresh[name], where)
    for index, state in ckpt["optimizer"]["state"].items():
        name = param_names[int(index)]
        where = old_entries(name, old_cfg, new_cfg)
        opt_state[index] = state if where is None else widen_moments(state, where, fresh[name].shape)
    config = copy.deepcopy(ckpt.get("config", {}))
    config.setdefault("model", {}).update(d_lstm=d_lstm, d_mlp=d_mlp)
    return {**ckpt, "model": model, "model_args": dataclasses.asdict(new_cfg), "config": config,
            "optimizer": {**ckpt["optimizer"], "state": opt_state},
            "grown_from": {"d_lstm": old_cfg.d_lstm, "d_mlp": old_cfg.d_mlp, "step": ckpt["step"]}}


LATENT = "decoder.latent."
COPY_NOISE = 1e-4


def repeat_latents(ckpt: dict, l_z: int, seed: int = 0) -> dict:
    """A resumable checkpoint whose decoder attends to l_z latent vectors (see the module doc)."""
    cfg = CLSMConfig.from_dict(ckpt["model_args"])
    if l_z % cfg.l_z:
        raise SystemExit(f"--l-z must be a multiple of the state's l_z ({cfg.l_z}), not {l_z}")
    k = l_z // cfg.l_z
    if k == 1:
        return ckpt
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in CLSM(cfg).named_parameters()]

    def repeated(value: torch.Tensor, perturb: bool) -> torch.Tensor:
        copies = [value] + [value + (COPY_NOISE * value.abs().mean() * torch.randn(
            value.shape, generator=gen) if perturb else 0.0) for _ in range(k - 1)]
        return torch.cat(copies, dim=0)  # rows: k * (l_z * d_z), vector-major like .view

    model = dict(ckpt["model"])
    opt_state = dict(ckpt["optimizer"]["state"])
    for name in (LATENT + "weight", LATENT + "bias"):
        model[name] = repeated(model[name].float(), perturb=True)
        index = names.index(name)
        if index in opt_state:
            state = opt_state[index]
            opt_state[index] = {**state, **{m: repeated(state[m], perturb=False)
                                            for m in ("exp_avg", "exp_avg_sq")}}
    new_cfg = dataclasses.replace(cfg, l_z=l_z)
    config = copy.deepcopy(ckpt.get("config", {}))
    config.setdefault("model", {}).update(l_z=l_z)
    return {**ckpt, "model": model, "model_args": dataclasses.asdict(new_cfg), "config": config,
            "optimizer": {**ckpt["optimizer"], "state": opt_state},
            "grown_from": {**ckpt.get("grown_from", {}), "l_z": cfg.l_z, "step": ckpt["step"]}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("state", help="a resumable checkpoint (runs/NAME/ckpt.pt, checkpoints/NAME.pt)")
    p.add_argument("out", help="where to write the widened checkpoint")
    p.add_argument("--d-lstm", type=int, default=None, help="Bi-LSTM size (default: the state's)")
    p.add_argument("--d-mlp", type=int, default=None, help="MLP size (default: the state's)")
    p.add_argument("--l-z", type=int, default=None, help="latent vectors (default: the state's)")
    args = p.parse_args(argv)
    if not Path(args.state).is_file():
        raise SystemExit(f"no checkpoint at {args.state}")
    ckpt = torch.load(args.state, map_location="cpu", weights_only=True)
    grown = grow(ckpt, args.d_lstm or ckpt["model_args"]["d_lstm"],
                 args.d_mlp or ckpt["model_args"]["d_mlp"])
    if args.l_z is not None:
        grown = repeat_latents(grown, args.l_z)
    torch.save(grown, args.out)
    old, new = ckpt["model_args"], grown["model_args"]
    print(f"{args.out}: " + ", ".join(f"{k} {old[k]} -> {new[k]}" for k in ("d_lstm", "d_mlp", "l_z"))
          + f", step {ckpt['step']}")


if __name__ == "__main__":
    main()
