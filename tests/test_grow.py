"""training.grow (widening a resumable state) and training.decode_errors on tiny models."""

import json
from pathlib import Path

import pytest
import torch

from engine.model import CLSM
from tests.test_evaluate import TINY_CLSM, write_cache
from tests.test_train import tiny_run
from training import decode_errors, grow, train
from training.train import load_checkpoint, save_checkpoint

WIDE_LSTM, WIDE_MLP = 48, 96


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def trained_state(tmp_path: Path, steps: int = 3) -> Path:
    """A tiny CLSM after a few Adam steps (nonzero moments everywhere), saved like a run's."""
    model = CLSM(TINY_CLSM)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, 32, (4, 128))
    start = torch.tensor([0, 16, 32, 64])
    for _ in range(steps):
        loss, _ = model(x, start, 32, beta=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "state.pt"
    save_checkpoint(path, model, opt, 7, {"model": {"d_lstm": TINY_CLSM.d_lstm}}, {})
    return path


def test_widening_keeps_what_the_encoder_and_prior_compute(tmp_path):
    ckpt = load_checkpoint(trained_state(tmp_path))
    grown = grow.grow(ckpt, WIDE_LSTM, WIDE_MLP)
    old, new = CLSM.from_checkpoint(ckpt).eval(), CLSM.from_checkpoint(grown).eval()
    assert new.cfg.d_lstm == WIDE_LSTM and new.cfg.d_mlp == WIDE_MLP
    assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.parameters())
    assert grown["step"] == 7 and grown["config"]["model"]["d_lstm"] == WIDE_LSTM
    x = torch.randint(0, 32, (3, 128))
    start = torch.tensor([16, 48, 80])
    with torch.no_grad():
        for part in ("encoder", "prior"):
            for a, b in zip(getattr(old, part)(x, start, 48), getattr(new, part)(x, start, 48),
                            strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.manual_seed(1)
        loss_old, _ = old(x, start, 48, beta=0.01)
        torch.manual_seed(1)
        loss_new, _ = new(x, start, 48, beta=0.01)
    torch.testing.assert_close(loss_old, loss_new, atol=1e-5, rtol=1e-5)


def test_new_units_learn_from_the_first_step_with_moments_like_their_neighbours(tmp_path):
    ckpt = load_checkpoint(trained_state(tmp_path))
    grown = grow.grow(ckpt, WIDE_LSTM, WIDE_MLP)
    name = "encoder.trunk.mean.0.weight"  # [h_l; h_r] -> hidden
    h, m = TINY_CLSM.d_lstm, TINY_CLSM.d_mlp
    weight = grown["model"][name]
    assert torch.equal(weight[:m, :h], ckpt["model"][name][:, :h])  # old forward columns kept
    assert torch.equal(weight[:m, WIDE_LSTM:WIDE_LSTM + h], ckpt["model"][name][:, h:])
    assert not weight[:m, h:WIDE_LSTM].any()  # old units read nothing from new ones
    assert weight[m:].abs().sum() > 0  # new units start from the bigger model's init

    model = CLSM.from_checkpoint(grown)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(grown["optimizer"])
    index = [n for n, _ in model.named_parameters()].index(name)
    moments = opt.state[opt.param_groups[0]["params"][index]]
    old_sq = ckpt["optimizer"]["state"][index]["exp_avg_sq"]
    assert not moments["exp_avg"][m:].any()
    torch.testing.assert_close(moments["exp_avg_sq"][m:], torch.full_like(moments["exp_avg_sq"][m:],
                                                                           float(old_sq.mean())))
    x = torch.randint(0, 32, (4, 128))
    loss, _ = model(x, torch.tensor([0, 16, 32, 64]), 32, beta=0.01)
    opt.zero_grad()
    loss.backward()
    assert dict(model.named_parameters())[name].grad[:m, h:WIDE_LSTM].abs().sum() > 0
    opt.step()
    assert model.state_dict()[name][:m, h:WIDE_LSTM].abs().sum() > 0


def test_narrowing_is_refused(tmp_path):
    ckpt = load_checkpoint(trained_state(tmp_path))
    with pytest.raises(SystemExit, match="can only widen"):
        grow.grow(ckpt, TINY_CLSM.d_lstm // 2, TINY_CLSM.d_mlp)


def test_a_grown_state_resumes_training_at_its_step(tmp_path):
    argv, out = tiny_run(tmp_path)
    train.main([*argv, "--max-steps", "2"])
    grow.main([str(out / "ckpt.pt"), str(tmp_path / "wide.pt"), "--d-lstm", str(WIDE_LSTM),
               "--d-mlp", str(WIDE_MLP)])
    train.main([*argv, "--max-steps", "4", "--resume", str(tmp_path / "wide.pt")])
    resumed = load_checkpoint(out / "ckpt.pt")
    assert resumed["step"] == 4 and resumed["model_args"]["d_lstm"] == WIDE_LSTM


def test_decode_errors_reports_each_case_and_agrees_with_itself(tmp_path, capsys):
    data = write_cache(tmp_path / "w.npz", n_per_split=16)
    state = trained_state(tmp_path)
    decode_errors.main(["--checkpoint", str(state), "--data", str(data), "--n", "16",
                        "--batch", "4", "--json", "--out", str(tmp_path / "de.json")])
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "de.json").read_text()) == result
    cases = result["models"][str(state)]["w"]
    assert set(cases) == {"left", "other"}
    for r in cases.values():
        assert r["targets"] == 16
        for key in ("tf_acc", "fr_acc", "tf_acc_prior", "fr_acc_prior", "exact", "shifted"):
            assert 0.0 <= r[key] <= 1.0
        # free-running errors by kind add up to all errors
        errors = sum(v for k, v in r["errors"].items() if k != "octave")
        assert errors == pytest.approx(1.0 - r["fr_acc"])
        # the per-length figures are token-weighted parts of the whole
        assert min(v["fr"] for v in r["by_length"].values()) <= r["fr_acc"] + 1e-9
        assert max(v["fr"] for v in r["by_length"].values()) >= r["fr_acc"] - 1e-9


def test_the_wide_config_is_the_running_config_with_the_papers_encoder_sizes():
    root = Path(__file__).resolve().parents[1]
    run = train.load_train_config(root / "configs/cpu-beta0.0005.toml")
    wide = train.load_train_config(root / "configs/cpu-wide.toml")
    assert wide["train"] == run["train"]
    paper = train.load_train_config(root / "configs/default.toml")["model"]
    assert {k: v for k, v in wide["model"].items() if k not in ("d_lstm", "d_mlp")} == \
        {k: v for k, v in run["model"].items() if k not in ("d_lstm", "d_mlp")}
    assert (wide["model"]["d_lstm"], wide["model"]["d_mlp"]) == (paper["d_lstm"], paper["d_mlp"])


def test_decode_errors_names_a_checkpoint_that_is_not_a_clsm(tmp_path):
    from tests.test_evaluate import TINY_VAE, write_tiny
    from training.baselines import PaperVAE
    data = write_cache(tmp_path / "w.npz", n_per_split=8)
    vae = write_tiny(tmp_path / "vae.pt", PaperVAE(TINY_VAE))
    with pytest.raises(SystemExit, match="vae checkpoint"):
        decode_errors.main(["--checkpoint", str(vae), "--data", str(data), "--n", "8"])


def test_more_latent_vectors_keep_the_decoders_output(tmp_path):
    ckpt = load_checkpoint(trained_state(tmp_path))
    grown = grow.repeat_latents(ckpt, 2 * TINY_CLSM.l_z)
    old, new = CLSM.from_checkpoint(ckpt).eval(), CLSM.from_checkpoint(grown).eval()
    assert new.cfg.l_z == 2 * TINY_CLSM.l_z and grown["config"]["model"]["l_z"] == new.cfg.l_z
    x = torch.randint(0, 32, (3, 128))
    start = torch.tensor([16, 48, 80])
    z = torch.randn(3, TINY_CLSM.d_z)
    with torch.no_grad():
        torch.testing.assert_close(new.decoder(x, z, start, 32), old.decoder(x, z, start, 32),
                                   atol=1e-3, rtol=1e-3)  # up to the copies' perturbation
    weight = grown["model"]["decoder.latent.weight"]
    rows = TINY_CLSM.l_z * TINY_CLSM.d_z
    assert torch.equal(weight[:rows], ckpt["model"]["decoder.latent.weight"])
    assert not torch.equal(weight[rows:], weight[:rows])  # the copies can drift apart
    model = CLSM.from_checkpoint(grown)
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(grown["optimizer"])  # the moments were repeated with the rows
    with pytest.raises(SystemExit, match="multiple"):
        grow.repeat_latents(ckpt, TINY_CLSM.l_z + 1)


def test_grow_cli_keeps_the_sizes_it_is_not_given(tmp_path, capsys):
    state = trained_state(tmp_path)
    grow.main([str(state), str(tmp_path / "lz.pt"), "--l-z", str(2 * TINY_CLSM.l_z)])
    args = load_checkpoint(tmp_path / "lz.pt")["model_args"]
    assert (args["d_lstm"], args["d_mlp"], args["l_z"]) == \
        (TINY_CLSM.d_lstm, TINY_CLSM.d_mlp, 2 * TINY_CLSM.l_z)
    assert "l_z 4 -> 8" in capsys.readouterr().out
