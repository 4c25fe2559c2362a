"""engine/native.py: the C++ decode computes what the reference decoder (engine/decoding.py) and
the naive full-recompute decoder compute: identical argmax and sampled tokens, close logits;
the engine uses it for the fast backends and falls back to TorchScript without it."""

from __future__ import annotations

import json

import pytest
import torch

from engine import export, native
from engine.model import CLSM, CLSMConfig
from engine.runtime import Engine, EngineError
from tests.test_engine import GOOD, buffer
from tests.test_export import TINY, random_tokens, tiny_model

CASES = [(0, 16), (48, 32), (64, 64), (112, 16), (0, 64), (16, 48), (33, 20)]  # (start, length)
# d_head 32 (the shipped and the paper's size: the vectorised value sum), TINY has d_head 8.
WIDE = CLSMConfig(d_model=64, d_ff=128, n_heads=2, d_lstm=32, d_mlp=64, d_z=32, d_flow=32,
                  dropout=0.0)

lib = native.library()
pytestmark = pytest.mark.skipif(lib is None, reason="no C++ compiler: the native decoder is off")


def model_of(cfg: CLSMConfig, seed: int) -> CLSM:
    if cfg is TINY:
        return tiny_model(seed)
    torch.manual_seed(seed)
    model = CLSM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=[TINY, WIDE], ids=["tiny", "dhead32"])
def parts(request):
    model = model_of(request.param, seed=5)
    _, ref_decoder = export.build_parts(model)
    return model, ref_decoder, native.NativeDecoder(lib, native.pack_decoder(model.decoder))


def test_tokens_equal_reference_and_naive(parts):
    model, ref_decoder, decoder = parts
    with torch.inference_mode():
        for batch in (1, 3):
            x, z = random_tokens(batch, seed=batch), torch.randn(batch, model.cfg.d_z)
            for start, length in CASES:
                ref_tokens, ref_logits = ref_decoder(x, z, start, length)
                tokens, logits = decoder(x, z, start, length, 0.0, None)
                assert torch.equal(tokens, ref_tokens)
                assert torch.equal(tokens, model.decode_naive(x, z, start, length))
                torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)


def test_shared_context_batch_equals_one_by_one(parts):
    """Interpolation: one x, many z (the first layer's self-attention computed once)."""
    model, ref_decoder, decoder = parts
    x, z = random_tokens(1, seed=7), torch.randn(6, model.cfg.d_z)
    with torch.inference_mode():
        tokens, logits = decoder(x, z, 32, 48, 0.0, None)
        assert torch.equal(tokens, ref_decoder(x, z, 32, 48)[0])
        for i in range(6):
            one_tokens, one_logits = decoder(x, z[i:i + 1], 32, 48, 0.0, None)
            assert torch.equal(one_tokens, tokens[i:i + 1])
            assert torch.equal(one_logits, logits[i:i + 1])  # the same sums in the same order


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_equals_reference_with_the_same_noise(parts, top_p):
    model, ref_decoder, decoder = parts
    x, z = random_tokens(2, seed=3), torch.randn(2, model.cfg.d_z)
    u = torch.rand((2, 32, model.cfg.n_out), generator=torch.Generator().manual_seed(0))
    gumbel = -(-u.clamp(1e-9, 1 - 1e-7).log()).log()
    with torch.inference_mode():
        ref = ref_decoder(x, z, 48, 32, 1.5, gumbel, top_p)[0]
        assert torch.equal(decoder(x, z, 48, 32, 1.5, gumbel, top_p)[0], ref)
        assert not torch.equal(ref, ref_decoder(x, z, 48, 32)[0])  # it did sample


def test_native_prior_equals_reference(parts):
    """The Bi-LSTM recurrence in C++ between the scripted trunk's halves."""
    model, _, _ = parts
    ref_latent, _ = export.build_parts(model)
    scripted, _ = export.script_fast_parts(*export.build_fast_parts(model))
    latent = native.NativeLatent(lib, scripted, native.pack_lstm(model.prior.trunk.lstm))
    x = random_tokens(3, seed=2)
    with torch.inference_mode():
        for start, length in CASES:
            for got, want in zip(latent(x, start, length), ref_latent(x, start, length), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_refuses_bad_arguments(parts):
    model, _, decoder = parts
    z = torch.zeros(1, model.cfg.d_z)
    with pytest.raises(ValueError):
        decoder(random_tokens(1), z, 120, 16)  # past the end
    with pytest.raises(ValueError):
        decoder(random_tokens(2), torch.zeros(3, model.cfg.d_z), 0, 16)  # batch mismatch
    packed = native.pack_decoder(model.decoder)
    packed["tensors"]["0.qkv_wt"] = packed["tensors"]["0.qkv_wt"][:, :-1]
    with pytest.raises(ValueError, match="qkv_wt"):
        native.NativeDecoder(lib, packed)


def test_engine_fast_decodes_natively_with_the_same_tokens(folder):
    fast = Engine.load(folder, backend="fast", threads=1, max_batch=4)
    script = Engine.load(folder, backend="fast-script", threads=1, max_batch=4, warm=False)
    assert isinstance(fast.decoder, native.NativeDecoder)
    assert isinstance(fast.latent, native.NativeLatent)
    assert fast.info()["native"] and not script.info()["native"]
    assert not isinstance(script.decoder, native.NativeDecoder)
    for first, last in [(3, 6), (1, 1), (5, 8), (1, 4)]:
        tokens = buffer(first)
        assert (fast.infill(tokens, first, last, seed=3).tokens
                == script.infill(tokens, first, last, seed=3).tokens)
    za, zb = fast.infill(GOOD, 3, 6, seed=1).z, fast.infill(GOOD, 3, 6, seed=2).z
    alphas = [i / 6 for i in range(7)]
    assert ([p.tokens for p in fast.interpolate(GOOD, 3, 6, za, zb, alphas)]
            == [p.tokens for p in script.interpolate(GOOD, 3, 6, za, zb, alphas)])
    for temperature in (1.0, 2.0):
        assert (fast.infill(GOOD, 2, 3, z=za, temperature=temperature, seed=4).tokens
                == script.infill(GOOD, 2, 3, z=za, temperature=temperature, seed=4).tokens)


def test_without_the_library_fast_falls_back_to_torchscript(folder, monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    engine = Engine.load(folder, backend="fast", threads=1, warm=False)
    assert not isinstance(engine.decoder, native.NativeDecoder)


def test_folder_without_native_weights_uses_torchscript(tmp_path, folder):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((folder / export.MANIFEST).read_text())
    for key in ("native_decoder", "native_prior"):
        manifest["files"].pop(manifest["parts"].pop(key))
    for name in manifest["files"]:
        (old / name).write_bytes((folder / name).read_bytes())
    (old / export.MANIFEST).write_text(json.dumps(manifest))
    engine = Engine.load(old, backend="fast", warm=False)
    assert not isinstance(engine.decoder, native.NativeDecoder)
    assert not isinstance(engine.latent, native.NativeLatent)
    reference = Engine.load(folder, backend="fast", warm=False)
    assert engine.infill(GOOD, 4, 5, seed=2).tokens == reference.infill(GOOD, 4, 5, seed=2).tokens


def test_corrupt_native_weights_are_refused(tmp_path, folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((folder / export.MANIFEST).read_text())
    for name in manifest["files"]:
        (bad / name).write_bytes((folder / name).read_bytes())
    packed = torch.load(folder / export.NATIVE_DECODER_FILE, weights_only=True)
    packed["format"] = 99
    torch.save(packed, bad / export.NATIVE_DECODER_FILE)
    manifest["files"][export.NATIVE_DECODER_FILE]["sha256"] = export.sha256_file(
        bad / export.NATIVE_DECODER_FILE)
    (bad / export.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="re-export"):
        Engine.load(bad, backend="fast", warm=False)
