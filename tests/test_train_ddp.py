"""2-process gloo DDP (torchrun) == one process with the same global batch: losses, val loss, weights;
also with 2 micro-steps per rank, and resumed on 1 process from the 2-rank checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(data_dir, out_dir):
    # global batch 2 x 2 x 32 tokens: 2 micro-steps in one process, 1 micro-step on each of 2 ranks
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--scheme=kromhc", "--n_layer=2",
            "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--total_batch_tokens=128",
            "--eval_tokens=640", "--eval_batch_size=3", "--eval_interval=3", "--log_interval=1", "--max_iters=6",
            "--warmup_iters=2", "--learning_rate=1e-2", "--diag_batch_size=2"]


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    single = tmp_path / "single"
    train.main(args(data_dir, single))
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *args(data_dir, ddp)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    one, two = records(single), records(ddp)
    assert (one[0]["world_size"], one[0]["grad_accum"]) == (1, 2)
    assert (two[0]["world_size"], two[0]["grad_accum"]) == (2, 1)
    t1 = [(r["step"], r["tokens"], r["loss"], r["grad_norm"]) for r in one if r["type"] == "train"]
    t2 = [(r["step"], r["tokens"], r["loss"], r["grad_norm"]) for r in two if r["type"] == "train"]
    assert len(t1) == len(t2) == 6
    for a, b in zip(t1, t2):
        assert a[:2] == b[:2]
        assert a[2] == pytest.approx(b[2], abs=1e-5) and a[3] == pytest.approx(b[3], rel=1e-4)
    e1 = [r for r in one if r["type"] == "eval"]
    e2 = [r for r in two if r["type"] == "eval"]
    assert [e["step"] for e in e1] == [e["step"] for e in e2] == [0, 3, 6]
    for a, b in zip(e1, e2):  # the val windows are the same set whatever the number of ranks
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["val_bpb"] == pytest.approx(b["val_bpb"], abs=1e-5)
    assert e1[0]["val_loss"] == pytest.approx(e2[0]["val_loss"], abs=1e-9)  # identical weights at step 0
    torch.testing.assert_close(torch.tensor(e1[-1]["hres_composite"]), torch.tensor(e2[-1]["hres_composite"]),
                               atol=1e-5, rtol=0)

    c1 = torch.load(single / "ckpt.pt", weights_only=False)
    c2 = torch.load(ddp / "ckpt.pt", weights_only=False)
    assert c1["loader"] == c2["loader"] and len(c2["ranks"]) == 2
    # Two kinds of parameter have a gradient that is zero in exact arithmetic here: the attention
    # key biases (softmax ignores a shift shared by all keys) and, while the streams are still
    # alike, the H_res logits b_res (a doubly stochastic mix of equal streams changes nothing).
    # Their computed gradients are summation roundoff, which differs between one process and an
    # all-reduce, and AdamW turns roundoff below its eps into updates of up to lr per step; so
    # they are held to that bound, everything else to float32 accuracy.
    lr, steps, C = 1e-2, 6, 32
    for k, v in c1["model"].items():
        w = c2["model"][k]
        if k.endswith("c_attn.bias"):
            k_bias = slice(C, 2 * C)
            assert (v[k_bias] - w[k_bias]).abs().max() <= lr * steps, k
            v, w = torch.cat([v[:C], v[2 * C:]]), torch.cat([w[:C], w[2 * C:]])
        if k.endswith("b_res"):
            assert (v - w).abs().max() <= lr * steps, k
            continue
        torch.testing.assert_close(v, w, atol=2e-5, rtol=1e-4, msg=k)


def test_ddp_grad_accum_then_resume_on_one_process(data_dir, tmp_path):
    """2 ranks x 2 micro-steps == 1 process x 4 micro-steps (so a gradient all-reduce on any but
    the last micro-step shows), then the 2-rank checkpoint resumed by 1 process continues the
    window stream exactly: the same losses, val losses and weights as the uninterrupted run."""
    def accum_args(out, *extra):
        # bias=False and plain: no parameter whose exact gradient is 0 (see above), so all weights match
        return args(data_dir, out) + ["--scheme=plain", "--bias=False", "--total_batch_tokens=256",
                                      "--eval_interval=4", "--max_iters=8", "--lr_decay_iters=8", *extra]

    single = tmp_path / "single"
    train.main(accum_args(single))
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *accum_args(ddp, "--max_iters=4")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    half = torch.load(ddp / "ckpt.pt", weights_only=False)
    assert half["step"] == 4 and half["loader"]["consumed_windows"] == 4 * 8
    # each rank seeds its own dropout stream: seed + rank for torch, numpy and random alike
    r0, r1 = (r["rng"] for r in half["ranks"])
    assert not torch.equal(r0["torch"], r1["torch"])
    assert r0["python"] != r1["python"] and not (r0["numpy"][1] == r1["numpy"][1]).all()
    train.main(accum_args(ddp, "--resume"))                                  # 1 process, 4 micro-steps

    one, two = records(single), records(ddp)
    assert (one[0]["world_size"], one[0]["grad_accum"]) == (1, 4)
    assert (two[0]["world_size"], two[0]["grad_accum"]) == (2, 2)
    assert [(r["type"], r["world_size"], r["grad_accum"]) for r in two if r["type"] == "resume"] == [("resume", 1, 4)]
    t1 = [(r["step"], r["loss"], r["grad_norm"]) for r in one if r["type"] == "train"]
    t2 = [(r["step"], r["loss"], r["grad_norm"]) for r in two if r["type"] == "train"]
    assert [t[0] for t in t1] == [t[0] for t in t2] == list(range(1, 9))
    for a, b in zip(t1, t2):
        assert a[1] == pytest.approx(b[1], abs=1e-5) and a[2] == pytest.approx(b[2], rel=1e-4), (a, b)
    e1 = [(r["step"], r["val_loss"]) for r in one if r["type"] == "eval"]
    e2 = [(r["step"], r["val_loss"]) for r in two if r["type"] == "eval"]
    assert [e[0] for e in e1] == [e[0] for e in e2] == [0, 4, 8]
    for a, b in zip(e1, e2):
        assert a[1] == pytest.approx(b[1], abs=1e-5)
    c1 = torch.load(single / "ckpt.pt", weights_only=False)
    c2 = torch.load(ddp / "ckpt.pt", weights_only=False)
    assert c1["loader"] == c2["loader"] and c2["loader"]["consumed_windows"] == 8 * 8
    # Summation roundoff differs between 4 micro-steps in one process and 2 x 2 with an all-reduce.
    # AdamW divides each update by the gradient's own scale, so where a gradient is mostly roundoff
    # (its terms cancel) the two runs move that element differently, by up to lr per step. Such
    # elements are rare (1 in 4,096 in mlp.c_proj, off by 2.4e-5, in this data); every weight is
    # held to that bound and all but 0.1% of each tensor to float32 accuracy (a DDP bug moves most).
    lr, steps = 1e-2, 8
    for k, v in c1["model"].items():
        w = c2["model"][k]
        close = torch.isclose(v, w, atol=2e-5, rtol=1e-4)
        assert close.float().mean() >= 0.999 and (v - w).abs().max() <= lr * steps, (k, (v - w).abs().max())
