"""training/render.py writes MIDI that pretty_midi reads back and a PNG (tiny CLSM, 1 thread)."""

import numpy as np
import pretty_midi
import pytest
import torch

from engine import tokens as tk
from engine.model import CLSM
from tests.test_evaluate import TINY_CLSM, TINY_LM, write_cache, write_tiny
from training import render
from training.baselines import TransformerLM
from training.windows import load_windows


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_render_writes_midi_and_png(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    model_dir = tmp_path / "clsm-model"  # a model folder, as models/clsm-default
    model_dir.mkdir()
    write_tiny(model_dir / "ckpt.pt", CLSM(TINY_CLSM))
    out = tmp_path / "out"
    render.main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--n", "2",
                 "--bars", "3-4", "--J", "2", "--bpm", "120"])
    for i in range(2):
        assert (out / f"w{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        chain = pretty_midi.PrettyMIDI(str(out / f"w{i}_interpolation.mid"))
        # J + 1 = 3 sequences of 8 bars at 120 bpm = 16 s each, one after the other.
        assert chain.get_end_time() <= 3 * 16.0 + 1e-6
        infill = pretty_midi.PrettyMIDI(str(out / f"w{i}_infill_a.mid"))
        assert infill.instruments and infill.get_end_time() <= 16.0 + 1e-6
    # The original file holds the window's notes exactly (0.125 s per step).
    windows = load_windows(data, "test")
    original = pretty_midi.PrettyMIDI(str(out / "w0_original.mid")).instruments[0].notes
    starts = sorted(round(n.start / 0.125) for n in original)
    assert any(sorted(n.start for n in tk.tokens_to_notes(w.tolist())) == starts for w in windows)


def test_infill_keeps_the_context(tmp_path):
    model = CLSM(TINY_CLSM).eval()
    window = np.random.default_rng(1).integers(0, tk.N_SYMBOLS, tk.SEQ_LEN)
    seqs = render.render_window(model, window, 32, 32, J=2, gen=torch.Generator().manual_seed(0))
    assert len(seqs["interpolation"]) == 3
    for seq in seqs["interpolation"]:
        assert seq[:32] == window[:32].tolist() and seq[64:] == window[64:].tolist()
    assert seqs["infill_a"][0] == seqs["interpolation"][0]


def test_non_clsm_or_missing_model_is_a_clear_error(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    lm = write_tiny(tmp_path / "lm.pt", TransformerLM(TINY_LM))
    with pytest.raises(SystemExit, match="lm checkpoint"):
        render.main(["--model", str(lm), "--data", str(data), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        render.main(["--model", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "o")])
