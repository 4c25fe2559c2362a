"""Train the CLSM (paper Sec. 3): python -m training.train --config configs/default.toml
--data cache/windows.npz --out runs/NAME [--max-steps N] [--minutes M] [--resume [CKPT]]

Data parallel on both cores (or several machines, see training/distributed.py):
    torchrun --standalone --nproc-per-node 2 -m training.train --threads 1 ...
[train] batch_size is per process, so 2 processes at 32 make the paper's batch of 64.
Device: --device / [train] device (auto | cpu | cuda, engine/device.py); on CUDA, mixed precision
(training/accel.py), pinned batches, one GPU per torchrun process, nccl; figures read back from
the device every [train] log_every steps only.

Per batch: |xT| uniform in {16, 32, 48, 64}, |xCL| uniform in {0, 16, ..., 128 - |xT|} per window,
a random valid transposition per window, loss (1/|xT|) Lrec + beta * KL with beta annealed
linearly from 0 (over [train] beta_anneal_steps; optionally with free bits: the KL term is
max(KL, free_bits) so the optimiser stops squeezing z below that many nats), Adam at the
paper's constant lr (optionally a linear cooldown: [train] lr_cooldown_*, see lr_at).
Optionally ([train] own_guesses, word_dropout, not in the paper) the decoder reads a share of its
own guesses, or of `p`, in place of the target tokens (scheduled sampling, word dropout;
CLSM.forward).
Checkpoints are one dict {model, optimizer, model_args, step, config, metrics, torch_rng} written
atomically and loadable with torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from daemon.config import DEFAULT_PATH, merge, read_toml
from engine import tokens as tk
from engine.device import DeviceError, add_device_argument, resolve_device, to_device
from engine.model import CLSM, CLSMConfig, count_parameters, gather_span
from training import distributed as ddp
from training.accel import Precision, RunningParts, log_interval
from training.windows import load_windows, random_transpositions

log = logging.getLogger("training.train")


def load_train_config(path: str | Path) -> dict:
    """configs/default.toml's [model] and [train] with the given file laid over them."""
    base = read_toml(DEFAULT_PATH)
    cfg = merge(base, read_toml(path)) if Path(path).resolve() != DEFAULT_PATH else base
    return {"model": cfg["model"], "train": cfg["train"]}


def sample_targets(rng: np.random.Generator, batch: int, target_bars: list[int]):
    """One target length per batch (so the Bi-LSTM sees equal lengths), a start per window."""
    length = tk.STEPS_PER_BAR * int(rng.choice(target_bars))
    n_starts = (tk.SEQ_LEN - length) // tk.STEPS_PER_BAR + 1
    start = tk.STEPS_PER_BAR * rng.integers(0, n_starts, size=batch)
    return torch.from_numpy(start).long(), length


def make_batch(windows: np.ndarray, rng: np.random.Generator, batch: int) -> torch.Tensor:
    idx = rng.integers(0, len(windows), size=batch)
    return torch.from_numpy(random_transpositions(windows[idx], rng).astype(np.int64))


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    config: dict, metrics: dict) -> None:
    """Atomic: write a temp file, then rename over the old checkpoint."""
    model = ddp.unwrap(model)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "model_args": model.model_args(), "step": step, "config": config, "metrics": metrics,
            "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint saved on any device, its tensors on map_location (the CPU by default: the
    model and optimiser move to the run's device after loading; torch_rng must stay a CPU
    tensor)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def run_device(args: argparse.Namespace, tcfg: dict) -> torch.device:
    """--device, else [train] device (auto when absent); under torchrun this process's GPU.
    A device this machine lacks ends the run with one line (SPEC section 5)."""
    given = getattr(args, "device", None)
    try:
        return resolve_device(given or tcfg.get("device", "auto"), local_rank=ddp.local_rank())
    except DeviceError as e:
        raise SystemExit(f"{'--device' if given else '[train] device'}: {e}") from None


@torch.no_grad()
def validate(model: torch.nn.Module, valid: np.ndarray, seed: int, n_batches: int, batch: int,
             target_bars: list[int], precision: Precision | None = None,
             free_batches: int = 0) -> dict:
    """Mean loss parts over fixed, seeded validation batches (untransposed windows), computed
    on the model's device. free_batches > 0 adds fr_acc: the argmax accuracy of decoding the
    targets freely from the posterior mean (training.evaluate's reconstruction), over the first
    free_batches of those batches. The teacher-forced acc alone hides what the decoder's own
    mistakes cost it (NOTES.md "Session 9")."""
    model = ddp.unwrap(model)
    model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    running, free = RunningParts(), RunningParts()
    for i in range(n_batches):
        idx = rng.integers(0, len(valid), size=batch)
        x = to_device(torch.from_numpy(valid[idx].astype(np.int64)), device)
        start, length = sample_targets(rng, batch, target_bars)
        start = to_device(start, device)
        with (precision or Precision(device.type)).autocast():
            _, parts = model(x, start, length, beta=1.0)
        running.add(parts)
        if i < free_batches:  # in float32, as training.evaluate decodes
            free.add({"fr_acc": free_running_accuracy(model, x, start, length)})
    model.train()
    return {**running.read(), **free.read()}


def free_running_accuracy(model: CLSM, x: torch.Tensor, start: torch.Tensor,
                          length: int) -> torch.Tensor:
    """Share of target tokens the argmax decode of the encoder's mean z gets right."""
    z, _ = model.encoder(x, start, length)
    truth = gather_span(x[:, :, None], start, length)[..., 0]
    return (model.decode_naive(x, z, start, length) == truth).float().mean()


class StopRequest:
    """SIGTERM / SIGINT end the run at the next step with a checkpoint, instead of losing the
    minutes since the last one (torchrun forwards the signal to every rank)."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopRequest:
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        log.info("signal %d: stopping after this step", signum)
        self.requested = True


def beta_at(step: int, tcfg: dict) -> float:
    return tcfg["beta_kl"] * min(1.0, step / max(1, tcfg["beta_anneal_steps"]))


def lr_at(step: int, tcfg: dict) -> float:
    """The paper's constant lr, or (lr_cooldown_steps > 0, not in the paper) a linear fall from
    lr at lr_cooldown_start to lr_final lr_cooldown_steps later, lr_final after that. A cooldown
    is a branch of a constant-lr run: the run itself goes on from its committed state."""
    steps = tcfg.get("lr_cooldown_steps", 0)
    if steps <= 0:
        return tcfg["lr"]
    done = min(1.0, max(0.0, (step - tcfg.get("lr_cooldown_start", 0)) / steps))
    return (1.0 - done) * tcfg["lr"] + done * tcfg.get("lr_final", tcfg["lr"])


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               start: torch.Tensor, length: int, *, beta: float, free_bits: float,
               precision: Precision, own_guesses: float = 0.0,
               word_dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
    """One optimiser step on the model's device; returns the loss and its parts as device
    tensors (nothing is read back here: on CUDA that would wait for the GPU every step).
    own_guesses or word_dropout > 0 (the CLSM's [train] keys) are passed on; models without
    them never see the keywords."""
    extra = {k: v for k, v in (("own_guesses", own_guesses), ("word_dropout", word_dropout))
             if v > 0}
    with precision.autocast():
        loss, parts = model(x, start, length, beta=beta, free_bits=free_bits, **extra)
    opt.zero_grad(set_to_none=True)
    precision.backward_step(loss, opt)
    return loss.detach(), parts


def training_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, train_w: np.ndarray,
                  valid_w: np.ndarray, rng: np.random.Generator, *, tcfg: dict, config: dict,
                  out: Path, step: int = 0, max_steps: int | None = None,
                  minutes: float | None = None, precision: Precision | None = None,
                  quiet: bool = False) -> tuple[int, dict]:
    """The paper's training loop for any model whose forward is (x, start, length, beta,
    free_bits) -> (loss, parts), on the model's device: target sampling, beta annealing,
    validation, periodic atomic checkpoints to out/ckpt.pt and a JSON line every
    log_interval steps in out/log.jsonl (the means since the last line; rank 0 only when
    distributed). Ranks agree on stopping (deadline, signal) at those steps too. Returns the
    step and the metrics."""
    device = next(model.parameters()).device
    precision = precision or Precision(device.type)
    every = log_interval(tcfg.get("log_every", 0), device)
    running = RunningParts()
    main = ddp.is_main()
    ckpt_path = out / "ckpt.pt"
    deadline = time.monotonic() + 60 * minutes if minutes else float("inf")
    last_ckpt = time.monotonic()
    metrics: dict = {}
    seen, t0 = 0, time.monotonic()
    world = ddp.world_size()
    bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True, disable=quiet or not main)
    logf = (out / "log.jsonl").open("a") if main else None
    try:
        with StopRequest() as stop:
            while not (max_steps is not None and step >= max_steps):
                if step % every == 0 and ddp.any_rank(stop.requested
                                                      or time.monotonic() >= deadline):
                    break
                x = to_device(make_batch(train_w, rng, tcfg["batch_size"]), device)
                start, length = sample_targets(rng, tcfg["batch_size"], tcfg["target_bars"])
                beta, lr = beta_at(step, tcfg), lr_at(step, tcfg)
                set_lr(opt, lr)
                loss, parts = train_step(model, opt, x, to_device(start, device), length, beta=beta,
                                         free_bits=tcfg.get("free_bits", 0.0), precision=precision,
                                         own_guesses=tcfg.get("own_guesses", 0.0),
                                         word_dropout=tcfg.get("word_dropout", 0.0))
                step += 1
                seen += len(x) * world
                rate = seen / (time.monotonic() - t0)
                if not main:
                    continue
                bar.update(1)
                running.add({"loss": loss, **parts})
                valid_now = step % tcfg["valid_every"] == 0
                if step % every and not valid_now:
                    continue
                means = running.read()  # the interval's one host-device sync
                bar.set_postfix(loss=f"{means.pop('loss'):.3f}", kl=f"{means.get('kl', 0.0):.2f}",
                                acc=f"{means['acc']:.3f}", win_s=f"{rate:.0f}")
                record = {"step": step, "t": round(time.monotonic() - t0, 3), "beta": beta,
                          "lr": lr, "windows_per_s": rate, "processes": world, **means}
                if valid_now:
                    record["valid"] = validate(model, valid_w, tcfg["seed"], tcfg["valid_batches"],
                                               tcfg["batch_size"], tcfg["target_bars"], precision,
                                               tcfg.get("valid_free_batches", 0))
                    metrics = {"step": step, "valid": record["valid"], "windows_per_s": rate}
                    log.info("step %d valid %s", step, record["valid"])
                logf.write(json.dumps(record) + "\n")
                if time.monotonic() - last_ckpt > 60 * tcfg["checkpoint_minutes"]:
                    logf.flush()
                    save_checkpoint(ckpt_path, model, opt, step, config, metrics)
                    last_ckpt = time.monotonic()
    finally:
        bar.close()
        if logf:
            logf.close()
    elapsed = time.monotonic() - t0
    metrics.update(windows=seen, seconds=elapsed, windows_per_s=seen / max(1e-9, elapsed),
                   processes=world, rank_weights=ddp.weight_fingerprints(model))
    return step, metrics


def resume_path(args: argparse.Namespace, out: Path) -> Path | None:
    """--resume alone: out/ckpt.pt if there is one; --resume CKPT: that file (e.g. the state
    committed under checkpoints/, to continue on a fresh clone)."""
    if args.resume is None:
        return None
    path = Path(args.resume) if args.resume else out / "ckpt.pt"
    if args.resume and not path.exists():
        raise SystemExit(f"--resume {path}: no such checkpoint")
    return path if path.exists() else None


def train(args: argparse.Namespace) -> Path:
    config = load_train_config(args.config)
    tcfg = config["train"]
    device = run_device(args, tcfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    torch.set_num_threads(args.threads or tcfg["threads"])
    with ddp.process_group(device):
        torch.manual_seed(tcfg["seed"])
        rng = np.random.default_rng([tcfg["seed"], ddp.rank()])

        train_w, valid_w = load_windows(args.data, "train"), load_windows(args.data, "valid")
        if len(train_w) == 0:
            raise SystemExit(f"{args.data} has no training windows; run training.prepare first")
        if len(valid_w) == 0:
            valid_w = train_w[:256]

        model = CLSM(CLSMConfig.from_dict(config["model"]))
        step = 0
        resume = resume_path(args, out)
        ckpt = load_checkpoint(resume) if resume else None
        if ckpt is not None:
            model = CLSM.from_checkpoint(ckpt)
            step = ckpt["step"]
            if "torch_rng" in ckpt:
                torch.set_rng_state(ckpt["torch_rng"])
            torch.manual_seed(int(torch.randint(2**31, (1,))) + ddp.rank())
            # A fresh but reproducible stream per (step, rank): resuming with another
            # process count is allowed, so the old streams cannot simply continue.
            rng = np.random.default_rng([tcfg["seed"], step, ddp.rank()])
            log.info("resumed from %s at step %d", resume, step)
        if tcfg.get("lr_cooldown_steps", 0) > 0 and step != tcfg.get("lr_cooldown_start", 0):
            # a branch starts at lr_cooldown_start; resuming elsewhere jumps into (or past) it
            log.warning("lr cooldown from step %d, but this run starts at step %d: lr %.3g "
                        "(set [train] lr_cooldown_start to the resumed step for a new branch)",
                        tcfg.get("lr_cooldown_start", 0), step, lr_at(step, tcfg))
        model = ddp.wrap(model.to(device))  # on its device before the optimiser sees it
        opt = torch.optim.Adam(model.parameters(), lr=tcfg["lr"], betas=tuple(tcfg["betas"]),
                               eps=tcfg["adam_eps"])
        if ckpt is not None:
            # onto the parameters' device; casts bf16 snapshot moments back to fp32
            opt.load_state_dict(ckpt["optimizer"])
            for group in opt.param_groups:  # the state brings its own eps: the config's wins
                group["eps"] = tcfg["adam_eps"]
        precision = Precision.choose(device, tcfg["bf16"] and not args.no_bf16)
        if ddp.is_main():
            log.info("CLSM with %d parameters; %d train / %d valid windows; %s; mixed precision "
                     "%s; %d process(es)", count_parameters(model), len(train_w), len(valid_w),
                     device, precision, ddp.world_size())

        step, metrics = training_loop(model, opt, train_w, valid_w, rng, tcfg=tcfg, config=config,
                                      out=out, step=step, max_steps=args.max_steps,
                                      minutes=args.minutes, precision=precision, quiet=args.quiet)
        if ddp.is_main():
            save_checkpoint(ckpt_path, model, opt, step, config, metrics)
            print(f"step {step}: {metrics['windows']} windows in {metrics['seconds']:.1f} s "
                  f"= {metrics['windows_per_s']:.1f} windows/s on {metrics['processes']} "
                  f"process(es); checkpoint {ckpt_path}")
        ddp.barrier()
    return ckpt_path


def run_arguments(description: str, default_threads: int | None) -> argparse.ArgumentParser:
    """The options every training entry point takes (CLSM here, the baselines too)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(DEFAULT_PATH))
    p.add_argument("--data", required=True, help=".npz written by training.prepare")
    p.add_argument("--out", required=True, help="run folder (checkpoint ckpt.pt, log.jsonl)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=default_threads)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_argument(p, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    p = run_arguments(__doc__.splitlines()[0], default_threads=None)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from out/ckpt.pt, or from CKPT (a committed snapshot)")
    p.add_argument("--no-bf16", action="store_true",
                   help="no mixed precision (float32 throughout, also on CUDA)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
