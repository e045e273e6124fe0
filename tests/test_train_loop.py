"""What train.py's loop hands the optimizer, checked through train.main on tiny models against
values the tests derive themselves: the scheduled lr in every param group at every step, the
gradient norm after clipping, weight decay and its groups, bf16 autocast, checkpoint=False, and
the MFU peak table shared with scripts/bench.py."""

import math
import os
import re

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

import model as model_module
import numerics
import train
from conftest import read_log, tiny_args
import optim
import common


@pytest.fixture
def steps(monkeypatch):
    """Records, at every optimizer.step() of the run: each group's lr and weight decay, the ids of
    its parameters, and the global gradient norm the step is about to apply; the largest gradient
    already present when a training forward begins; and the GPT whose optim.build built
    the optimizer (for the parameter names)."""
    seen = {"steps": [], "leftover": [], "model": None}

    def pre_hook(optimizer, args, kwargs):
        grads = [p.grad.double() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen["steps"].append({
            "lr": [g["lr"] for g in optimizer.param_groups],
            "wd": [g["weight_decay"] for g in optimizer.param_groups],
            "betas": [g.get("betas") for g in optimizer.param_groups],   # None for Muon's groups
            "eps": [g.get("eps") for g in optimizer.param_groups],
            "ids": [{id(p) for p in g["params"]} for g in optimizer.param_groups],
            "grad_norm": torch.sqrt(sum((g * g).sum() for g in grads)).item(),
        })

    original = optim.build

    def build(model, *a, **k):
        seen["model"] = model
        return original(model, *a, **k)

    def forward_pre_hook(module, args):  # gradient left over from earlier steps when a step begins
        if isinstance(module, model_module.GPT) and module.training:
            seen["leftover"].append(max((p.grad.abs().max().item() for p in module.parameters()
                                         if p.grad is not None), default=0.0))

    monkeypatch.setattr(optim, "build", build)
    handles = [register_optimizer_step_pre_hook(pre_hook), register_module_forward_pre_hook(forward_pre_hook)]
    yield seen
    for h in handles:
        h.remove()


def expected_lr(step, lr, warmup, decay_iters, min_ratio, schedule, warmdown_frac=0.2):
    """The schedule as documented in train.py's DEFAULTS, written out for the 0-based step."""
    min_lr = min_ratio * lr
    if step < warmup:                       # linear warmup: lr/warmup, 2 lr/warmup, ..., lr
        return lr * (step + 1) / warmup
    if step >= decay_iters:                 # after the decay: min_lr for good
        return min_lr
    if schedule == "cosine":                # half a cosine from lr (at warmup) to min_lr (at decay_iters)
        t = (step - warmup) / (decay_iters - warmup)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2
    n_down = round(warmdown_frac * decay_iters)   # linear: hold lr, then a straight line to min_lr
    start = decay_iters - n_down
    return lr if step < start else lr - (lr - min_lr) * (step - start) / n_down


EXPECTED_DECAY = re.compile(r"transformer\.(wte|wpe)\.weight|.*\.(c_attn|c_fc|c_proj)\.weight"  # 2-D weights
                            r"|.*\.hc_(attn|mlp)\.(phi|W_m|W_r|W_beta)")                        # dynamic projections


def check_groups(seen, weight_decay, scheme):
    """Decayed: the embeddings and Linear weights and the connections' dynamic projections; not
    decayed: LayerNorms, biases, and the connections' static coefficients and gates (A_r is 2-D)."""
    names = {id(p): n for n, p in seen["model"].named_parameters()}
    decay = {n for n in names.values() if EXPECTED_DECAY.fullmatch(n)}
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"} <= decay
    if scheme == "hc":
        assert "transformer.h.1.hc_mlp.W_r" in decay and "transformer.h.1.hc_mlp.A_r" not in decay
    if scheme == "mhc":
        assert "transformer.h.0.hc_attn.phi" in decay and "transformer.h.0.hc_attn.b_res" not in decay
    for s in seen["steps"]:
        groups = {wd: {names[i] for i in ids} for wd, ids in zip(s["wd"], s["ids"])}
        assert set(groups) == {weight_decay, 0.0}, s["wd"]
        assert groups[weight_decay] == decay
        assert groups[0.0] == set(names.values()) - decay


def check_lrs(seen, log, **schedule):
    trains = [r for r in log if r["type"] == "train"]
    assert len(seen["steps"]) == len(trains) == 8
    assert seen["leftover"] == [0.0] * 8     # one micro-step per step: each starts from no gradient
    for step, (s, r) in enumerate(zip(seen["steps"], trains)):
        want = expected_lr(step, **schedule)   # float64 on both sides, a few operations: 1e-16 relative
        assert s["lr"] == pytest.approx([want] * len(s["lr"]), rel=1e-12), step   # every group, this step
        assert r["lr"] == pytest.approx(want, rel=1e-12), step


def norm_rounding(seen):
    """The relative rounding of torch's fp32 gradient norm (clip_grad_norm_): each tensor's sum of squares, then
    the sum over the tensors, halved by the square root, and the squares' and root's own roundings; the hook's
    float64 norm of the same gradients is exact beside it. The deterministic gamma, not gamma_p: the embedding's
    1.6M squares are of one sign and mostly far below the running sum, so their roundings do not cancel but
    all lose (stagnation; measured 3.5e-4 at a step, beyond gamma_p's 3e-4)."""
    numels = [p.numel() for p in seen["model"].parameters()]
    return (numerics.gamma(max(numels)) + numerics.gamma(len(numels))) / 2 + 2 * numerics.u()


@pytest.mark.numerics
def test_cosine_schedule_clipping_and_decay_groups_reach_the_optimizer(data_dir, tmp_path, steps):
    """Cosine with warmup 2, decay over 6 steps to 0.2 x lr, then 2 steps at min lr; clipping at
    0.05 (well below the raw norms); weight decay 0.37 on exactly the expected parameters."""
    out = tmp_path / "cos"
    train.main(tiny_args(data_dir, out, "--scheme=mhc", "--max_iters=8", "--warmup_iters=2", "--lr_decay_iters=6",
                         "--min_lr_ratio=0.2", "--grad_clip=0.05", "--weight_decay=0.37", "--eval_interval=100"))
    log = read_log(out)
    check_lrs(steps, log, lr=1e-2, warmup=2, decay_iters=6, min_ratio=0.2, schedule="cosine")
    for s, r in zip(steps["steps"], (r for r in log if r["type"] == "train")):
        assert r["grad_norm"] > 0.05                            # the logged norm is the one before clipping
        # the step applies the clipped gradient: 0.05 N / (N' + 1e-6), N' the fp32 norm, then the scaling's and
        # each product's roundings (2 u)
        rel = norm_rounding(steps) + 1e-6 / r["grad_norm"] + 2 * numerics.u()
        numerics.assert_close(s["grad_norm"], 0.05, rel, f"clipped norm at step {r['step']}")
    check_groups(steps, 0.37, "mhc")


@pytest.mark.numerics
def test_linear_warmdown_unclipped_and_hc_decay_groups(data_dir, tmp_path, steps):
    """Linear schedule: warmup 2, hold, warm down over the last half of 8 steps; grad_clip=0
    leaves the gradient as it is (the step applies the logged norm)."""
    out = tmp_path / "lin"
    train.main(tiny_args(data_dir, out, "--scheme=hc", "--max_iters=8", "--lr_schedule=linear", "--warmdown_frac=0.5",
                         "--min_lr_ratio=0.1", "--grad_clip=0", "--weight_decay=0.05", "--eval_interval=100"))
    log = read_log(out)
    check_lrs(steps, log, lr=1e-2, warmup=2, decay_iters=8, min_ratio=0.1, schedule="linear", warmdown_frac=0.5)
    assert expected_lr(7, 1e-2, 2, 8, 0.1, "linear", 0.5) < expected_lr(3, 1e-2, 2, 8, 0.1, "linear", 0.5) == 1e-2
    for s, r in zip(steps["steps"], (r for r in log if r["type"] == "train")):   # the logged fp32 norm
        numerics.assert_close(r["grad_norm"], s["grad_norm"], norm_rounding(steps), f"logged norm at step {r['step']}")
    assert max(s["grad_norm"] for s in steps["steps"]) > 1.0     # clipping at the default 1.0 would have acted
    check_groups(steps, 0.05, "hc")


@pytest.mark.parametrize("arch", ["gpt2", "nanochat"])
def test_adamw_betas_and_eps_reach_every_adamw_group_in_order(arch, data_dir, tmp_path, steps):
    """beta1 is the first moment's decay and beta2 the second's: the groups hold (beta1, beta2) as
    given, not swapped, and adam_eps, on AdamW alone (arch=nanochat) and beside Muon."""
    extra = ["--arch=nanochat", "--bias=False", "--optimizer=muon"] if arch == "nanochat" else []
    train.main(tiny_args(data_dir, tmp_path / arch, "--scheme=kromhc", "--beta1=0.71", "--beta2=0.93",
                         "--adam_eps=3e-7", "--max_iters=2", "--eval_interval=100", *extra))
    adamw = [s for s in steps["steps"] if all(b is not None for b in s["betas"])]  # Muon steps apart
    assert len(adamw) == 2 and len(steps["steps"]) == (4 if arch == "nanochat" else 2)
    for s in adamw:
        assert [tuple(b) for b in s["betas"]] == [(0.71, 0.93)] * len(s["betas"])
        assert s["eps"] == [3e-7] * len(s["eps"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_autocast_follows_dtype(dtype, data_dir, tmp_path):
    """Every Linear of a training step computes in bf16 under --dtype=bfloat16 (autocast entered
    on CPU too), in fp32 otherwise."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, nn.Linear) and module.training:
            seen.append(output.dtype)

    handle = register_module_forward_hook(hook)
    try:
        train.main(tiny_args(data_dir, tmp_path / dtype, "--scheme=kromhc", f"--dtype={dtype}", "--max_iters=2",
                             "--eval_interval=100"))
    finally:
        handle.remove()
    # 2 steps x (2 layers x 4 Linears + lm_head)
    assert seen == [getattr(torch, dtype)] * 18


def test_checkpoint_false_writes_no_checkpoint(data_dir, tmp_path):
    out = tmp_path / "nockpt"
    result = train.main(tiny_args(data_dir, out, "--checkpoint=False", "--max_iters=2", "--eval_interval=1"))
    assert result["step"] == 2
    assert [r["step"] for r in read_log(out) if r["type"] == "eval"] == [0, 1, 2]
    assert sorted(f for f in os.listdir(out) if f != ".train.lock") == ["log.jsonl"]   # the run's lock file aside


# dense bf16 peaks from NVIDIA's datasheets (sparsity excluded), by the names torch reports
PEAKS = [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
         ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
         ("NVIDIA GeForce RTX 4090", None)]


@pytest.mark.parametrize("name,peak", PEAKS)
def test_mfu_peak_is_one_table_for_train_and_bench(name, peak, monkeypatch):
    from scripts import bench  # here, not at collection: it imports Triton (see test_kernels.py)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert common.peak_flops("cuda") == peak
    assert bench.bf16_peak(name) == peak
    assert common.peak_flops("cpu") is None
