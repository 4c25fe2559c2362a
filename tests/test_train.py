"""training.train end to end on a tiny config: runs, checkpoints, resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import tokens as tk
from tests.test_evaluate import write_cache
from training import snapshot, train


def tiny_config(path):
    path.write_text("""
[model]
d_model = 32
d_ff = 64
n_heads = 4
d_lstm = 32
d_mlp = 64
d_z = 16
d_flow = 32
[train]
batch_size = 8
valid_every = 2
beta_anneal_steps = 4
bf16 = false
""")
    return path


def tiny_run(tmp_path: Path) -> tuple[list[str], Path]:
    """training.train arguments for the tiny config on a small cache, and the run folder."""
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    out = tmp_path / "run"
    return ["--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
            "--threads", "1"], out


def test_train_checkpoints_and_resumes(tmp_path):
    argv, out = tiny_run(tmp_path)
    train.main([*argv, "--max-steps", "3"])
    ckpt = train.load_checkpoint(out / "ckpt.pt")  # weights_only=True
    assert ckpt["step"] == 3 and ckpt["model_args"]["d_z"] == 16
    assert ckpt["metrics"]["valid"]["acc"] >= 0.0

    train.main([*argv, "--max-steps", "5", "--resume"])
    resumed = train.load_checkpoint(out / "ckpt.pt")
    assert resumed["step"] == 5
    assert any(not torch.equal(resumed["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    betas = [r["beta"] for r in lines]
    assert betas[0] == 0.0 and betas == sorted(betas)  # annealed up from 0


def run_torchrun(argv: list[str], nproc: int) -> None:
    """The README's command: torchrun --standalone --nproc-per-node N -m training.train ..."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "training.train", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_two_processes_same_weights_one_checkpoint(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    out = tmp_path / "run"
    run_torchrun(["--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
                  "--threads", "1", "--max-steps", "4"], nproc=2)
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"]  # rank 0 alone writes
    ckpt = train.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 4 and ckpt["metrics"]["processes"] == 2
    fingerprints = ckpt["metrics"]["rank_weights"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # one log, not one per rank


def test_resume_from_committed_snapshot_continues_step_and_loss(tmp_path):
    """Train, shrink to the committed form (bf16 Adam moments), resume on a 'fresh clone'
    (another out folder, another process count): the step count goes on and the loss does not
    restart from the untrained model's."""
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    config.write_text(config.read_text() + "lr = 3e-3\n")
    first = tmp_path / "first"
    base = ["--config", str(config), "--data", str(data), "--quiet", "--threads", "1"]
    train.main([*base, "--out", str(first), "--max-steps", "40"])
    snap = tmp_path / "checkpoints" / "clsm.pt"
    snapshot.write_snapshot(first / "ckpt.pt", snap)
    state = train.load_checkpoint(snap)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)

    fresh = tmp_path / "fresh"
    run_torchrun([*base, "--out", str(fresh), "--max-steps", "44", "--resume", str(snap)], nproc=2)
    resumed = [json.loads(line) for line in (fresh / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [41, 42, 43, 44]
    before = [json.loads(line) for line in (first / "log.jsonl").read_text().splitlines()]
    start_loss = sum(r["rec"] for r in before[:4]) / 4
    end_loss = sum(r["rec"] for r in before[-4:]) / 4
    resumed_loss = sum(r["rec"] for r in resumed) / 4
    assert end_loss < start_loss - 0.1  # the tiny model did learn something in 40 steps
    assert abs(resumed_loss - end_loss) < abs(resumed_loss - start_loss)


def test_resume_names_a_missing_snapshot(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    with pytest.raises(SystemExit, match="no such checkpoint"):
        train.main(["--config", str(tiny_config(tmp_path / "t.toml")), "--data", str(data),
                    "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "missing.pt")])


def test_lr_is_the_papers_constant_unless_a_cooldown_is_set():
    constant = {"lr": 5e-4}
    assert {train.lr_at(s, constant) for s in (0, 10_000, 10**6)} == {5e-4}
    cool = {"lr": 5e-4, "lr_final": 1e-4, "lr_cooldown_start": 100, "lr_cooldown_steps": 40}
    assert train.lr_at(0, cool) == train.lr_at(100, cool) == 5e-4
    assert train.lr_at(120, cool) == pytest.approx(3e-4)
    assert train.lr_at(140, cool) == train.lr_at(10**6, cool) == pytest.approx(1e-4)


def test_a_cooldown_branch_resumes_a_constant_run_and_lowers_its_lr(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--quiet", "--threads", "1"]
    train.main(["--config", str(config), *argv, "--max-steps", "3"])
    cooldown = tmp_path / "cooldown.toml"
    cooldown.write_text(config.read_text() + "lr_cooldown_start = 3\nlr_cooldown_steps = 2\n"
                        "lr_final = 1e-5\n")
    train.main(["--config", str(cooldown), *argv, "--max-steps", "6", "--resume"])
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in lines]
    assert lrs[:4] == [5e-4] * 4  # steps 1-3 constant; the branch's first step is at its start
    assert lrs[4:] == pytest.approx([(5e-4 + 1e-5) / 2, 1e-5])
    saved = train.load_checkpoint(out / "ckpt.pt")
    assert saved["step"] == 6
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)


def test_the_cooldown_branch_config_is_the_cpu_config_plus_a_cooldown():
    root = Path(__file__).resolve().parents[1]
    cpu = train.load_train_config(root / "configs/cpu.toml")
    cool = train.load_train_config(root / "configs/sweep/cooldown.toml")
    assert cool["model"] == cpu["model"]
    keys = {"lr_cooldown_steps", "lr_cooldown_start", "lr_final"}
    assert {k: v for k, v in cool["train"].items() if k not in keys} == \
        {k: v for k, v in cpu["train"].items() if k not in keys}
    assert cool["train"]["lr_cooldown_steps"] > 0 and cpu["train"]["lr_cooldown_steps"] == 0
    assert train.lr_at(10**6, cool["train"]) == cool["train"]["lr_final"] < cpu["train"]["lr"]

@pytest.mark.parametrize("beta", ["0.002", "0.004", "0.016"])
def test_the_beta_grid_branches_differ_from_the_cooldown_branch_in_beta_only(beta):
    """The beta-grid branches compare with the cooldown branch at equal steps: same model,
    batches and lr schedule; beta held at the grid value from the branch's first step."""
    root = Path(__file__).resolve().parents[1]
    cool = train.load_train_config(root / "configs/sweep/cooldown.toml")
    grid = train.load_train_config(root / f"configs/sweep/beta{beta}-cooldown.toml")
    assert grid["model"] == cool["model"]
    keys = {"beta_kl", "beta_anneal_steps", "lr_cooldown_start"}
    assert {k: v for k, v in grid["train"].items() if k not in keys} == \
        {k: v for k, v in cool["train"].items() if k not in keys}
    start = grid["train"]["lr_cooldown_start"]
    assert train.beta_at(start, grid["train"]) == train.beta_at(start + 3000, grid["train"]) \
        == float(beta)



@pytest.mark.parametrize("name, beta, resumed_at", [("cpu-beta0.002", 0.002, 20710),
                                                     ("cpu-beta0.0005", 0.0005, 25500)])
def test_the_low_beta_run_configs_are_the_cpu_config_with_beta_held_low(name, beta, resumed_at):
    root = Path(__file__).resolve().parents[1]
    cpu = train.load_train_config(root / "configs/cpu.toml")
    low = train.load_train_config(root / f"configs/{name}.toml")
    assert low["model"] == cpu["model"]
    keys = {"beta_kl", "beta_anneal_steps"}
    assert {k: v for k, v in low["train"].items() if k not in keys} == \
        {k: v for k, v in cpu["train"].items() if k not in keys}
    # the run resumed with it (sessions 7 and 8) is past the anneal: beta held from its first step
    assert train.beta_at(resumed_at, low["train"]) == beta < train.beta_at(resumed_at, cpu["train"])


def test_validation_means_are_the_float64_means_of_the_batch_figures():
    """CPU validation figures stay what they were before the device setting (issue 16): float64
    means of each batch's figures (float32 sums differed in the 7th digit)."""
    from engine.model import CLSM, CLSMConfig

    torch.manual_seed(0)
    model = CLSM(CLSMConfig(d_model=32, d_ff=64, n_heads=4, d_lstm=32, d_mlp=64, d_z=16,
                            d_flow=32)).eval()
    valid = np.random.default_rng(0).integers(0, tk.N_SYMBOLS, (12, tk.SEQ_LEN))
    torch.manual_seed(1)
    got = train.validate(model, valid, seed=0, n_batches=4, batch=8, target_bars=[1, 2, 3, 4])
    model.eval()
    rng, want = np.random.default_rng(0), {}
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            x = torch.from_numpy(valid[rng.integers(0, len(valid), size=8)].astype(np.int64))
            start, length = train.sample_targets(rng, 8, [1, 2, 3, 4])
            for k, v in model(x, start, length, beta=1.0)[1].items():
                want[k] = want.get(k, 0.0) + float(v) / 4
    assert got == want


def test_validation_decodes_its_first_batches_freely():
    from engine.model import CLSM, CLSMConfig

    torch.manual_seed(0)
    model = CLSM(CLSMConfig(d_model=32, d_ff=64, n_heads=4, d_lstm=32, d_mlp=64, d_z=16,
                            d_flow=32)).eval()
    valid = np.random.default_rng(0).integers(0, tk.N_SYMBOLS, (12, tk.SEQ_LEN))
    torch.manual_seed(1)
    plain = train.validate(model, valid, seed=0, n_batches=3, batch=8, target_bars=[1, 2])
    torch.manual_seed(1)
    got = train.validate(model, valid, seed=0, n_batches=3, batch=8, target_bars=[1, 2],
                         free_batches=2)
    assert "fr_acc" not in plain and got == {**plain, "fr_acc": got["fr_acc"]}
    model.eval()  # validate leaves the model training
    rng, batch_means = np.random.default_rng(0), []
    with torch.no_grad():
        for _ in range(2):
            x = torch.from_numpy(valid[rng.integers(0, len(valid), size=8)].astype(np.int64))
            start, length = train.sample_targets(rng, 8, [1, 2])
            z, _ = model.encoder(x, start, length)
            right = 0
            for b in range(8):  # one window at a time, the decode's own start
                s = int(start[b])
                decoded = model.decode_naive(x[b:b + 1], z[b:b + 1], s, length)
                right += int((decoded == x[b:b + 1, s:s + length]).sum())
            batch_means.append(right / (8 * length))
    assert got["fr_acc"] == pytest.approx(np.mean(batch_means))  # a mean of batch means, as acc


def test_resuming_a_cooldown_config_away_from_its_start_warns(tmp_path, caplog):
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--quiet", "--threads", "1"]
    train.main(["--config", str(config), *argv, "--max-steps", "2"])
    cooldown = tmp_path / "cooldown.toml"  # a start left at an older step: the lr jumps down
    cooldown.write_text(config.read_text() + "lr_cooldown_start = 1\nlr_cooldown_steps = 1\n")
    caplog.set_level("WARNING", logger="training.train")
    train.main(["--config", str(cooldown), *argv, "--max-steps", "3", "--resume"])
    assert any("lr cooldown from step 1" in r.getMessage() and "starts at step 2" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_adam_scale_reads_each_parts_gradient_rms_from_the_optimiser_state():
    from engine.model import CLSM, CLSMConfig
    from training.adam_scale import adam_scale

    torch.manual_seed(0)
    model = CLSM(CLSMConfig(d_model=32, d_ff=64, n_heads=4, d_lstm=32, d_mlp=64, d_z=16,
                            d_flow=32))
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state
    rms = {"encoder.": 3e-9, "prior.": 5e-8, "decoder.": 1e-3}
    for i, (name, _) in enumerate(model.named_parameters()):
        opt.state_dict()["state"][i]["exp_avg_sq"].fill_(rms[name[:name.index(".") + 1]] ** 2)
    ckpt = {"model": model.state_dict(), "model_args": model.model_args(),
            "optimizer": opt.state_dict()}
    got = adam_scale(ckpt)
    assert got["encoder"]["share_below_1e-8"] == 1.0
    assert got["prior"]["share_below_1e-8"] == 0.0 and got["prior"]["share_below_1e-7"] == 1.0
    assert got["decoder"]["share_below_1e-7"] == 0.0
    assert got["prior"]["median_rms"] == pytest.approx(5e-8, rel=1e-5)


def test_adam_eps_comes_from_the_config_also_when_resuming(tmp_path):
    argv, out = tiny_run(tmp_path)
    train.main([*argv, "--max-steps", "1"])
    saved = train.load_checkpoint(out / "ckpt.pt")["optimizer"]["param_groups"][0]["eps"]
    assert saved == 1e-8  # configs/default.toml: Adam's default
    small = tmp_path / "small-eps.toml"  # a resumed run with a smaller eps uses it
    small.write_text((tmp_path / "tiny.toml").read_text() + "adam_eps = 1e-12\n")
    train.main([*argv, "--config", str(small), "--max-steps", "2", "--resume"])
    assert train.load_checkpoint(out / "ckpt.pt")["optimizer"]["param_groups"][0]["eps"] == 1e-12


@pytest.mark.parametrize("key", ["own_guesses", "word_dropout"])
def test_decoder_input_options_reach_the_model_from_the_config(tmp_path, monkeypatch, key):
    argv, out = tiny_run(tmp_path)
    mixed = tmp_path / "mixed.toml"
    mixed.write_text((tmp_path / "tiny.toml").read_text() + f"{key} = 0.25\n")
    seen = []
    plain = train.CLSM.forward

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get(key, 0.0))
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(train.CLSM, "forward", recording)
    train.main([*argv, "--config", str(mixed), "--max-steps", "2"])
    # two training steps with the share, validation (teacher-forced, the paper's loss) without
    assert seen.count(0.25) == 2 and set(seen) == {0.25, 0.0}
    assert train.load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_validation_takes_the_configs_number_of_batches(tmp_path, monkeypatch):
    argv, out = tiny_run(tmp_path)
    seen = []
    real = train.validate

    def spy(model, valid, seed, n_batches, *args, **kwargs):
        seen.append(n_batches)
        return real(model, valid, seed, n_batches, *args, **kwargs)

    monkeypatch.setattr(train, "validate", spy)
    config = Path(argv[argv.index("--config") + 1])
    config.write_text(config.read_text() + "valid_batches = 3\n")
    train.main([*argv, "--max-steps", "2"])
    assert seen == [3]  # valid_every = 2 in the tiny config
    assert train.load_train_config(Path(__file__).resolve().parents[1] / "configs/default.toml")[
        "train"]["valid_batches"] == 16


def test_validate_cli_gives_the_runs_figures_and_refuses_other_models(tmp_path, capsys):
    from tests.test_evaluate import TINY_VAE, write_tiny
    from training import validate as validate_cli
    from training.baselines import PaperVAE
    argv, out = tiny_run(tmp_path)
    train.main([*argv, "--max-steps", "2"])
    capsys.readouterr()  # the run's own last line
    data = argv[argv.index("--data") + 1]
    validate_cli.main([str(out / "ckpt.pt"), "--data", data, "--batches", "2"])
    first = json.loads(capsys.readouterr().out)
    validate_cli.main([str(out / "ckpt.pt"), "--data", data, "--batches", "2"])
    assert json.loads(capsys.readouterr().out) == first  # fixed, seeded batches
    assert first["batches"] == 2 and 0.0 <= first["acc"] <= 1.0 and first["rec"] > 0.0
    vae = write_tiny(tmp_path / "vae.pt", PaperVAE(TINY_VAE))
    with pytest.raises(SystemExit, match="not a CLSM"):
        validate_cli.main([str(vae), "--data", data])
