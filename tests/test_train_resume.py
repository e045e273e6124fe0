"""train.py checkpoints: exact resume (bit for bit on CPU), resume errors, and a NaN loss stopping
the run while keeping the last good checkpoint."""


import pytest
import torch

import model as model_module
import train
from errors import ConfigError
from conftest import read_log, tiny_args
from errors import Diverged


def test_exact_resume(data_dir, tmp_path):
    """Stop at step 4 and resume to 8: the same losses (and their EMA), weights and val loss as an uninterrupted
    run, bit for bit."""
    common = ["--scheme=kromhc", "--dropout=0.1", "--eval_interval=4", "--log_interval=1"]
    full = tmp_path / "full"
    train.main(tiny_args(data_dir, full, *common, "--max_iters=8"))
    part = tmp_path / "part"
    train.main(tiny_args(data_dir, part, *common, "--max_iters=4", "--lr_decay_iters=8"))
    train.main(tiny_args(data_dir, part, *common, "--max_iters=8", "--resume"))

    def records(out):
        return [(r["type"], r["step"], r.get("loss"), r.get("loss_ema"), r.get("grad_norm"), r.get("val_loss"),
                 r.get("val_bpb"))
                for r in read_log(out) if r["type"] in ("train", "eval")]

    assert records(part) == records(full)  # no duplicate eval at the resume step either
    assert [r["type"] for r in read_log(part)].count("resume") == 1
    a = torch.load(full / "ckpt.pt", weights_only=False)
    b = torch.load(part / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="'resume'.*no checkpoint"):
        train.main(tiny_args(data_dir, tmp_path / "none", "--resume"))
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_iters=5"))
    with pytest.raises(ConfigError, match="n_layer"):
        train.main(tiny_args(data_dir, out, "--max_iters=10", "--resume", "--n_layer=3"))


def test_nan_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch):
    original = model_module.GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, reduction="mean"):
        logits, loss = original(self, idx, targets, reduction)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] >= 7:  # the 7th training step goes bad
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)
    out = tmp_path / "nan"
    with pytest.raises(Diverged, match=r"step 7: training loss is nan.*ckpt.pt \(step 5\)"):
        train.main(tiny_args(data_dir, out, "--scheme=hc", "--eval_interval=5"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 5
    last = read_log(out)[-1]
    assert last["type"] == "error" and last["step"] == 7 and "nan" in last["message"]
