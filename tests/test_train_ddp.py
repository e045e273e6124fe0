"""2-process gloo DDP (torchrun) == one process with the same global batch: losses, val loss, weights;
also with 2 micro-steps per rank, and resumed on 1 process from the 2-rank checkpoint.

One process and two ranks compute the same sums in other orders (an all-reduce, other batch shapes),
so every comparison is held to a bound derived from the arithmetic (tests/numerics.py), never to a
measurement:
- a loss (train or val) and the val BPB: the rounding of the model's forward, relative to the loss
  (every token's loss is positive, so the sum of the terms' magnitudes is the loss itself);
- the gradient norm: the rounding of the forward and backward, relative to the norm;
- the gradients themselves: Adam's moments after the first step are (1 - beta1) g and (1 - beta2) g^2
  of the first gradient, computed from identical weights, so they differ by its rounding alone;
- every weight at the end: AdamW moves a weight whose gradient is near its eps (1e-8) or only
  rounding by up to lr in either direction per step (numerics.adamw_divergence); those are the
  weights where the two runs can part, and since their gradient is that small, moving them changes
  the losses above by far less than their bounds.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import numerics
import optim
import train
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 50304  # GPT-2's, padded: the width of the softmax of every loss here
C, HEADS, T = 32, 2, 32
pytestmark = pytest.mark.numerics  # run by .ci/run under every CPU kernel set (ATEN_CPU_CAPABILITY)


def args(data_dir, out_dir):
    # global batch 2 x 2 x 32 tokens: 2 micro-steps in one process, 1 micro-step on each of 2 ranks
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--scheme=kromhc", "--n_layer=2",
            f"--n_head={HEADS}", f"--n_embd={C}", f"--block_size={T}", "--batch_size=2", "--total_batch_tokens=128",
            "--eval_tokens=640", "--eval_batch_size=3", "--eval_interval=1", "--log_interval=1", "--max_iters=6",
            "--warmup_iters=2", "--learning_rate=1e-2", "--diag_batch_size=2", "--keep_checkpoints=8"]


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def bounds(n, tokens_per_step, eval_tokens):
    """(loss, grad norm, first gradient) relative bounds of these 2-layer models (numerics.gpt2_path)."""
    kw = dict(n=n, sinkhorn_iters=0)   # kromhc n = 4 = 2 x 2: its softmaxes are over 2 permutations
    return (numerics.gpt2_path(2, C, HEADS, T, VOCAB, max(tokens_per_step, eval_tokens), backward=False, **kw),
            numerics.gpt2_path(2, C, HEADS, T, VOCAB, tokens_per_step, **kw),
            numerics.gpt2_path(2, C, HEADS, T, VOCAB, tokens_per_step, **kw))


def compare_logs(one, two, rel_loss, rel_norm, steps, eval_steps):
    t1 = [(r["step"], r["tokens"], r["loss"], r["grad_norm"]) for r in one if r["type"] == "train"]
    t2 = [(r["step"], r["tokens"], r["loss"], r["grad_norm"]) for r in two if r["type"] == "train"]
    assert [t[:2] for t in t1] == [t[:2] for t in t2] and [t[0] for t in t1] == list(range(1, steps + 1))
    for a, b in zip(t1, t2):
        numerics.assert_close(b[2], a[2], rel_loss, f"train loss at step {a[0]}")
        numerics.assert_close(b[3], a[3], rel_norm, f"grad norm at step {a[0]}")
    e1 = [r for r in one if r["type"] == "eval"]
    e2 = [r for r in two if r["type"] == "eval"]
    assert [e["step"] for e in e1] == [e["step"] for e in e2] == eval_steps
    for a, b in zip(e1, e2):  # the val windows are the same set whatever the number of ranks
        numerics.assert_close(b["val_loss"], a["val_loss"], rel_loss, f"val loss at step {a['step']}")
        numerics.assert_close(b["val_bpb"], a["val_bpb"], rel_loss, f"val bpb at step {a['step']}")
    return e1, e2


def named_moments(ckpt):
    """{parameter name: (exp_avg, exp_avg_sq)} of a checkpoint's AdamW state (the optimizer's parameter order
    from optim.build on the checkpoint's model)."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    opt = optim.build(model, optim.OptimConfig(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95), "cpu")
    names = {id(p): k for k, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    return {order[i]: (s["exp_avg"], s["exp_avg_sq"]) for i, s in ckpt["optimizer"]["state"].items()}


def compare_first_gradients(c1, c2, rel, exact_zero=None):
    """The first step's gradient of every parameter, read from Adam's moments after it: m = (1 - beta1) g and
    sqrt(v) = sqrt(1 - beta2) |g| carry g's rounding alone. exact_zero: {parameter name suffix: a function
    -> the part of the tensor whose first gradient is not 0 in exact arithmetic}; the rest is the rounding of
    terms this test cannot see, and its weights are held by the Adam bound (compare_weights)."""
    m1, m2 = named_moments(c1), named_moments(c2)
    assert m1.keys() == m2.keys()
    for k in m1:
        part = next((f for suffix, f in (exact_zero or {}).items() if k.endswith(suffix)), lambda t: t)
        numerics.assert_close(part(m2[k][0]), part(m1[k][0]), rel, f"{k}: first gradient (exp_avg)")
        numerics.assert_close(part(m2[k][1]).sqrt(), part(m1[k][1]).sqrt(), rel,
                              f"{k}: first |gradient| (sqrt exp_avg_sq)")


def compare_weights(c1, c2, log):
    """Every weight within what AdamW can put between two runs whose gradients differ by rounding."""
    lrs = [r["lr"] for r in log if r["type"] == "train"]
    bound = numerics.adamw_divergence(lrs, 0.9, 0.95)
    for k, v in c1["model"].items():
        numerics.assert_close(c2["model"][k], v, 1.0, f"weight {k}", scale=bound)


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    single = tmp_path / "single"
    train.main(args(data_dir, single))
    ddp = tmp_path / "ddp"
    # the ranks with the mHC paper's stream recompute: it replays the same ops, so the same bounds hold
    torchrun(*args(data_dir, ddp), "--recompute=streams", "--recompute_group=1")

    one, two = records(single), records(ddp)
    assert (one[0]["recompute"], two[0]["recompute"]) == ("none", "streams")
    assert (one[0]["world_size"], one[0]["grad_accum"]) == (1, 2)
    assert (two[0]["world_size"], two[0]["grad_accum"]) == (2, 1)
    rel_loss, rel_norm, rel_grad = bounds(4, 128, 640)
    e1, e2 = compare_logs(one, two, rel_loss, rel_norm, 6, list(range(7)))
    # The composite H_res of the 4 connections: rounding (relative to its entries, at most 1), plus what the
    # Adam bound lets the H_res logits b_res move (their first gradients are exactly 0, below): an off-identity
    # weight starts at e^-8 of the identity's, so each connection's entries move by at most e^-8 x that.
    lrs = [r["lr"] for r in one if r["type"] == "train"]
    moved = 4 * torch.e ** -8 * numerics.adamw_divergence(lrs, 0.9, 0.95)
    numerics.assert_close(e2[-1]["hres_composite"], e1[-1]["hres_composite"], 1.0, "composite H_res",
                          scale=numerics.chain(*(4,) * 8) + moved)

    c1 = torch.load(single / "ckpt.pt", weights_only=False)
    c2 = torch.load(ddp / "ckpt.pt", weights_only=False)
    assert c1["loader"] == c2["loader"] and len(c2["ranks"]) == 2
    # Two kinds of parameter have a first gradient that is zero in exact arithmetic here: the attention key
    # biases (softmax ignores a shift shared by all keys: the middle third of c_attn.bias) and, while the
    # streams are still equal, the H_res logits (a doubly stochastic mix of equal streams changes nothing):
    # b_res and phi's H_res columns (after the n H_pre and n H_post columns). alpha_res's is exactly 0 too,
    # and computed exactly (phi = 0 at init), so it is compared.
    n = 4
    exact_zero = {"c_attn.bias": lambda t: torch.cat([t[:C], t[2 * C:]]), "b_res": lambda t: t[:0],
                  "phi": lambda t: t[:, :2 * n]}
    compare_first_gradients(torch.load(single / "ckpt_1.pt", weights_only=False),
                            torch.load(ddp / "ckpt_1.pt", weights_only=False), rel_grad, exact_zero)
    compare_weights(c1, c2, one)


def test_ddp_grad_accum_then_resume_on_one_process(data_dir, tmp_path):
    """2 ranks x 2 micro-steps == 1 process x 4 micro-steps (so a gradient all-reduce on any but
    the last micro-step shows), then the 2-rank checkpoint resumed by 1 process continues the
    window stream exactly: the same losses, val losses and weights as the uninterrupted run."""
    def accum_args(out, *extra):
        return args(data_dir, out) + ["--scheme=plain", "--bias=False", "--total_batch_tokens=256",
                                      "--max_iters=8", "--lr_decay_iters=8", *extra]

    single = tmp_path / "single"
    train.main(accum_args(single))
    ddp = tmp_path / "ddp"
    torchrun(*accum_args(ddp, "--max_iters=4"))
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
    rel_loss, rel_norm, rel_grad = bounds(1, 256, 640)
    compare_logs(one, two, rel_loss, rel_norm, 8, list(range(9)))
    c1 = torch.load(single / "ckpt.pt", weights_only=False)
    c2 = torch.load(ddp / "ckpt.pt", weights_only=False)
    assert c1["loader"] == c2["loader"] and c2["loader"]["consumed_windows"] == 8 * 8
    # plain, bias=False: no parameter whose first gradient is 0 in exact arithmetic
    compare_first_gradients(torch.load(single / "ckpt_1.pt", weights_only=False),
                            torch.load(ddp / "ckpt_1.pt", weights_only=False), rel_grad)
    compare_weights(c1, c2, one)
