"""data_seed: the data order has its own seed, so runs of different seeds see the same batches (on one
process or two), a resumed run continues them exactly, and a resume with other seeds is refused."""

import os
import subprocess
import sys

import pytest
import torch

import train
from errors import ConfigError
from conftest import read_log, tiny_args
from data.loader import TrainLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A train.py run under torchrun that saves every batch its rank drew (the loader is the real one).
RECORDER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
from data.loader import TrainLoader
seen, draw = [], TrainLoader.next_batch
def next_batch(self):
    x, y = draw(self)
    seen.append(x.clone())
    return x, y
TrainLoader.next_batch = next_batch
import train
train.main(sys.argv[1:])
torch.save(seen, os.path.join({out!r}, "batches_rank" + os.environ["RANK"] + ".pt"))
"""


def run(data_dir, out, *extra, monkeypatch):
    """A 4-step run; -> (the x of every batch it drew, its log)."""
    seen, draw = [], TrainLoader.next_batch

    def next_batch(self):
        x, y = draw(self)
        seen.append(x.clone())
        return x, y
    monkeypatch.setattr(TrainLoader, "next_batch", next_batch)
    train.main(tiny_args(data_dir, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", *extra))
    monkeypatch.setattr(TrainLoader, "next_batch", draw)
    return seen, read_log(out)


def test_data_seed_fixes_the_batches_across_seeds_processes_and_resume(data_dir, tmp_path, monkeypatch):
    a, log_a = run(data_dir, tmp_path / "a", "--seed=1", "--data_seed=7", monkeypatch=monkeypatch)
    b, log_b = run(data_dir, tmp_path / "b", "--seed=2", "--data_seed=7", monkeypatch=monkeypatch)
    c, log_c = run(data_dir, tmp_path / "c", "--seed=1", monkeypatch=monkeypatch)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))  # other init, the same batches
    assert not any(torch.equal(x, y) for x, y in zip(a, c))               # data_seed defaults to seed
    assert log_a[1]["val_loss"] != log_b[1]["val_loss"]                   # the seed still sets the init
    assert (log_a[0]["seed"], log_a[0]["data_seed"], log_c[0]["data_seed"]) == (1, 7, 1)
    assert [log[0]["wandb_run_name"] for log in (log_a, log_c)] == ["default-plain-n1-s1-d7", "default-plain-n1-s1"]
    assert log_a[0]["setting"] == log_b[0]["setting"] == log_c[0]["setting"]  # seeds of one setting
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    assert (ckpt["config"]["seed"], ckpt["config"]["data_seed"], ckpt["loader"]["seed"]) == (1, 7, 7)

    # two processes (gloo), one sequence each per step: rank 0's rows then rank 1's are run a's batch
    rec = tmp_path / "record.py"
    rec.write_text(RECORDER.format(repo=REPO, out=str(tmp_path)))
    ddp = tiny_args(data_dir, tmp_path / "ddp", "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2",
                    "--seed=3", "--data_seed=7", "--batch_size=2", "--wandb_log=True", "--wandb_mode=offline")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(rec),
                        *ddp], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs to wandb
    r0, r1 = (torch.load(tmp_path / f"batches_rank{r}.pt") for r in (0, 1))
    assert len(r0) == len(r1) == 4
    assert all(torch.equal(torch.cat([x0, x1]), x) for x0, x1, x in zip(r0, r1, a))

    # run b in two halves: the same batches and losses as without the stop
    half, _ = run(data_dir, tmp_path / "d", "--seed=2", "--data_seed=7", "--max_iters=2", monkeypatch=monkeypatch)
    for key, value, other in (("data_seed", 8, 7), ("seed", 5, 2)):
        bad = ["--seed=2", "--data_seed=7", "--resume", f"--{key}={value}"]
        why = f"config key '{key}' is {value} but the checkpoint's run used {other}.*--{key}={other}"
        with pytest.raises(ConfigError, match=why):
            run(data_dir, tmp_path / "d", *bad, monkeypatch=monkeypatch)
    rest, log_d = run(data_dir, tmp_path / "d", "--seed=2", "--data_seed=7", "--resume", monkeypatch=monkeypatch)
    assert all(torch.equal(x, y) for x, y in zip(half + rest, b)) and len(half + rest) == 4
    losses = [[(r["step"], r["loss"]) for r in log if r["type"] == "train"] for log in (log_b, log_d)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [1, 2, 3, 4]
    # exact: the resumed run repeats the same ops on the same weights, batches and optimizer state
    assert [v for _, v in losses[1]] == [v for _, v in losses[0]]
