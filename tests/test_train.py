"""training.train end to end on a tiny config: runs, checkpoints, resumes."""

import json

import torch

from tests.test_evaluate import write_cache
from training import train


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


def test_train_checkpoints_and_resumes(tmp_path):
    data = write_cache(tmp_path / "w.npz")
    config = tiny_config(tmp_path / "tiny.toml")
    out = tmp_path / "run"
    argv = ["--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
            "--threads", "1"]
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
