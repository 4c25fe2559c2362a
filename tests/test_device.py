"""engine/device.py and the device-generic paths of the engine and training (issue 16).

This machine has no GPU: these tests run the code that a CUDA run goes through with the CPU
(and, for the training step, PyTorch's `meta` device: it computes no values, so any host
read-back or a tensor left on the CPU fails there as it would on CUDA). Nothing here shows that
CUDA itself works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from daemon.cli import build_parser, config_from_args
from daemon.config import ConfigError, load_config
from engine import device as dev
from engine import export
from engine import tokens as tk
from engine.model import CLSM
from engine.runtime import Engine, EngineError
from tests.test_evaluate import TINY_CLSM, TINY_LM, TINY_VAE, write_cache
from tests.test_export import export_tiny
from tests.test_train import tiny_config, tiny_run
from training import accel, baselines, train
from training import distributed as ddp
from training.baselines import PaperVAE, TransformerLM
from training.eval_models import Decoding, load_for_eval

ROOT = Path(__file__).resolve().parents[1]
HERE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what auto must give
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Stand in a machine with two GPUs for resolve_device (nothing is computed on them)."""
    monkeypatch.setattr(dev, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ----------------------------------------------------------------------------- resolve_device


def test_auto_resolves_to_cuda_only_where_it_is_available(monkeypatch):
    assert dev.resolve_device("auto") == HERE
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(dev, "cuda_available", lambda: True)
    assert dev.resolve_device("auto").type == "cuda"
    assert dev.resolve_device(" CPU ") == torch.device("cpu")


def test_one_gpu_per_process_from_local_rank(fake_gpus):
    assert dev.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert dev.resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device("cpu", local_rank=1) == torch.device("cpu")  # gloo ranks share it
    with pytest.raises(dev.DeviceError, match="nproc-per-node 2"):
        dev.resolve_device("cuda", local_rank=2)


@pytest.mark.parametrize("name", ["gpu", "cpu:1", "", "cuda:x", "mps"])
def test_unknown_devices_are_refused_in_one_line(name):
    with pytest.raises(dev.DeviceError) as e:
        dev.resolve_device(name)
    assert "\n" not in str(e.value) and "auto, cpu or cuda" in str(e.value)


def test_cuda_without_cuda_says_what_to_do(monkeypatch):
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(dev.DeviceError) as e:
            dev.resolve_device(name)
        assert "\n" not in str(e.value) and "--device cpu" in str(e.value)


@no_cuda
@pytest.mark.parametrize("module,extra", [
    ("training.train", ["--data", "{data}", "--out", "{run}", "--config", "{config}"]),
    ("training.baselines", ["--kind", "lm", "--data", "{data}", "--out", "{run}"]),
    ("training.evaluate", ["--checkpoint", "none.pt", "--data", "{data}"]),
    ("engine.bench", ["--no-cpu-config"]),
])
def test_entry_points_end_with_one_line_not_a_traceback(tmp_path, module, extra):
    paths = {"data": write_cache(tmp_path / "w.npz"), "run": tmp_path / "run",
             "config": tiny_config(tmp_path / "t.toml")}
    argv = [a.format(**paths) for a in extra]
    done = subprocess.run([sys.executable, "-m", module, *argv, "--device", "cuda"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "CUDA is not available" in lines[-1] and "--device" in lines[-1]
    assert not (tmp_path / "run").exists()  # refused before anything was written


@no_cuda
def test_engine_load_turns_a_missing_gpu_into_an_engine_error(tmp_path):
    export_tiny(tmp_path / "m")
    with pytest.raises(EngineError, match="CUDA is not available"):
        Engine.load(tmp_path / "m", device="cuda", warm=False)
    with pytest.raises(EngineError, match="unknown device"):
        Engine.load(tmp_path / "m", device="gpu", warm=False)


def test_daemon_option_and_config_key(tmp_path):
    args = build_parser().parse_args(["--device", "auto"])
    assert config_from_args(args)["engine"]["device"] == "auto"
    assert config_from_args(build_parser().parse_args([]))["engine"]["device"] == "cpu"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--device", "gpu"])
    user = tmp_path / "user.toml"
    user.write_text('[engine]\ndevice = "gpu"\n')
    with pytest.raises(ConfigError, match="engine.device"):
        load_config(user)


# ----------------------------------------------------------------------------- engine


def test_engine_parts_inputs_and_caches_live_on_the_configured_device(tmp_path):
    export_tiny(tmp_path / "m")
    for backend in ("torchscript", "fast", "eager"):
        engine = Engine.load(tmp_path / "m", backend=backend, device="auto", max_batch=2)
        assert engine.device == HERE and engine.info()["device"] == str(HERE)
        x, start, length = engine._request([tk.REST] * tk.SEQ_LEN, 3, 4)
        assert x.device == HERE
        g = engine.infill([tk.REST] * tk.SEQ_LEN, 3, 4, seed=1)
        assert len(g.tokens) == length and g.z.dtype.name == "float32"  # back on the host
        mean, logvar = next(iter(engine._priors.values()))  # the prior cache
        assert mean.device == HERE and logvar.device == HERE
        assert engine._noise(x, start, length, 2).device == HERE
        if backend != "fast":  # fast: the C++ decoder on the CPU, frozen TorchScript on CUDA
            weights = list(engine.decoder.parameters()) + list(engine.decoder.buffers())
            assert weights and all(w.device == HERE for w in weights)


def test_exported_parts_hold_nothing_that_pins_them_to_the_cpu(tmp_path):
    """The TorchScript parts are exported on the CPU and loaded with map_location on another
    device: that moves their (frozen) tensors, but not a "cpu" device literal in the graph nor
    a CPU-only op (mkldnn, prepacked) that an export-time optimisation might insert."""
    manifest = export_tiny(tmp_path / "m")
    scripted = {k: v for k, v in manifest["parts"].items()
                if k not in ("eager",) and not k.startswith("native")}
    assert {"latent", "decoder", "fast_latent", "fast_decoder"} <= set(scripted)
    for name in scripted.values():
        module = export.load_scripted(tmp_path / "m" / name, str(dev.resolve_device("auto")))
        graphs = [str(getattr(module, m).graph) for m in
                  ("forward", "flow_forward", "flow_inverse", "trunk_rows", "heads")
                  if hasattr(module, m)]
        text = "\n".join(graphs)
        assert graphs and 'prim::Constant[value="cpu"]' not in text, name
        assert "mkldnn" not in text and "prepacked::" not in text, name


def test_a_seed_draws_the_same_latent_whatever_the_device_setting(tmp_path):
    """Seeded draws come from CPU generators (engine/device.py), so 'auto' and 'cpu' agree."""
    export_tiny(tmp_path / "m")
    tokens = [int(t) for t in torch.randint(0, tk.N_SYMBOLS, (tk.SEQ_LEN,),
                                            generator=torch.Generator().manual_seed(0))]
    a = Engine.load(tmp_path / "m", device="auto").infill(tokens, 2, 3, seed=9)
    b = Engine.load(tmp_path / "m", device="cpu").infill(tokens, 2, 3, seed=9)
    assert torch.allclose(torch.from_numpy(a.z), torch.from_numpy(b.z), atol=1e-4)
    gen = torch.Generator().manual_seed(3)
    draw = dev.randn((4,), gen, torch.device("meta"))
    assert draw.device.type == "meta" and draw.dtype == torch.float32


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["clsm", "vae", "lm"])
def test_training_step_runs_on_the_device_without_reading_back(kind):
    """On `meta` every tensor must be on the device and nothing may be read back (.item(),
    float(), .tolist() raise there): the step CUDA runs, minus the arithmetic."""
    torch.manual_seed(0)
    model = {"clsm": lambda: CLSM(TINY_CLSM), "vae": lambda: PaperVAE(TINY_VAE),
             "lm": lambda: TransformerLM(TINY_LM)}[kind]().to("meta")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("meta")
    x = dev.to_device(torch.randint(0, tk.N_SYMBOLS, (4, tk.SEQ_LEN)), device)
    start = dev.to_device(torch.tensor([0, 16, 32, 64]), device)
    running = accel.RunningParts()
    for _ in range(2):
        loss, parts = train.train_step(model, opt, x, start, 32, beta=0.1, free_bits=0.0,
                                       precision=accel.Precision.choose(device, True))
        running.add({"loss": loss, **parts})
    assert loss.device == device and not loss.requires_grad
    assert parts and all(v.device == device and v.dim() == 0 for v in parts.values())
    assert all(v.device == device for v in running.sums.values()) and running.count == 2
    assert all(s["step"].device.type in ("cpu", "meta") for s in opt.state.values())
    with pytest.raises(Exception, match="meta"):  # the read-back is where the sync happens
        running.read()


def test_a_float16_step_through_the_grad_scaler_updates_the_weights():
    """The fp16 + GradScaler branch (GPUs without bf16), run on the CPU's autocast."""
    torch.manual_seed(0)
    model = TransformerLM(TINY_LM)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    precision = accel.Precision("cpu", torch.float16, torch.amp.GradScaler("cpu"))
    x = torch.randint(0, tk.N_SYMBOLS, (4, tk.SEQ_LEN))
    loss, _ = train.train_step(model, opt, x, torch.zeros(4, dtype=torch.long), 16, beta=0.0,
                               free_bits=0.0, precision=precision)
    assert torch.isfinite(loss)
    assert precision.scaler.get_scale() > 0
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


def test_precision_by_device(monkeypatch):
    cuda = torch.device("cuda")
    assert accel.Precision.choose(torch.device("cpu"), False).dtype is None
    assert accel.Precision.choose(cuda, False).dtype is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = accel.Precision.choose(cuda, True)
    assert (p.device_type, p.dtype, p.scaler) == ("cuda", torch.bfloat16, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with warnings.catch_warnings():  # GradScaler("cuda") without CUDA warns and disables itself
        warnings.simplefilter("ignore", UserWarning)
        p = accel.Precision.choose(cuda, True)
    assert p.dtype == torch.float16 and isinstance(p.scaler, torch.amp.GradScaler)
    assert "fp16" in str(p) and "grad scaler" in str(p)


def test_log_interval_and_process_group_backend(monkeypatch):
    assert accel.log_interval(0, torch.device("cpu")) == 1
    assert accel.log_interval(0, torch.device("cuda")) == 50
    assert accel.log_interval(7, torch.device("cuda")) == 7
    assert ddp.backend_for(torch.device("cuda", 1)) == "nccl"
    assert ddp.backend_for(torch.device("cpu")) == "gloo"
    assert ddp.comm_device() == torch.device("cpu")  # no process group
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.local_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.local_rank() == 1


def test_reads_back_once_a_logging_interval(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    config.write_text(config.read_text().replace("valid_every = 2", "valid_every = 100\n"
                                                 "log_every = 3"))
    out = tmp_path / "run"
    train.main(["--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
                "--threads", "1", "--max-steps", "7", "--device", "auto"])
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6]  # step 7 is not an interval's end
    for r in lines:  # the means over the interval, read back as numbers
        assert all(isinstance(r[k], float) for k in ("rec", "kl", "acc"))
        assert 0.0 <= r["acc"] <= 1.0 and r["rec"] > 0.0
    assert train.load_checkpoint(out / "ckpt.pt")["step"] == 7


def test_checkpoint_loads_onto_another_device_and_resumes_there(tmp_path):
    argv, out = tiny_run(tmp_path)
    train.main([*argv, "--max-steps", "2", "--device", "cpu"])
    target = dev.resolve_device("auto")
    ckpt = train.load_checkpoint(out / "ckpt.pt", map_location=target)
    assert all(t.device == target for t in ckpt["model"].values())
    assert all(t.device == target for s in ckpt["optimizer"]["state"].values()
               for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    model = CLSM.from_checkpoint(ckpt).to(target)
    assert next(model.parameters()).device == target
    on_meta = train.load_checkpoint(out / "ckpt.pt", map_location="meta")  # any device at all
    assert {t.device.type for t in on_meta["model"].values()} == {"meta"}

    train.main([*argv, "--max-steps", "4", "--resume", "--device", "auto"])
    resumed = train.load_checkpoint(out / "ckpt.pt")
    assert resumed["step"] == 4
    assert any(not torch.equal(resumed["model"][k], ckpt["model"][k].cpu()) for k in ckpt["model"])


def test_baselines_and_evaluation_load_onto_the_resolved_device(tmp_path, capsys):
    data = write_cache(tmp_path / "w.npz")
    baselines.main(["--kind", "vae", "--data", str(data), "--out", str(tmp_path / "vae"),
                    "--config", str(tiny_config(tmp_path / "t.toml")), "--max-steps", "2",
                    "--quiet", "--device", "auto"])
    target = dev.resolve_device("auto")
    model, kind = baselines.load_model(tmp_path / "vae" / "ckpt.pt", target)
    assert kind == "vae" and all(p.device == target for p in model.parameters())
    m = load_for_eval(tmp_path / "vae" / "ckpt.pt", target)
    assert m.device == target
    x = torch.randint(0, tk.N_SYMBOLS, (2, tk.SEQ_LEN), device=target)
    mean, sd = m.prior(x, 32, 16)
    assert mean.device == target and sd.device == target
    noise = Decoding.parse("temperature=1").noise((2, 16), torch.Generator().manual_seed(0),
                                                  torch.device("meta"))
    assert noise.device.type == "meta" and noise.shape == (2, 16, tk.N_SYMBOLS)

    from training import evaluate
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(tmp_path / "vae" / "ckpt.pt"), "--data", str(data),
                   "--n", "2", "--batch", "2", "--json", "--device", "auto"])
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["device"] == str(target)
    figures = result["models"]["vae"]["results"]
    assert all(0.0 <= case["recon_acc"] <= 1.0 for sets in figures.values()
               for case in sets.values())


@no_cuda
def test_the_config_key_is_the_default_and_the_option_overrides_it(tmp_path):
    config = tiny_config(tmp_path / "tiny.toml")
    config.write_text(config.read_text() + 'device = "cuda"\n')  # into [train]
    argv = ["--config", str(config), "--data", str(write_cache(tmp_path / "w.npz")), "--out",
            str(tmp_path / "run"), "--quiet", "--threads", "1", "--max-steps", "1"]
    with pytest.raises(SystemExit, match=r"^\[train\] device: .*CUDA is not available"):
        train.main(argv)
    train.main([*argv, "--device", "cpu"])
    assert train.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 1


def test_torchrun_on_cuda_joins_with_nccl_on_this_process_gpu(monkeypatch):
    """What process_group does under torchrun with a CUDA device (the calls, not a real GPU)."""
    calls: list = []
    state = {"up": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: state["up"])

    def init(backend, **kw):
        calls.append(("init", backend))
        state["up"] = True

    monkeypatch.setattr(ddp.dist, "init_process_group", init)
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    with ddp.process_group(torch.device("cuda", 1)):
        pass
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl"), ("destroy",)]
    calls.clear()
    state["up"] = False
    with ddp.process_group(torch.device("cpu")):
        pass
    assert calls == [("init", "gloo"), ("destroy",)]
