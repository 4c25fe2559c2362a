"""training/evaluate.py and training/baselines.py with tiny models on a tiny cache (1 thread)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import tokens as tk
from engine.decoding import CachedDecoder
from engine.model import CLSM, CLSMConfig
from tests.midi_factory import Track, scale_melody, write_midi
from training import baselines, evaluate
from training.baselines import LSTMVAE, LMConfig, TransformerLM, VAEConfig, checkpoint_kind, load_model
from training.data import SPLITS
from training.train import load_checkpoint, save_checkpoint

TINY_CLSM = CLSMConfig(d_model=32, d_ff=64, n_heads=4, d_lstm=32, d_mlp=64, d_z=16, d_flow=32,
                       dropout=0.0)
TINY_VAE = VAEConfig(d_embed=16, d_lstm=16, d_mlp=32, d_z=8, dropout=0.0)
TINY_LM = LMConfig(d_model=16, d_ff=32, n_heads=2, dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def write_cache(path: Path, n_per_split: int = 6, seed: int = 0) -> Path:
    """Random musical tokens, n windows in each split; only the arrays load_windows reads."""
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, tk.N_SYMBOLS, size=(n_per_split * len(SPLITS), tk.SEQ_LEN))
    split = np.repeat(np.arange(len(SPLITS)), n_per_split)
    np.savez(path, windows=windows.astype(np.uint8), split=split.astype(np.uint8),
             split_names=np.array(SPLITS))
    return path


def write_tiny(path: Path, model: torch.nn.Module) -> Path:
    save_checkpoint(path, model, torch.optim.Adam(model.parameters()), 0, {}, {})
    return path


@pytest.fixture
def tiny_files(tmp_path) -> dict[str, Path]:
    return {
        "data": write_cache(tmp_path / "w.npz"),
        "clsm": write_tiny(tmp_path / "clsm.pt", CLSM(TINY_CLSM)),
        "vae": write_tiny(tmp_path / "vae.pt", LSTMVAE(TINY_VAE)),
        "lm": write_tiny(tmp_path / "lm.pt", TransformerLM(TINY_LM)),
    }


def run_json(capsys, argv: list[str]) -> dict:
    evaluate.main(argv + ["--json"])
    return json.loads(capsys.readouterr().out)


def test_json_has_every_field_and_is_seeded(tiny_files, capsys):
    f = tiny_files
    argv = ["--checkpoint", str(f["clsm"]), "--baseline", str(f["vae"]), "--lm", str(f["lm"]),
            "--data", str(f["data"]), "--n", "5", "--batch", "2", "--seed", "3"]
    out = run_json(capsys, argv)
    assert out["settings"]["n"] == 5 and out["settings"]["split"] == "test"
    for key in ("lm_nll_target", "lm_nll_window"):
        assert out["reference"][key] > 0
    assert 0.0 <= out["reference"]["onset_rate"] <= 1.0
    for name in ("clsm", "vae"):
        r = out[name]
        assert r["kind"] == name
        for key in ("recon_acc_general", "recon_acc_left"):
            assert 0.0 <= r[key] <= 1.0
        for J in (2, 4, 8):
            assert r[f"R{J}_pairs"] + r[f"R{J}_excluded"] == 5
            assert r[f"R{J}"] is None or r[f"R{J}"] >= 1.0  # triangle inequality
        assert r["lm_nll_target"] > 0 and r["lm_nll_window"] > 0
        assert 0.0 <= r["onset_rate"] <= 1.0
    assert run_json(capsys, argv) == out  # same seed, same numbers


def test_without_baseline_and_lm_fields_are_null(tiny_files, capsys):
    out = run_json(capsys, ["--checkpoint", str(tiny_files["clsm"]), "--data",
                            str(tiny_files["data"]), "--n", "2", "--batch", "2"])
    assert out["vae"] is None
    assert out["clsm"]["lm_nll_target"] is None and out["reference"]["lm_nll_window"] is None


def test_midi_folder_as_data(tmp_path, tiny_files, capsys):
    write_midi(tmp_path / "midi" / "song.mid", [Track(scale_melody(10), name="melody")])
    out = run_json(capsys, ["--checkpoint", str(tiny_files["clsm"]), "--data",
                            str(tmp_path / "midi"), "--n", "2", "--batch", "2"])
    assert out["settings"]["n"] == 2  # 10 bars -> 3 windows, 2 drawn


def test_lm_checkpoint_as_model_is_a_clear_error(tiny_files):
    with pytest.raises(SystemExit, match="LM checkpoint"):
        evaluate.main(["--checkpoint", str(tiny_files["lm"]), "--data", str(tiny_files["data"])])


def test_cached_decode_matches_reference_with_per_window_starts():
    model = CLSM(TINY_CLSM).eval()
    x = torch.randint(0, tk.N_SYMBOLS, (4, tk.SEQ_LEN))
    z = torch.randn(4, TINY_CLSM.d_z)
    start = torch.tensor([0, 32, 96, 32])
    naive = evaluate.decode(model, x, z, start, 32)
    assert torch.equal(naive, evaluate.decode(model, x, z, start, 32, CachedDecoder(model.decoder).eval()))


def test_vae_sees_only_the_left_context():
    vae = LSTMVAE(TINY_VAE).eval()
    x = torch.randint(0, tk.N_SYMBOLS, (2, tk.SEQ_LEN))
    z = torch.randn(2, TINY_VAE.d_z)
    other = x.clone()
    other[:, 64:] = (other[:, 64:] + 1) % tk.N_SYMBOLS  # change the target and right context
    out = vae.decode(x, z, 32, 32)
    assert torch.equal(out, vae.decode(other, z, 32, 32))
    # The greedy decode follows the teacher-forced logits when fed its own tokens.
    fed = x.clone()
    fed[:, 32:64] = out
    assert torch.equal(vae.logits(fed, z)[:, 32:64].argmax(-1), out)


@pytest.mark.parametrize("kind", ["vae", "lm"])
def test_training_entry_writes_a_loadable_checkpoint(tmp_path, kind, monkeypatch):
    data = write_cache(tmp_path / "w.npz", n_per_split=3)
    # Tiny sizes: the entry builds the default config, so shrink the defaults for this test.
    monkeypatch.setattr(baselines, "new_model",
                        lambda k: LSTMVAE(TINY_VAE) if k == "vae" else TransformerLM(TINY_LM))
    baselines.main(["--kind", kind, "--data", str(data), "--out", str(tmp_path / kind),
                    "--max-steps", "2", "--quiet"])
    ckpt = load_checkpoint(tmp_path / kind / "ckpt.pt")
    assert checkpoint_kind(ckpt) == kind and ckpt["step"] == 2
    assert {"model", "optimizer", "model_args", "step", "config", "metrics"} <= set(ckpt)
    model, loaded_kind = load_model(tmp_path / kind / "ckpt.pt")
    assert loaded_kind == kind and not model.training
