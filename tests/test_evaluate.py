"""training/evaluate.py and training/baselines.py with tiny models on a tiny cache (1 thread)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import tokens as tk
from engine.decoding import CachedDecoder, nucleus
from engine.model import CLSM, CLSMConfig
from tests.midi_factory import Track, scale_melody, write_midi
from training import baselines, evaluate, snapshot
from training.baselines import LMConfig, PaperVAE, TransformerLM, VAEConfig, checkpoint_kind, load_model
from training.eval_models import Decoding
from training.train import load_checkpoint, save_checkpoint
from training.windows import SPLITS

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
        "vae": write_tiny(tmp_path / "vae.pt", PaperVAE(TINY_VAE)),
        "lm": write_tiny(tmp_path / "lm.pt", TransformerLM(TINY_LM)),
    }


def run_json(capsys, argv: list[str]) -> dict:
    evaluate.main(argv + ["--json"])
    return json.loads(capsys.readouterr().out)


PAPER_FIELDS = ("recon_acc", "prior_sample_acc", "R2", "R4", "R8", "lm_nll")
PLAYER_FIELDS = ("onset_rate", "hold_share", "rest_share", "pc_fit", "pc_overlap",
                 "rerolls_distinct", "rerolls_distance", "rerolls_ge15", "interp_distinct",
                 "interp_distinct_argmax",
                 "vary_change_0.5", "vary_change_1.0", "vary_ge15_1.0")


def write_two_set_cache(path: Path, n: int = 6) -> Path:
    """Like write_cache, with songs of two data sets (as training.prepare names them)."""
    rng = np.random.default_rng(0)
    windows = rng.integers(0, tk.N_SYMBOLS, size=(n * len(SPLITS), tk.SEQ_LEN)).astype(np.uint8)
    split = np.repeat(np.arange(len(SPLITS)), n).astype(np.uint8)
    i = np.arange(len(windows))
    song = ((i % 2) * 2 + (i // 2) % 2).astype(np.int32)  # both sets in every split
    songs = np.array(["pop909/001", "pop909/002", "nottingham/a", "nottingham/b"])
    np.savez(path, windows=windows, split=split, split_names=np.array(SPLITS), song=song,
             songs=songs, meta=np.array(json.dumps({})))
    return path


@pytest.mark.parametrize("decoding", ["argmax", "top_p=0.9,temperature=1.2"])
def test_json_has_every_field_per_set_and_case_and_is_seeded(tmp_path, tiny_files, capsys, decoding):
    f = tiny_files
    data = write_two_set_cache(tmp_path / "two.npz")
    argv = ["--checkpoint", str(f["clsm"]), "--baseline", str(f["vae"]), "--lm", str(f["lm"]),
            "--data", str(data), "--n", "3", "--batch", "2", "--seed", "3", "--decoding", decoding]
    out = run_json(capsys, argv)
    assert out["settings"]["decoding"] == decoding and out["settings"]["split"] == "test"
    assert set(out["reference"]) == {"pop909", "nottingham"}
    for ds in ("pop909", "nottingham"):
        for case in ("left", "other"):
            ref = out["reference"][ds][case]
            assert ref["lm_nll"] > 0 and 0.0 <= ref["onset_rate"] <= 1.0
            for name, kind in (("clsm", "clsm"), ("vae", "vae")):
                r = out["models"][name]["results"][ds][case]
                assert out["models"][name]["kind"] == kind and r["n"] == 3
                for key in PAPER_FIELDS + PLAYER_FIELDS:
                    assert key in r, key
                for J in (2, 4, 8):
                    assert r[f"R{J}_pairs"] + r[f"R{J}_excluded"] == 3
                    assert r[f"R{J}"] is None or r[f"R{J}"] >= 1 / J  # 1/J = perfectly even
                assert 0.0 <= r["recon_acc"] <= 1.0 and r["lm_nll"] > 0
                assert 1 <= r["rerolls_distinct"] <= 8 and 1 <= r["interp_distinct"] <= 9
                assert abs(r["onset_rate"] + r["hold_share"] + r["rest_share"] - 1.0) < 1e-9
                by_bars = [v for k, v in r.items() if k.startswith("vary_ge15_1.0_bars")]
                assert by_bars and min(by_bars) <= r["vary_ge15_1.0"] <= max(by_bars)
    assert run_json(capsys, argv) == out  # same seed, same numbers


def test_without_baseline_and_lm_fields_are_null(tiny_files, capsys):
    out = run_json(capsys, ["--checkpoint", str(tiny_files["clsm"]), "--data",
                            str(tiny_files["data"]), "--n", "2", "--batch", "2"])
    assert list(out["models"]) == ["clsm"]
    (ds,) = out["reference"]
    assert out["models"]["clsm"]["results"][ds]["left"]["lm_nll"] is None
    assert out["reference"][ds]["other"]["lm_nll"] is None


def test_midi_folder_as_data(tmp_path, tiny_files, capsys):
    write_midi(tmp_path / "midi" / "song.mid", [Track(scale_melody(10), name="melody")])
    out = run_json(capsys, ["--checkpoint", str(tiny_files["clsm"]), "--data",
                            str(tmp_path / "midi"), "--n", "2", "--batch", "2"])
    assert out["models"]["clsm"]["results"]["midi"]["left"]["n"] == 2  # 10 bars -> 3 windows


def test_model_folder_as_checkpoint(folder, tiny_files, capsys):
    out = run_json(capsys, ["--checkpoint", str(folder), "--data", str(tiny_files["data"]),
                            "--n", "2", "--batch", "2"])
    assert out["models"]["tiny"]["kind"] == "clsm"


def test_plot_writes_png_per_data_set(tmp_path, tiny_files, capsys):
    data = write_two_set_cache(tmp_path / "two.npz")
    run_json(capsys, ["--checkpoint", str(tiny_files["clsm"]), "--baseline", str(tiny_files["vae"]),
                      "--lm", str(tiny_files["lm"]), "--data", str(data), "--n", "2", "--batch",
                      "2", "--plot", str(tmp_path / "plots")])
    for ds in ("pop909", "nottingham"):
        png = (tmp_path / "plots" / f"fig3b_{ds}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_lm_checkpoint_as_model_is_a_clear_error(tiny_files):
    with pytest.raises(SystemExit, match="LM checkpoint"):
        evaluate.main(["--checkpoint", str(tiny_files["lm"]), "--data", str(tiny_files["data"])])


@pytest.mark.parametrize("bad", ["greedy", "temperature=0", "top_p=1.5", "top_p"])
def test_bad_decoding_is_a_clear_error(tiny_files, bad, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tiny_files["clsm"]), "--data", str(tiny_files["data"]),
                       "--decoding", bad])
    assert "decoding" in capsys.readouterr().err or "top_p" in capsys.readouterr().err


def test_decoding_parse_round_trip():
    assert str(Decoding.parse("argmax")) == "argmax" and not Decoding.parse("argmax").sampling
    d = Decoding.parse("top_p=0.9,temperature=0.8")
    assert (d.top_p, d.temperature) == (0.9, 0.8) and str(Decoding.parse(str(d))) == str(d)


def test_nucleus_keeps_the_fewest_tokens_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(nucleus(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.75
    assert torch.isfinite(nucleus(logits, 1e-6)).sum() == 1  # the most likely always stays


def test_cached_decoder_top_p_samples_only_inside_the_nucleus():
    model = CLSM(TINY_CLSM).eval()
    dec = CachedDecoder(model.decoder).eval()
    x = torch.randint(0, tk.N_SYMBOLS, (1, tk.SEQ_LEN))
    z = torch.randn(64, TINY_CLSM.d_z)
    gumbel = -(-torch.rand(64, 16, tk.N_SYMBOLS).clamp(1e-9, 1 - 1e-7).log()).log()
    argmax, _ = dec(x, z, 32, 16)
    tiny_p, _ = dec(x, z, 32, 16, 1.0, gumbel, 1e-6)
    assert torch.equal(tiny_p, argmax)  # a nucleus of one token is argmax
    sampled, logits = dec(x, z, 32, 16, 1.0, gumbel, 0.5)
    allowed = torch.isfinite(nucleus(logits, 0.5))
    assert allowed.gather(-1, sampled[..., None]).all()


def test_vae_encoder_reads_the_whole_window():
    vae = PaperVAE(TINY_VAE).eval()
    x = torch.randint(0, tk.N_SYMBOLS, (2, tk.SEQ_LEN))
    seen = []
    vae.enc.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    for pos in (0, tk.SEQ_LEN - 1):  # the first and the last token of the window
        other = x.clone()
        other[:, pos] = (other[:, pos] + 1) % tk.N_SYMBOLS
        assert not torch.allclose(vae.encoder(x, torch.tensor([32, 32]), 16)[0],
                                  vae.encoder(other, torch.tensor([32, 32]), 16)[0])
    assert all(shape[1] == tk.SEQ_LEN for shape in seen)  # the Bi-LSTM reads all 128 steps


def test_vae_reconstructs_the_whole_window():
    vae = PaperVAE(TINY_VAE).train()
    x = torch.randint(0, tk.N_SYMBOLS, (2, tk.SEQ_LEN))
    vae.zero_grad()
    vae.logits(x, torch.zeros(2, TINY_VAE.d_z))[:, 0].sum().backward()
    assert vae.head.weight.grad.abs().sum() > 0
    loss, parts = vae(x, torch.tensor([32, 32]), 16, beta=0.4)
    # the loss covers all 128 tokens: changing a token far from any target changes it
    other = x.clone()
    other[:, 127] = (other[:, 127] + 1) % tk.N_SYMBOLS
    torch.manual_seed(0)
    a = vae.eval()(x, torch.tensor([32, 32]), 16)[1]["rec"]
    torch.manual_seed(0)
    b = vae(other, torch.tensor([32, 32]), 16)[1]["rec"]
    assert a != b


def test_vae_infill_sees_only_the_left_context():
    vae = PaperVAE(TINY_VAE).eval()
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
def test_baseline_runs_validate_without_the_clsms_free_running_check(tmp_path, kind, monkeypatch):
    data = write_cache(tmp_path / "w.npz", n_per_split=3)
    config = tmp_path / "often.toml"  # default.toml decodes 4 validation batches freely
    config.write_text("[train]\nvalid_every = 1\nbatch_size = 4\n")
    monkeypatch.setattr(baselines, "new_model",
                        lambda k, cfg: PaperVAE(TINY_VAE) if k == "vae" else TransformerLM(TINY_LM))
    baselines.main(["--kind", kind, "--config", str(config), "--data", str(data),
                    "--out", str(tmp_path / kind), "--max-steps", "2", "--quiet"])
    lines = (tmp_path / kind / "log.jsonl").read_text().splitlines()
    valid = [json.loads(line)["valid"] for line in lines]
    assert len(valid) == 2 and all("rec" in v and "fr_acc" not in v for v in valid)


@pytest.mark.parametrize("kind", ["vae", "lm"])
def test_baseline_runs_ignore_the_clsms_decoder_input_keys_with_a_warning(tmp_path, kind,
                                                                          monkeypatch, caplog):
    data = write_cache(tmp_path / "w.npz", n_per_split=3)
    config = tmp_path / "branch.toml"  # a CLSM branch's config, taken for its sizes
    config.write_text("[train]\nbatch_size = 4\nown_guesses = 0.5\nword_dropout = 0.25\n")
    monkeypatch.setattr(baselines, "new_model",
                        lambda k, cfg: PaperVAE(TINY_VAE) if k == "vae" else TransformerLM(TINY_LM))
    with caplog.at_level("WARNING", logger="training.baselines"):
        baselines.main(["--kind", kind, "--config", str(config), "--data", str(data),
                        "--out", str(tmp_path / kind), "--max-steps", "2", "--quiet"])
    assert load_checkpoint(tmp_path / kind / "ckpt.pt")["step"] == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "own_guesses" in warned and "word_dropout" in warned


@pytest.mark.parametrize("kind", ["vae", "lm"])
def test_training_entry_writes_a_loadable_checkpoint(tmp_path, kind, monkeypatch):
    data = write_cache(tmp_path / "w.npz", n_per_split=3)
    # Tiny sizes: the entry builds the default config, so shrink the defaults for this test.
    monkeypatch.setattr(baselines, "new_model",
                        lambda k, cfg: PaperVAE(TINY_VAE) if k == "vae" else TransformerLM(TINY_LM))
    baselines.main(["--kind", kind, "--data", str(data), "--out", str(tmp_path / kind),
                    "--max-steps", "2", "--quiet"])
    ckpt = load_checkpoint(tmp_path / kind / "ckpt.pt")
    assert checkpoint_kind(ckpt) == kind and ckpt["step"] == 2
    assert {"model", "optimizer", "model_args", "step", "config", "metrics"} <= set(ckpt)
    model, loaded_kind = load_model(tmp_path / kind / "ckpt.pt")
    assert loaded_kind == kind and not model.training
    snapshot.write_snapshot(tmp_path / kind / "ckpt.pt", tmp_path / "snap.pt")
    baselines.main(["--kind", kind, "--data", str(data), "--out", str(tmp_path / "fresh"),
                    "--max-steps", "3", "--quiet", "--resume", str(tmp_path / "snap.pt")])
    assert load_checkpoint(tmp_path / "fresh" / "ckpt.pt")["step"] == 3
    snapshot.write_snapshot(tmp_path / "fresh" / "ckpt.pt", tmp_path / "ship.pt", ship=True)
    shipped, _ = load_model(tmp_path / "ship.pt")
    fresh, _ = load_model(tmp_path / "fresh" / "ckpt.pt")
    assert "optimizer" not in load_checkpoint(tmp_path / "ship.pt")
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4)  # fp16 storage, fp32 compute
               for a, b in zip(fresh.state_dict().values(), shipped.state_dict().values(), strict=True))


def test_saved_result_reprints_as_markdown(tmp_path, tiny_files, capsys):
    saved = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", str(tiny_files["clsm"]), "--data", str(tiny_files["data"]),
                   "--n", "2", "--batch", "2", "--out", str(saved)])
    capsys.readouterr()
    evaluate.main(["--from", str(saved), "--markdown"])
    md = capsys.readouterr().out
    assert md.count("| real data |") == 2 and md.count("| clsm |") == 2  # 1 set x 2 cases
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tiny_files["data"])])  # no model, no --from


def test_choose_decoding_ranks_saved_results(tmp_path, tiny_files, capsys):
    from training import choose_decoding

    files = []
    for d in ("argmax", "temperature=1.5"):
        out = tmp_path / f"{d}.json"
        evaluate.main(["--checkpoint", str(tiny_files["clsm"]), "--data", str(tiny_files["data"]),
                       "--n", "2", "--batch", "2", "--decoding", d, "--out", str(out)])
        files.append(str(out))
    capsys.readouterr()
    choose_decoding.main(files)
    text = capsys.readouterr().out
    assert "closest to real data:" in text and "argmax" in text and "temperature=1.5" in text
    rows = choose_decoding.compare([json.loads(Path(f).read_text()) for f in files])
    assert (rows[0]["missed"], rows[0]["score"]) <= (rows[1]["missed"], rows[1]["score"])


def saved_result(models: dict[str, float], decoding: str = "argmax") -> dict:
    """A saved evaluation with one figure (recon_acc) per model, data set and case."""
    cases = lambda acc: {ds: {case: {"recon_acc": acc} for case in evaluate.CASES}  # noqa: E731
                         for ds in ("pop909", "nottingham")}
    return {"settings": {"data": "cache/windows.npz", "split": "test", "n_per_set": 128,
                         "batch": 8, "seed": 0, "decoding": decoding,
                         "checkpoints": [f"{next(iter(models))[-1]}.pt"]},
            "reference": cases(None),
            "models": {name: {"kind": "clsm", "path": name, "results": cases(acc)}
                       for name, acc in models.items()}}


def test_saved_results_with_the_same_settings_share_one_table(tmp_path, capsys):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(saved_result({"branch-a": 0.5, "vae-g0.4": 0.4})))
    b.write_text(json.dumps(saved_result({"branch-b": 0.6, "vae-g0.4": 0.4, "branch-a": 0.7})))
    merged = run_json(capsys, ["--from", str(a), "--from", str(b)])
    # the baseline evaluated beside both branches is one row; a different model of a taken
    # name keeps its figures under a new name
    assert list(merged["models"]) == ["branch-a", "vae-g0.4", "branch-b", "branch-a-2"]
    assert merged["models"]["branch-a-2"]["results"]["pop909"]["left"]["recon_acc"] == 0.7
    assert merged["settings"]["checkpoints"] == ["a.pt", "b.pt"]
    evaluate.main(["--from", str(a), "--from", str(b), "--markdown"])
    table = capsys.readouterr().out
    assert table.count("| vae-g0.4 |") == 4 and table.count("| branch-a-2 |") == 4


def test_a_baseline_saved_with_fewer_figures_is_still_one_row(tmp_path, capsys):
    old, new = saved_result({"vae-g0.4": 0.4}), saved_result({"branch": 0.6, "vae-g0.4": 0.4})
    for cases in new["models"]["vae-g0.4"]["results"].values():
        for figures in cases.values():
            figures["vary_ge15_1.0_bars1"] = 0.1  # a figure added after the old result was saved
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    merged = run_json(capsys, ["--from", str(tmp_path / "old.json"), "--from",
                               str(tmp_path / "new.json")])
    assert list(merged["models"]) == ["vae-g0.4", "branch"]
    new["models"]["vae-g0.4"]["results"]["pop909"]["left"]["recon_acc"] = 0.4 + 1e-9  # rounding
    (tmp_path / "new.json").write_text(json.dumps(new))
    merged = run_json(capsys, ["--from", str(tmp_path / "old.json"), "--from",
                               str(tmp_path / "new.json")])
    assert list(merged["models"]) == ["vae-g0.4", "branch"]
    new["models"]["vae-g0.4"]["results"]["pop909"]["left"]["recon_acc"] = 0.41  # other figures
    (tmp_path / "new.json").write_text(json.dumps(new))
    merged = run_json(capsys, ["--from", str(tmp_path / "old.json"), "--from",
                               str(tmp_path / "new.json")])
    assert list(merged["models"]) == ["vae-g0.4", "branch", "vae-g0.4-2"]


def test_saved_results_with_other_settings_are_refused_by_name(tmp_path, capsys):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(saved_result({"branch-a": 0.5})))
    b.write_text(json.dumps(saved_result({"branch-b": 0.6}, decoding="temperature=1")))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--from", str(a), "--from", str(b)])
    assert e.value.code == 2
    assert "decoding 'argmax' vs 'temperature=1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--from", str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err
    for i, text in enumerate(['{"models": {}}', "[1, 2]", "{not json"]):
        wrong = tmp_path / f"wrong{i}.json"
        wrong.write_text(text)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--from", str(a), "--from", str(wrong)])
        assert e.value.code == 2 and f"wrong{i}.json" in capsys.readouterr().err
