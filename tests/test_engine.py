"""engine/runtime.py: cached decoding equals the naive decoder; interpolation, variation and
seeds behave as the paper's applications; every bad input gets one EngineError."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import export
from engine import tokens as tk
from engine.runtime import Engine, EngineError, Generation
from tests.test_export import TINY, export_tiny, tiny_model


@pytest.fixture(scope="module", params=["torchscript", "fast", "eager"])
def engine(request, folder) -> Engine:
    return Engine.load(folder, backend=request.param, threads=1, max_batch=4)


def buffer(seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, tk.N_SYMBOLS, tk.SEQ_LEN)]


# (first_bar, last_bar): both-sided, left-only (target at the end), right-only, 1..4 bars
SPANS = [(3, 3), (2, 3), (4, 6), (5, 8), (8, 8), (1, 4), (1, 1)]


@pytest.mark.parametrize("first,last", SPANS)
def test_cached_decode_equals_naive_decode(engine, first, last):
    model = tiny_model()
    start, end = tk.target_steps(first, last)
    for seed in (0, 1):
        tokens = buffer(seed)
        g = engine.infill(tokens, first, last, seed=seed)
        x = torch.tensor([tokens])
        naive = model.decode_naive(x, torch.from_numpy(g.z)[None], start, end - start)
        assert g.tokens == naive[0].tolist()
        assert len(g.tokens) == end - start


def test_generation_fields(engine):
    g = engine.infill(buffer(0), 2, 3, seed=5)
    assert isinstance(g, Generation)
    assert (g.first_bar, g.last_bar) == (2, 3)
    assert g.z.shape == (TINY.d_z,) and g.z.dtype == np.float32
    assert all(0 <= t < tk.N_SYMBOLS for t in g.tokens)
    assert g.latency_ms > 0


def test_target_tokens_in_the_buffer_are_ignored(engine):
    tokens = buffer(2)
    other = list(tokens)
    other[64:96] = [tk.REST] * 32
    assert engine.infill(tokens, 5, 6, seed=3).tokens == engine.infill(other, 5, 6, seed=3).tokens


def test_same_seed_same_result_other_seed_other_z(engine):
    a = engine.infill(buffer(0), 4, 5, seed=11)
    b = engine.infill(buffer(0), 4, 5, seed=11)
    c = engine.infill(buffer(0), 4, 5, seed=12)
    assert a.tokens == b.tokens and np.array_equal(a.z, b.z)
    assert not np.allclose(a.z, c.z)


def test_given_z_is_decoded_as_is(engine):
    a = engine.infill(buffer(0), 4, 5, seed=11)
    again = engine.infill(buffer(0), 4, 5, z=a.z)
    assert again.tokens == a.tokens and np.array_equal(again.z, a.z)


def test_temperature_sampling_noise_belongs_to_the_context(engine):
    """Sampling's noise depends on the context and target only, so what differs between
    candidates is z: same z, same tokens whatever the seed; another context, other noise."""
    tokens = buffer(1)
    z = engine.infill(tokens, 3, 4, seed=0).z
    argmax = engine.infill(tokens, 3, 4, z=z)
    assert engine.infill(tokens, 3, 4, z=z, temperature=0.0).tokens == argmax.tokens
    hot = [engine.infill(tokens, 3, 4, z=z, temperature=5.0, seed=s).tokens for s in (1, 2)]
    assert hot[0] == hot[1]
    assert hot[0] != argmax.tokens  # 32 steps at a high temperature: practically never equal
    other_context = list(tokens)
    other_context[0] = (other_context[0] + 1) % 30
    assert engine.infill(other_context, 3, 4, z=z, temperature=5.0).tokens != hot[0]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_default_sampling_keeps_variation_and_interpolation_on_their_candidates(folder, top_p):
    hot = Engine.load(folder, backend="eager", max_batch=4, temperature=1.5, top_p=top_p)
    assert hot.info()["decoding"].startswith("temperature=1.5")
    tokens = buffer(2)
    a, b = hot.infill(tokens, 5, 6, seed=1), hot.infill(tokens, 5, 6, seed=2)
    assert a.tokens != hot.infill(tokens, 5, 6, seed=1, temperature=0.0).tokens  # it samples
    assert hot.vary(tokens, 5, 6, a.z, 0.0, seed=3).tokens == a.tokens
    ends = hot.interpolate(tokens, 5, 6, a.z, b.z, [0.0, 1.0])
    assert [g.tokens for g in ends] == [a.tokens, b.tokens]


def test_bad_default_decoding_is_an_engine_error(folder):
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(EngineError):
            Engine.load(folder, backend="eager", warm=False, **bad)


def test_interpolation_endpoints_and_chunks(engine):
    tokens = buffer(3)
    a = engine.infill(tokens, 5, 6, seed=1)
    b = engine.infill(tokens, 5, 6, seed=2)
    alphas = [i / 6 for i in range(7)]  # 7 points > max_batch 4: two chunks
    points = engine.interpolate(tokens, 5, 6, a.z, b.z, alphas)
    assert len(points) == len(alphas)
    assert points[0].tokens == a.tokens and points[-1].tokens == b.tokens
    assert np.array_equal(points[0].z, a.z) and np.array_equal(points[-1].z, b.z)
    for p in points[1:-1]:  # each point decodes alone to the same tokens (batching is exact)
        assert engine.infill(tokens, 5, 6, z=p.z).tokens == p.tokens
    mid = engine.interpolate(tokens, 5, 6, a.z, b.z, [0.5])[0]
    assert np.allclose(mid.z, points[3].z, atol=1e-5)


def test_interpolation_follows_the_flow(engine):
    """z(alpha) is a straight line in w = f(z), not in z."""
    tokens = buffer(3)
    a, b = engine.infill(tokens, 5, 6, seed=1), engine.infill(tokens, 5, 6, seed=2)
    mid = engine.interpolate(tokens, 5, 6, a.z, b.z, [0.5])[0]
    with torch.inference_mode():
        w = engine.latent.flow_forward(torch.from_numpy(np.stack([a.z, b.z, mid.z])))
    assert torch.allclose(w[2], (w[0] + w[1]) / 2, atol=1e-4)


def test_variation(engine):
    tokens = buffer(4)
    g = engine.infill(tokens, 2, 2, seed=9)
    same = engine.vary(tokens, 2, 2, g.z, 0.0, seed=1)
    assert same.tokens == g.tokens and np.array_equal(same.z, g.z)
    v1 = engine.vary(tokens, 2, 2, g.z, 0.8, seed=1)
    v2 = engine.vary(tokens, 2, 2, g.z, 0.8, seed=1)
    v3 = engine.vary(tokens, 2, 2, g.z, 0.8, seed=2)
    assert v1.tokens == v2.tokens and np.array_equal(v1.z, v2.z)
    assert not np.allclose(v1.z, g.z) and not np.allclose(v1.z, v3.z)


def test_calls_from_two_threads_are_serialised(engine):
    tokens = buffer(5)
    expected = engine.infill(tokens, 3, 6, seed=4).tokens
    results: list[list[int]] = []

    def work() -> None:
        for _ in range(3):
            results.append(engine.infill(tokens, 3, 6, seed=4).tokens)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 6


def test_info(engine):
    info = engine.info()
    assert info["backend"] in ("torchscript", "fast", "eager")
    assert info["name"] == "tiny" and info["d_z"] == TINY.d_z and info["params"] > 0


Z = np.zeros(TINY.d_z, dtype=np.float32)
GOOD = buffer(0)

BAD_CALLS = {
    "short buffer": lambda e: e.infill(GOOD[:100], 1, 1),
    "token 32": lambda e: e.infill(GOOD[:-1] + [tk.START], 1, 1),
    "negative token": lambda e: e.infill([-1] + GOOD[1:], 1, 1),
    "string tokens": lambda e: e.infill("abc", 1, 1),
    "float token": lambda e: e.infill([0.5] + GOOD[1:], 1, 1),
    "bar 0": lambda e: e.infill(GOOD, 0, 1),
    "bar 9": lambda e: e.infill(GOOD, 8, 9),
    "reversed bars": lambda e: e.infill(GOOD, 4, 3),
    "5 bars": lambda e: e.infill(GOOD, 1, 5),
    "float bar": lambda e: e.infill(GOOD, 1.5, 2),
    "bad seed": lambda e: e.infill(GOOD, 1, 1, seed="x"),
    "negative temperature": lambda e: e.infill(GOOD, 1, 1, temperature=-1.0),
    "nan temperature": lambda e: e.infill(GOOD, 1, 1, temperature=float("nan")),
    "z wrong size": lambda e: e.infill(GOOD, 1, 1, z=np.zeros(3)),
    "z nan": lambda e: e.infill(GOOD, 1, 1, z=np.full(TINY.d_z, np.nan)),
    "alpha 1.5": lambda e: e.interpolate(GOOD, 1, 1, Z, Z, [0.0, 1.5]),
    "alpha -0.1": lambda e: e.interpolate(GOOD, 1, 1, Z, Z, [-0.1]),
    "no alphas": lambda e: e.interpolate(GOOD, 1, 1, Z, Z, []),
    "alphas not a list": lambda e: e.interpolate(GOOD, 1, 1, Z, Z, 0.5),
    "z_b wrong size": lambda e: e.interpolate(GOOD, 1, 1, Z, Z[:4], [0.5]),
    "negative delta": lambda e: e.vary(GOOD, 1, 1, Z, -0.5),
    "delta string": lambda e: e.vary(GOOD, 1, 1, Z, "big"),
    "vary 5 bars": lambda e: e.vary(GOOD, 2, 6, Z, 0.5),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_engine_error_and_engine_goes_on(engine, name):
    with pytest.raises(EngineError) as err:
        BAD_CALLS[name](engine)
    assert str(err.value)  # a message that says what to fix
    assert len(engine.infill(GOOD, 3, 4, seed=1).tokens) == 32


def test_error_messages_name_the_problem(engine):
    with pytest.raises(EngineError, match="128 tokens"):
        engine.infill(GOOD[:10], 1, 1)
    with pytest.raises(EngineError, match="0..31"):
        engine.infill([40] * 128, 1, 1)
    with pytest.raises(EngineError, match="at most 4 bars"):
        engine.infill(GOOD, 2, 6)
    with pytest.raises(EngineError, match="alpha"):
        engine.interpolate(GOOD, 1, 1, Z, Z, [2.0])


def _corrupt(folder: Path, how: str) -> None:
    manifest_path = folder / export.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if how == "missing manifest":
        manifest_path.unlink()
    elif how == "bad json":
        manifest_path.write_text("{not json")
    elif how == "missing file":
        (folder / export.DECODER_FILE).unlink()
    elif how == "sha mismatch":
        with open(folder / export.DECODER_FILE, "ab") as f:
            f.write(b"junk")
    elif how in ("torchscript garbage", "eager garbage"):
        name = export.DECODER_FILE if how.startswith("torchscript") else export.EAGER_FILE
        (folder / name).write_bytes(b"this is not a model")
        manifest["files"][name]["sha256"] = export.sha256_file(folder / name)
        manifest_path.write_text(json.dumps(manifest))
    elif how == "old version":
        manifest["format_version"] = 0
        manifest_path.write_text(json.dumps(manifest))
    elif how == "other vocab":
        manifest["vocab"]["size"] = 99
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["missing manifest", "bad json", "missing file", "sha mismatch",
                                 "torchscript garbage", "eager garbage", "old version",
                                 "other vocab"])
def test_corrupt_model_folder(tmp_path, how):
    folder = tmp_path / "m"
    export_tiny(folder)
    _corrupt(folder, how)
    backend = "eager" if how == "eager garbage" else "torchscript"
    with pytest.raises(EngineError, match="re-export|vocabulary"):
        Engine.load(folder, backend=backend, warm=False)


def test_missing_folder_and_bad_options(tmp_path, folder):
    with pytest.raises(EngineError, match="does not exist"):
        Engine.load(tmp_path / "nowhere")
    with pytest.raises(EngineError, match="backend"):
        Engine.load(folder, backend="onnx")
    with pytest.raises(EngineError, match="device"):
        Engine.load(folder, device="tpu9")
    with pytest.raises(EngineError, match=">= 1"):
        Engine.load(folder, threads=0)


def test_fp16_folder_runs_in_float32(tmp_path):
    export_tiny(tmp_path / "half", fp16=True)
    engine = Engine.load(tmp_path / "half", warm=False)
    g = engine.infill(GOOD, 2, 3, seed=1)
    assert len(g.tokens) == 32 and g.z.dtype == np.float32
