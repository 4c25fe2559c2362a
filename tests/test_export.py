"""engine/export.py: a model folder whose TorchScript parts compute what the eager model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import export
from engine import tokens as tk
from engine.model import CLSM, CLSMConfig

# max_rel < 128 so that the clipping of relative distances is exercised too.
TINY = CLSMConfig(d_model=32, d_ff=64, n_heads=4, d_lstm=32, d_mlp=64, d_z=16, d_flow=32,
                  dropout=0.0, max_rel=24)


def tiny_model(seed: int = 0) -> CLSM:
    """A tiny CLSM whose zero-initialised layers (flow outputs, biases) are made random, so the
    flow is not the identity and every weight matters."""
    torch.manual_seed(seed)
    model = CLSM(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model


def export_tiny(out: Path, *, fp16: bool = False, seed: int = 0) -> dict:
    return export.export(tiny_model(seed), out, source={"kind": "random", "seed": seed},
                         fp16=fp16)




def random_tokens(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tk.N_SYMBOLS, (batch, tk.SEQ_LEN), generator=g)


def test_manifest_names_every_file_with_its_hash(folder):
    manifest = json.loads((folder / export.MANIFEST).read_text())
    assert manifest["format_version"] == export.FORMAT_VERSION
    assert manifest["vocab"]["size"] == tk.VOCAB_SIZE
    assert manifest["model_args"]["d_z"] == TINY.d_z
    assert manifest["torch_version"] == torch.__version__
    assert set(manifest["files"]) == {export.LATENT_FILE, export.DECODER_FILE, export.EAGER_FILE,
                                      export.FAST_LATENT_FILE, export.FAST_LATENT_BF16_FILE,
                                      export.FAST_DECODER_FILE, export.NATIVE_DECODER_FILE,
                                      export.NATIVE_PRIOR_FILE}
    for name, meta in manifest["files"].items():
        assert meta["sha256"] == export.sha256_file(folder / name)


def test_torchscript_parts_match_eager(folder):
    model = tiny_model()
    latent, decoder = export.build_parts(model)
    s_latent = export.load_scripted(folder / export.LATENT_FILE)
    s_decoder = export.load_scripted(folder / export.DECODER_FILE)
    x = random_tokens(3, seed=1)
    z = torch.randn(3, TINY.d_z)
    with torch.inference_mode():
        for start, length in [(0, 16), (48, 32), (64, 64), (112, 16)]:
            for a, b in zip(latent(x, start, length), s_latent(x, start, length), strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
            tok_e, log_e = decoder(x, z, start, length)
            tok_s, log_s = s_decoder(x, z, start, length, 0.0, None)
            assert torch.equal(tok_e, tok_s)
            torch.testing.assert_close(log_s, log_e, rtol=0, atol=1e-4)
        torch.testing.assert_close(s_latent.flow_forward(z), latent.flow_forward(z),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(s_latent.flow_inverse(z), latent.flow_inverse(z),
                                   rtol=0, atol=1e-4)
        # and the eager parts are the model's own prior and flow
        mean, logvar = model.prior(x, torch.full((3,), 48), 32)
        torch.testing.assert_close(latent(x, 48, 32)[0], mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(latent.flow_forward(z), model.prior.flow(z)[0],
                                   rtol=0, atol=1e-5)


def test_cached_decoder_logits_are_teacher_forced_logits():
    """The logits the cached decoder chose from equal the full decoder's teacher-forced logits
    on its own output: the cache and the mask reproduce the reference exactly."""
    model = tiny_model(seed=3)
    _, decoder = export.build_parts(model)
    x, z = random_tokens(2, seed=4), torch.randn(2, TINY.d_z)
    with torch.inference_mode():
        for start, length in [(0, 64), (32, 48), (80, 48)]:
            tokens, logits = decoder(x, z, start, length)
            filled = x.clone()
            filled[:, start:start + length] = tokens
            ref = model.decoder(filled, z, torch.full((2,), start), length)
            torch.testing.assert_close(logits, ref[:, start:start + length], rtol=0, atol=1e-4)


def test_fp16_folder_is_half_size(tmp_path):
    manifest = export_tiny(tmp_path / "half", fp16=True)
    full = export_tiny(tmp_path / "full")
    assert manifest["dtype"] == "float16"
    size = manifest["files"][export.EAGER_FILE]["bytes"]
    assert size < 0.7 * full["files"][export.EAGER_FILE]["bytes"]


def test_cli_from_checkpoint_records_its_hash(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": model.model_args(), "step": 7}, ckpt)
    export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m")])
    manifest = json.loads((tmp_path / "m" / export.MANIFEST).read_text())
    assert manifest["source"]["sha256"] == export.sha256_file(ckpt)
    assert manifest["source"]["step"] == 7


def test_cli_random_from_config(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nd_model = 16\nd_ff = 32\nn_heads = 2\nd_lstm = 16\n"
                      "d_mlp = 32\nd_z = 8\nd_flow = 16\n")
    export.main(["--random", "--config", str(config), "--out", str(tmp_path / "r")])
    manifest = json.loads((tmp_path / "r" / export.MANIFEST).read_text())
    assert manifest["model_args"]["d_z"] == 8
    assert manifest["source"]["kind"] == "random"


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m")])
