"""engine/fast.py: the fast parts compute what the reference parts (engine/decoding.py) and the
naive full-recompute decoder compute: identical argmax and sampled tokens, close logits."""

from __future__ import annotations

import json

import pytest
import torch

from engine import export
from engine.runtime import Engine
from tests.test_engine import GOOD, buffer
from tests.test_export import TINY, random_tokens, tiny_model

CASES = [(0, 16), (48, 32), (64, 64), (112, 16), (0, 64), (16, 48)]  # (start, length)


@pytest.fixture(scope="module")
def parts():
    model = tiny_model(seed=5)
    ref_latent, ref_decoder = export.build_parts(model)
    fast = export.build_fast_parts(model)
    return model, ref_latent, ref_decoder, fast, export.script_fast_parts(*fast)


@pytest.mark.parametrize("scripted", [False, True])
def test_fast_decoder_tokens_equal_reference_and_naive(parts, scripted):
    model, _, ref_decoder, fast, compiled = parts
    decoder = compiled[1] if scripted else fast[1]
    with torch.inference_mode():
        for batch in (1, 3):
            x, z = random_tokens(batch, seed=batch), torch.randn(batch, TINY.d_z)
            for start, length in CASES:
                ref_tokens, ref_logits = ref_decoder(x, z, start, length)
                tokens, logits = decoder(x, z, start, length, 0.0, None)
                assert torch.equal(tokens, ref_tokens)
                assert torch.equal(tokens, model.decode_naive(x, z, start, length))
                torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)


def test_shared_context_batch_equals_one_by_one(parts):
    """Interpolation: one x, many z; the shared first-layer context is exact."""
    _, _, ref_decoder, _, (_, decoder) = parts
    x, z = random_tokens(1, seed=7), torch.randn(6, TINY.d_z)
    with torch.inference_mode():
        tokens, _ = decoder(x, z, 32, 48, 0.0, None)
        assert torch.equal(tokens, ref_decoder(x, z, 32, 48)[0])
        for i in range(6):
            assert torch.equal(decoder(x, z[i:i + 1], 32, 48, 0.0, None)[0], tokens[i:i + 1])


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_equals_reference_with_the_same_noise(parts, top_p):
    _, _, ref_decoder, _, (_, decoder) = parts
    x, z = random_tokens(2, seed=3), torch.randn(2, TINY.d_z)
    g = torch.Generator().manual_seed(0)
    u = torch.rand((2, 32, TINY.n_out), generator=g).clamp_(1e-9, 1 - 1e-7)
    gumbel = -(-u.log()).log()
    with torch.inference_mode():
        ref = ref_decoder(x, z, 48, 32, 1.5, gumbel, top_p)[0]
        assert torch.equal(decoder(x, z, 48, 32, 1.5, gumbel, top_p)[0], ref)
        assert not torch.equal(ref, ref_decoder(x, z, 48, 32)[0])  # it did sample


def test_fast_latent_equals_reference(parts):
    _, ref_latent, _, fast, (latent, _) = parts
    x, z = random_tokens(3, seed=2), torch.randn(3, TINY.d_z)
    with torch.inference_mode():
        for start, length in CASES:
            for got, want in zip(latent(x, start, length), ref_latent(x, start, length), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            torch.testing.assert_close(fast[0](x, start, length)[0], ref_latent(x, start, length)[0],
                                       rtol=0, atol=1e-5)
        torch.testing.assert_close(latent.flow_forward(z), ref_latent.flow_forward(z), rtol=0, atol=1e-5)
        torch.testing.assert_close(latent.flow_inverse(z), ref_latent.flow_inverse(z), rtol=0, atol=1e-5)


def test_bf16_lstm_prior_is_close(parts):
    """The reduced-precision prior: close, not equal (token agreement is measured on test
    windows by engine.agreement, not asserted here)."""
    model, ref_latent, _, _, _ = parts
    latent, _ = export.script_fast_parts(*export.build_fast_parts(model, lstm_bf16=True))
    x = random_tokens(2, seed=4)
    with torch.inference_mode():
        mean, logvar = latent(x, 32, 64)
        ref_mean, ref_logvar = ref_latent(x, 32, 64)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0.05)
    torch.testing.assert_close(logvar, ref_logvar, rtol=0, atol=0.05)


def test_engine_fast_backend_equals_torchscript(folder):
    fast = Engine.load(folder, backend="fast", threads=1, max_batch=4)
    classic = Engine.load(folder, backend="torchscript", threads=1, max_batch=4, warm=False)
    assert fast.info()["backend"] == "fast"
    for first, last in [(3, 6), (1, 1), (5, 8)]:
        tokens = buffer(first)
        a, b = fast.infill(tokens, first, last, seed=3), classic.infill(tokens, first, last, seed=3)
        assert a.tokens == b.tokens
        assert torch.allclose(torch.from_numpy(a.z), torch.from_numpy(b.z), atol=1e-5)
    za, zb = fast.infill(GOOD, 3, 6, seed=1).z, fast.infill(GOOD, 3, 6, seed=2).z
    alphas = [i / 6 for i in range(7)]
    assert ([p.tokens for p in fast.interpolate(GOOD, 3, 6, za, zb, alphas)]
            == [p.tokens for p in classic.interpolate(GOOD, 3, 6, za, zb, alphas)])
    assert (fast.infill(GOOD, 2, 3, z=za, temperature=2.0, seed=4).tokens
            == classic.infill(GOOD, 2, 3, z=za, temperature=2.0, seed=4).tokens)


def test_folder_without_fast_parts_compiles_them_at_load(tmp_path, folder):
    """A folder exported before issue 12 (no fast parts in its manifest) still runs `fast`."""
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((folder / export.MANIFEST).read_text())
    for key in ("fast_latent", "fast_latent_bf16", "fast_decoder"):
        name = manifest["parts"].pop(key)
        manifest["files"].pop(name)
    for name in manifest["files"]:
        (old / name).write_bytes((folder / name).read_bytes())
    (old / export.MANIFEST).write_text(json.dumps(manifest))
    engine = Engine.load(old, backend="fast", warm=False)
    reference = Engine.load(folder, backend="fast", warm=False)
    assert engine.infill(GOOD, 4, 5, seed=2).tokens == reference.infill(GOOD, 4, 5, seed=2).tokens


def test_agreement_reports_identical_tokens_for_the_same_backend(folder):
    from engine.agreement import agreement

    windows = random_tokens(4, seed=8).numpy()
    result = agreement(folder, windows, 4, "fast", "eager")
    assert result["windows"] == 4 and result["identical_token_share"] == 1.0
    assert result["identical_target_share"] == 1.0
