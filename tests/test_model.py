"""The CLSM's parts behave as the paper has them: decoder mask, flow, loss, checkpoints."""

import numpy as np
import pytest
import torch

from engine import tokens as tk
from engine.layers import RelativeAttention
from engine.model import CLSM, CLSMConfig, decoder_mask, mix_into_target

TINY = CLSMConfig(d_model=32, d_ff=64, n_heads=4, d_lstm=32, d_mlp=64, d_z=16, d_flow=32,
                  dropout=0.0)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def random_tokens(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tk.N_SYMBOLS, (batch, tk.SEQ_LEN), generator=g)


def test_default_config_is_the_papers():
    cfg = CLSMConfig()
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_layers) == (128, 256, 8, 2)
    assert (cfg.d_lstm, cfg.d_mlp, cfg.d_z, cfg.l_z, cfg.n_flow, cfg.d_flow) == (
        256, 512, 128, 4, 4, 256)
    assert cfg.dropout == 0.1


def test_mask_segments():
    allowed = decoder_mask(torch.tensor([16]), 32, 129)[0]  # targets at decoder positions 17..48
    target = list(range(17, 49))
    context = [p for p in range(129) if p not in target]
    assert not allowed[np.ix_(context, target)].any()  # context never sees the target
    assert allowed[np.ix_(context, context)].all()  # but sees all context, right included
    assert allowed[np.ix_(target, context)].all()
    sub = allowed[np.ix_(target, target)]
    assert torch.equal(sub, torch.tril(torch.ones(32, 32, dtype=torch.bool)))


@pytest.mark.parametrize("start,length", [(0, 16), (32, 64), (64, 64), (112, 16)])
def test_decoder_is_causal_over_the_target(start, length):
    model = CLSM(TINY).eval()
    x = random_tokens(1)
    z = torch.randn(1, TINY.d_z)
    starts = torch.tensor([start])
    base = model.decoder(x, z, starts, length)[0]  # (129, n_out)
    i = start + length // 2  # change target tokens at and after x_i
    x2 = x.clone()
    x2[0, i:start + length] = (x2[0, i:start + length] + 1) % tk.N_SYMBOLS
    changed = model.decoder(x2, z, starts, length)[0]
    # logits predicting x_t for t <= i depend only on x_<t: decoder positions 0..i
    target_and_before = list(range(0, i + 1))
    context_after = list(range(start + length + 1, 129))
    keep = target_and_before + context_after
    torch.testing.assert_close(changed[keep], base[keep], rtol=0, atol=1e-5)
    assert not torch.allclose(changed[i + 1:start + length], base[i + 1:start + length])

    x3 = x.clone()  # changing the context changes the target's logits
    ctx = start - 1 if start > 0 else start + length
    x3[0, ctx] = (x3[0, ctx] + 5) % tk.N_SYMBOLS
    moved = model.decoder(x3, z, starts, length)[0]
    assert not torch.allclose(moved[start:start + length], base[start:start + length])


def test_prior_ignores_target_tokens():
    model = CLSM(TINY).eval()
    x = random_tokens(2)
    start = torch.tensor([32, 48])
    x2 = x.clone()
    x2[0, 32:64] = tk.REST
    x2[1, 48:80] = tk.HOLD
    for a, b in zip(model.prior(x, start, 32), model.prior(x2, start, 32), strict=True):
        torch.testing.assert_close(a, b)


def test_flow_inverts_and_logdet_matches_autograd():
    model = CLSM(TINY)
    flow = model.prior.flow
    with torch.no_grad():  # leave the identity initialisation so the test means something
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(5, TINY.d_z, dtype=torch.float64)
    flow = flow.double()
    w, logdet = flow(z)
    torch.testing.assert_close(flow.inverse(w), z, rtol=0, atol=1e-5)
    assert not torch.allclose(w, z)
    for k in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], z[k])
        torch.testing.assert_close(logdet[k], torch.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-6)


def test_relative_attention_skew_matches_gather():
    attn = RelativeAttention(CLSMConfig(d_model=32, n_heads=4, max_rel=128))
    for length in (5, 128, 129):
        q = torch.randn(2, 4, length, 8)
        pos = torch.arange(length)
        torch.testing.assert_close(attn.relative_logits_square(q),
                                   attn.relative_logits(q, pos, pos))


def test_loss_falls_on_a_tiny_dataset():
    torch.manual_seed(0)
    model = CLSM(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = random_tokens(8, seed=3)
    start = torch.tensor([0, 16, 32, 48, 64, 0, 16, 32])
    losses = []
    for _ in range(40):
        loss, parts = model(x, start, 32, beta=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["rec"])
        assert set(parts) == {"rec", "kl", "acc"}
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_mix_into_target_replaces_target_tokens_only():
    x = random_tokens(4, seed=1)
    guesses = (x + 1) % tk.N_SYMBOLS  # every guess differs from its token
    start = torch.tensor([0, 16, 48, 64])
    assert torch.equal(mix_into_target(x, guesses, start, 32, 0.0), x)
    every = mix_into_target(x, guesses, start, 32, 1.0)
    half = mix_into_target(x, guesses, start, 32, 0.5)
    for b, s in enumerate(start.tolist()):
        target = slice(s, s + 32)
        assert torch.equal(every[b, target], guesses[b, target])
        outside = torch.ones(tk.SEQ_LEN, dtype=torch.bool)
        outside[target] = False
        assert torch.equal(every[b, outside], x[b, outside])
        assert torch.equal(half[b, outside], x[b, outside])
    swapped = (half != x).float().sum() / (4 * 32)
    assert 0.3 < swapped < 0.7


def record_decoder_calls(model: CLSM, monkeypatch) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """(read, logits) of every decoder pass the model makes from now on."""
    calls = []
    plain = model.decoder.forward

    def recording(x, z, start, length, read=None):
        out = plain(x, z, start, length, read=read)
        calls.append((read, out))
        return out

    monkeypatch.setattr(model.decoder, "forward", recording)
    return calls


def test_own_guesses_feed_the_decoder_its_teacher_forced_argmax(monkeypatch):
    model = CLSM(TINY).eval()
    x, start = random_tokens(3, seed=2), torch.tensor([0, 32, 64])
    calls = record_decoder_calls(model, monkeypatch)
    with torch.no_grad():
        teacher, _ = model(x, start, 32, beta=0.01)
        assert len(calls) == 1 and calls[0][0] is None  # the paper's loss: one teacher-forced pass
        calls.clear()
        own, parts = model(x, start, 32, beta=0.01, own_guesses=1.0)
    (first_read, first_out), (read, _) = calls
    assert first_read is None  # the guesses come from a teacher-forced pass with the same z
    guesses = first_out[:, :-1].argmax(-1)
    assert torch.equal(read, mix_into_target(x, guesses, start, 32, 1.0))
    assert not torch.equal(read, x) and torch.isfinite(own) and set(parts) == {"rec", "kl", "acc"}
    assert not torch.isclose(own, teacher)


def test_word_dropout_has_the_decoder_read_p_for_target_tokens(monkeypatch):
    model = CLSM(TINY).eval()
    x, start = random_tokens(3, seed=4), torch.tensor([0, 32, 64])
    calls = record_decoder_calls(model, monkeypatch)
    with torch.no_grad():
        teacher, _ = model(x, start, 32, beta=0.01)
        dropped, parts = model(x, start, 32, beta=0.01, word_dropout=1.0)
    assert calls[0][0] is None and len(calls) == 2  # one decoder pass each
    read = calls[1][0]
    for b, s in enumerate(start.tolist()):
        assert torch.all(read[b, s:s + 32] == tk.POS)  # every target token read as `p`
        outside = torch.ones(tk.SEQ_LEN, dtype=torch.bool)
        outside[s:s + 32] = False
        assert torch.equal(read[b, outside], x[b, outside])  # the context as it is
    assert torch.isfinite(dropped) and not torch.isclose(dropped, teacher)
    assert set(parts) == {"rec", "kl", "acc"}


def test_beta_moves_the_encoder_but_not_the_priors_adam_step():
    """Why the beta grid already covers KL balancing (configs/cpu-beta0.0005.toml): the prior and
    flow share no parameter with the encoder or decoder and learn from the KL term alone, so Adam
    (which divides by the gradient's scale) takes the same step for them at any beta, up to its
    eps; beta only sets how hard the encoder is pulled towards the prior."""
    def one_adam_step(beta: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = CLSM(TINY)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(1)  # the same z sample for both betas
        loss, _ = model(random_tokens(8, seed=3), torch.tensor([16] * 8), 32, beta=beta)
        loss.backward()
        grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
        opt.step()
        return {k: v.detach() - before[k] for k, v in model.named_parameters()}, grads

    (high, grad), (low, _) = one_adam_step(1.0), one_adam_step(0.25)
    prior = [k for k in high if k.startswith("prior.")]
    encoder = [k for k in high if k.startswith("encoder.")]
    assert prior and encoder
    for k in prior:
        # where the gradient is far above Adam's eps (1e-8): this random model also has
        # gradients of 1e-13 (an attention key bias, exactly 0 but for rounding)
        real = grad[k].abs() > 1e-5
        torch.testing.assert_close(high[k][real], low[k][real], atol=1e-5, rtol=0.0)  # lr 1e-3
    moved = max((high[k] - low[k]).abs().max().item() for k in encoder)
    assert moved > 1e-4, moved  # the encoder's step is not the same: beta changed its balance


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    from training.train import load_checkpoint, save_checkpoint

    model = CLSM(TINY).eval()
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, step=7, config={"model": {}, "train": {}}, metrics={})
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["step"] == 7
    loaded = CLSM.from_checkpoint(ckpt).eval()
    x, z = random_tokens(2), torch.randn(2, TINY.d_z)
    start = torch.tensor([16, 32])
    torch.testing.assert_close(loaded.decoder(x, z, start, 32), model.decoder(x, z, start, 32),
                               rtol=0, atol=0)
    torch.testing.assert_close(loaded.prior(x, start, 32), model.prior(x, start, 32), rtol=0, atol=0)
