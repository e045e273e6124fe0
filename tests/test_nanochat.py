"""arch="nanochat" and optimizer="muon": the model against a forward written out here, its shapes,
init and softcap, rotary, Muon's groups, lrs, momentum warmup and update, exact resume, DDP, the
config configs/nanochat_d12.py, and the end-of-run HellaSwag / CORE."""

import json
from dataclasses import replace
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.optim._muon

import config
import configurator
import train
from errors import ConfigError
import fp32_muon
import numerics
from conftest import muon, read_log, tiny_args
from model import GPT, GPTConfig, apply_rotary, rotary_tables
import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLASWAG = os.path.join(REPO, "tests", "fixtures", "hellaswag", "hellaswag_val_sample.jsonl")
BUNDLE = os.path.join(REPO, "tests", "fixtures", "core", "eval_bundle")
NANOCHAT = ["--arch=nanochat", "--bias=False", "--optimizer=muon"]


def tiny(**kw):
    cfg = dict(arch="nanochat", block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
    cfg.update(kw)
    return GPTConfig(**cfg)


# ----------------------------------------------------------------------------- the model

def rotary_error(T):
    """The relative error of a vector rotated with model.rotary_tables at positions < T: the angle t inv_freq
    rounds inv_freq's power and division and the product (4 u of an angle up to T - 1, an absolute error of the
    cos and sin), cos and sin themselves within 1 ulp (2 u), then the rotation's product and sum (2 u)."""
    return (4 * (T - 1) + 4) * numerics.u()


def nanochat_reference(sd, idx, n_layer, n_head, targets=None):
    """nanochat's d12-era forward written out from its equations, reading a state_dict: rotary
    as a complex rotation, RMSNorm by hand, masked-softmax attention, ReLU^2, softcap 15."""
    def rmsnorm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    def rotate(x):  # pairs (x[i], x[i + D/2]) as complex numbers, turned by -t * 10000^(-2i/D)
        B, T, H, D = x.shape
        theta = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
        z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * torch.polar(
            torch.ones_like(theta), -theta)[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1).float()

    B, T = idx.shape
    x = rmsnorm(sd["transformer.wte.weight"][idx])
    C = x.shape[-1]
    hs = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        a = rmsnorm(x)
        q, k, v = (a @ sd[p + f"attn.c_{w}.weight"].T for w in "qkv")
        q, k, v = (t.view(B, T, n_head, hs) for t in (q, k, v))
        q, k = rmsnorm(rotate(q)), rmsnorm(rotate(k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(hs)).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, C) @ sd[p + "attn.c_proj.weight"].T
        h = torch.clamp(rmsnorm(x) @ sd[p + "mlp.c_fc.weight"].T, min=0) ** 2
        x = x + h @ sd[p + "mlp.c_proj.weight"].T
    z = rmsnorm(x) @ sd["lm_head.weight"].T
    logits = 15 * torch.tanh(z / 15)
    loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return logits, loss


@pytest.mark.numerics
def test_plain_nanochat_equals_reference():
    torch.manual_seed(0)
    model = GPT(tiny())
    with torch.no_grad():  # the zero-initialised unembedding and c_proj must matter too
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    idx, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    logits, loss = model(idx, targets)
    ref_logits, ref_loss = nanochat_reference(sd, idx, 2, 2, targets)
    assert logits.shape == (3, 16, 96)
    # two fp32 computations: the forward's reductions (gpt2_path), and the rotation, whose fp32 tables carry
    # the angles t 10000^(-2i/D) (up to T) to a few u each (ROTARY), here rotated in float64
    rel = numerics.gpt2_path(2, 32, 2, 16, 96, 3 * 16, backward=False) + rotary_error(16)
    numerics.assert_close(logits, ref_logits, rel, "logits")
    numerics.assert_close(loss, ref_loss, rel, "loss")
    assert model(idx[:, :5])[0].shape == (3, 5, 96)  # shorter sequences take the first rotary angles
    numerics.assert_close(model(idx[:, :5])[0], ref_logits[:, :5], rel, "logits of 5 tokens")


def test_shapes_no_biases_no_position_embedding_untied():
    V, C, L = 96, 32, 2
    model = GPT(tiny(scheme="kromhc", n_streams=4))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".hc_" not in k}
    expected = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        expected.update({p + "attn.c_q.weight": (C, C), p + "attn.c_k.weight": (C, C), p + "attn.c_v.weight": (C, C),
                         p + "attn.c_proj.weight": (C, C), p + "mlp.c_fc.weight": (4 * C, C),
                         p + "mlp.c_proj.weight": (C, 4 * C)})
    assert shapes == expected  # no wpe, no norm weights, no biases
    assert not any("bias" in n or "wpe" in n or "ln" in n for n, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert model.num_params(non_embedding=False) - model.num_params() == V * C  # the lookup is not counted
    with pytest.raises(ValueError, match="bias=False"):
        GPT(tiny(bias=True))
    with pytest.raises(ValueError, match="dropout"):
        GPT(tiny(dropout=0.1))
    with pytest.raises(ValueError, match="even head size"):
        GPT(tiny(n_embd=30, n_head=2))


@pytest.mark.numerics
def test_init_and_initial_loss():
    """Linear std 1/sqrt(fan_in) min(1, sqrt(fan_out/fan_in)), embedding std 1, unembedding and
    c_proj zero. Zero unembedding: every logit is 15 tanh(0) = 0, so softmax is uniform and the
    loss is exactly -ln(1/V) = ln V, whatever the scheme."""
    torch.manual_seed(0)
    C, V = 256, 512
    model = GPT(tiny(n_embd=C, vocab_size=V, n_head=2, n_layer=2))
    # sampling, not rounding: the std of N >= 65,536 draws is within a few 1 / sqrt(2 N) = 0.3% of its value
    for i in range(2):
        b = model.transformer.h[i]
        for w in (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight, b.mlp.c_fc.weight):
            fan_out, fan_in = w.shape
            std = 1 / math.sqrt(fan_in) * min(1, math.sqrt(fan_out / fan_in))  # c_fc: 4x wider out, still 1/sqrt(C)
            assert w.std().item() == pytest.approx(std, rel=0.05) and std == pytest.approx(1 / 16)
        assert not b.attn.c_proj.weight.any() and not b.mlp.c_proj.weight.any()
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert not model.lm_head.weight.any()
    for scheme, n in (("plain", 1), ("kromhc", 4), ("mhc", 4)):
        m = GPT(tiny(vocab_size=V, scheme=scheme, n_streams=n))
        idx = torch.randint(0, V, (2, 16))
        logits, loss = m(idx, idx)
        assert not logits.any()
        # log V in fp32 (its sum of V ones is exact; log within 1 ulp: 2 u), then the mean of 32 equal values (whose
        # rounding errors do not cancel: the deterministic gamma)
        numerics.assert_close(loss, math.log(V), 2 * numerics.u() + numerics.gamma(32), "loss at init")


@pytest.mark.numerics
def test_logit_softcap():
    torch.manual_seed(0)
    model = GPT(tiny())
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)  # raw logits in the hundreds
    idx = torch.randint(0, 96, (2, 16))
    logits = model(idx)[0]
    assert logits.abs().max() <= 15 and logits.abs().max() > 14.9
    with torch.no_grad():  # below the cap, 15 tanh(z / 15) ~ z
        model.lm_head.weight.mul_(1e-4)
        x = F.rms_norm(model.transformer.wte.weight[idx], (32,))  # c_proj = 0: the stream is the normed embedding
        raw = F.rms_norm(x, (32,)) @ model.lm_head.weight.T
    # the cap of those logits in float64: two fp32 computations of z (the two norms and the unembedding over C),
    # and the model's cap rounds its division, tanh (1 ulp) and product: 4 u
    rel = numerics.chain(32, 32, 32) + 4 * numerics.u()
    numerics.assert_close(model(idx)[0], 15 * torch.tanh(raw.double() / 15), rel, "logits below the cap")


@pytest.mark.numerics
def test_rotary_relative_positions():
    """After the rotation q_t . k_u depends on t - u only, and equals the complex-number form."""
    torch.manual_seed(0)
    D, T = 16, 12
    cos, sin = rotary_tables(T, D)
    q, k = torch.randn(D), torch.randn(D)
    rq = apply_rotary(q.expand(1, T, 1, D), cos, sin)[0, :, 0]  # the same vector at every position
    rk = apply_rotary(k.expand(1, T, 1, D), cos, sin)[0, :, 0]
    dots = rq @ rk.T  # (t, u)
    # each dot: both vectors' rotation error and the sum over D, relative to |q| |k| (what a dot can reach);
    # two dots compared
    rel = 2 * (2 * rotary_error(T) + numerics.gamma_p(D))
    for shift in range(1, 5):
        numerics.assert_close(dots[shift:, shift:], dots[:-shift, :-shift], rel, f"dots {shift} apart",
                              scale=(q.norm() * k.norm()).item())
    assert not torch.allclose(dots[0, 0], dots[3, 0])  # it does depend on the offset
    # a rotation: the norm's sum over D, of the rotated vector (its rotation error) and of q
    numerics.assert_close(rq.norm(dim=-1), q.norm().expand(T), rotary_error(T) + 2 * numerics.gamma_p(D), "norms")
    z = torch.complex(q[:D // 2], q[D // 2:]) * torch.exp(-1j * 5 * 10000.0 ** (-torch.arange(0, D, 2) / D))
    # the same angles at t = 5 in complex64 on the other side: the rotary error of both
    numerics.assert_close(rq[5], torch.cat([z.real, z.imag]), 2 * rotary_error(6), "position 5")


def test_zero_init_still_trains():
    """With the unembedding and every c_proj at zero only lm_head has a gradient at step 1;
    after a few steps every parameter, connections included, has one and the loss falls."""
    torch.manual_seed(0)
    model = GPT(tiny(scheme="kromhc", n_streams=4))
    opt = muon(model, learning_rate=1e-2)
    idx = torch.randint(0, 96, (4, 16))
    losses, first = [], None
    for _ in range(6):
        loss = model(idx, idx)[1]
        loss.backward()
        if first is None:
            first = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert first == {"lm_head.weight"}
    model(idx, idx)[1].backward()
    no_grad = [n for n, p in model.named_parameters() if not p.grad.any()]
    assert not no_grad
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.numerics
def test_compiles_without_graph_breaks_and_generates():
    """One graph for torch.compile (aot_eager backend: no C++ or GPU needed); sampling past
    block_size crops the context to the rotary tables' length."""
    torch.manual_seed(0)
    model = GPT(tiny(scheme="kromhc", n_streams=4))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 96, (2, 16))
    loss = compiled(idx, idx)[1]
    loss.backward()
    # AOT autograd's decomposed graph against eager: the forward's sums in perhaps other orders
    rel = numerics.gpt2_path(2, 32, 2, 16, 96, 32, n=4, res=numerics.res_widths("kromhc", 4), backward=False)
    numerics.assert_close(loss, model(idx, idx)[1], rel + rotary_error(16), "loss")
    out = model.eval().generate(idx[:, :5], 20, temperature=0.8, top_k=10)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx[:, :5])


# ----------------------------------------------------------------------------- Muon

def test_muon_groups_and_lrs():
    C = 192  # (192 / 768)^-0.5 = 2: the AdamW lrs double
    model = GPT(tiny(n_embd=C, scheme="kromhc", n_streams=4))
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = {n for n in names.values() if n.startswith("transformer.h.") and ".hc_" not in n}
    phis = {n for n in names.values() if n.endswith(".phi")}
    conn = {n for n in names.values() if ".hc_" in n}
    for hc_optimizer in ("adamw", "muon"):
        opt = muon(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, learning_rate=1e-3,
                   hc_optimizer=hc_optimizer, weight_decay=0.0)
        groups = {g["name"]: g for g in opt.param_groups}
        sets = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
        expected = {"matrices": blocks, "unembedding": {"lm_head.weight"}, "embedding": {"transformer.wte.weight"}}
        if hc_optimizer == "adamw":
            expected.update(hc_decay=phis, hc=conn - phis)
        else:
            expected.update(hc_matrices=phis, hc=conn - phis)
        assert sets == expected
        assert sum(len(s) for s in sets.values()) == len(names)  # every parameter exactly once
        lrs = {k: g["base_lr"] for k, g in groups.items()}
        # float64 products and powers (a few u = 1e-16): pytest.approx's default 1e-6 is far above them, and far
        # below a wrong scaling
        assert lrs["matrices"] == 0.02 and lrs["unembedding"] == pytest.approx(0.008)
        assert lrs["embedding"] == pytest.approx(0.4) and lrs["hc"] == 1e-3
        assert all(g["lr"] == g["base_lr"] for g in groups.values())
        muon_names = {"matrices", "hc_matrices"} & set(groups)
        assert {g["name"] for g in opt.muon.param_groups} == muon_names
        for g in opt.muon.param_groups:
            assert (g["momentum"], g["nesterov"], g["weight_decay"], g["adjust_lr_fn"]) == (0.95, True, 0.0, "original")
        for g in opt.adamw.param_groups:
            assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
    at_768 = muon(GPT(tiny(n_embd=768, n_head=6, n_layer=1)))
    assert {g["name"]: g["base_lr"] for g in at_768.param_groups} == {
        "matrices": 0.02, "unembedding": 0.004, "embedding": 0.2}  # plain: no connection groups
    with pytest.raises(ValueError, match="arch='nanochat'"):
        muon(GPT(GPTConfig(block_size=16, vocab_size=96, n_layer=1, n_head=2, n_embd=32)))


@pytest.mark.numerics
def test_muon_update_is_nanochats(monkeypatch):
    """Two steps of torch's Muon as configured == nanochat's Muon written out: nesterov momentum,
    5 quintic Newton-Schulz steps, lr x sqrt(max(1, rows / cols)). The reference runs in float64, Muon's
    Newton-Schulz in float32 (tests/fp32_muon.py): in bf16 its steps' slopes (up to 3.96) amplify 8-bit roundings
    past any bound that would still catch a bug; another direction or scale would be 50% or more apart."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", fp32_muon.newton_schulz_fp32)
    def newton_schulz(G):
        X = G.double()
        X = X.mT if G.size(0) > G.size(1) else X
        X = X / (X.norm() + 1e-7)
        for _ in range(5):
            A = X @ X.mT
            X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
        return (X.mT if G.size(0) > G.size(1) else X).float()

    torch.manual_seed(0)
    model = GPT(tiny(n_layer=1))
    opt = muon(model)
    opt.muon.param_groups[0]["momentum"] = 0.85
    block = model.transformer.h[0]
    ws = {"tall": (block.mlp.c_fc.weight, 2.0), "square": (block.attn.c_q.weight, 1.0),
          "wide": (block.mlp.c_proj.weight, 1.0)}  # (128, 32), (32, 32), (32, 128)
    bufs = {k: torch.zeros_like(w) for k, (w, _) in ws.items()}
    for _ in range(2):
        grads = {k: torch.randn_like(w) for k, (w, _) in ws.items()}
        before = {k: w.detach().clone() for k, (w, _) in ws.items()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for k, (w, _) in ws.items():
            w.grad = grads[k].clone()
        opt.step()
        for k, (w, scale) in ws.items():
            bufs[k] = 0.85 * bufs[k] + 0.15 * grads[k]
            expected = -0.02 * scale * newton_schulz(0.15 * grads[k] + 0.85 * bufs[k])
            delta = w.detach() - before[k]
            # Newton-Schulz's rounding (the Gram matrix over the long side, 128, the products over the short, 32)
            # with its later steps' amplification; the momentum's lerps and the lr's product add a few u, in it
            rel = numerics.newton_schulz_rounding(128, 32, 32)
            assert (delta - expected).norm() / expected.norm() <= rel, k


@pytest.mark.parametrize("name, ratio", [("nanochat_d12.py", 0.2), ("kromhc_d12.py", 0.4)])
def test_schedule_and_momentum_warmup(name, ratio):
    """Linear warmdown with warmup 0 and min_lr_ratio 0 is nanochat's get_lr_multiplier (warmdown_ratio
    0.2 at e1770a3, 0.4 from ae0bf52); the momentum is nanochat's get_muon_momentum."""
    cfg = configurator.load(config.KEYS, [os.path.join(REPO, "configs", name)])
    cfg["max_iters"] = N = 7080  # the configs' max_iters = -1: nanochat's rule (plain at 65,536 tokens)
    oc = config.build(cfg).optim
    warmdown = round(ratio * N)
    for step in list(range(0, N, 97)) + [N - warmdown - 1, N - warmdown, N - warmdown + 1, N - 1]:
        nanochat = 1.0 if step <= N - warmdown else (N - step) / warmdown
        for base in (0.02, 0.004, 6e-4):
            assert optim.lr_at(step, oc, base) == pytest.approx(base * nanochat, rel=1e-12, abs=1e-15)
    assert optim.lr_at(N - 1, oc, 0.02) == pytest.approx(0.02 / warmdown, rel=1e-12)
    for step, m in ((0, 0.85), (30, 0.86), (150, 0.90), (299, 0.85 + 0.1 * 299 / 300), (300, 0.95), (5000, 0.95)):
        assert optim.muon_momentum(step, oc) == pytest.approx(m, rel=1e-12)   # float64, a few u: 1e-16
    assert optim.muon_momentum(7, replace(oc, muon_momentum_warmup=0)) == 0.95


# ----------------------------------------------------------------------------- through train.py

def muon_args(data_dir, out_dir, *extra):
    return tiny_args(data_dir, out_dir, *NANOCHAT, "--scheme=kromhc", "--n_layer=1", "--warmup_iters=0",
                     "--lr_schedule=linear", "--min_lr_ratio=0", "--warmdown_frac=0.5", "--muon_momentum_warmup=6",
                     *extra)


def test_muon_run_lrs_momentum_and_exact_resume(data_dir, tmp_path):
    """Stop at step 4 and resume to 8 (inside the momentum warmup and the warmdown): the same
    losses, weights and optimizer state as an uninterrupted run, bit for bit; every group's lr is
    its own base lr times the schedule."""
    full = tmp_path / "full"
    train.main(muon_args(data_dir, full, "--max_iters=8", "--eval_interval=4"))
    part = tmp_path / "part"
    train.main(muon_args(data_dir, part, "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=4"))
    # inside the warmup: the step-4 checkpoint's last step (3) ran at momentum 0.85 + 0.1 * 3 / 6
    saved = torch.load(part / "ckpt.pt", weights_only=False)["optimizer"]["muon"]["param_groups"]
    assert [g["momentum"] for g in saved] == [pytest.approx(0.9, rel=1e-12)] * len(saved)   # float64: 1e-16
    train.main(muon_args(data_dir, part, "--max_iters=8", "--eval_interval=4", "--resume"))

    def records(out):
        return [(r["type"], r["step"], r.get("loss"), r.get("loss_ema"), r.get("lr"), r.get("grad_norm"),
                 r.get("val_loss"))
                for r in read_log(out) if r["type"] in ("train", "eval")]

    assert records(part) == records(full)
    a = torch.load(full / "ckpt.pt", weights_only=False)
    b = torch.load(part / "ckpt.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name in ("muon", "adamw"):
        sa, sb = a["optimizer"][name]["state"], b["optimizer"][name]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    # the last step (7) ran at multiplier (8 - 7) / 4 and momentum 0.95; step 5 at 0.85 + 0.1 * 5 / 6
    groups = {g["name"]: g for name in ("muon", "adamw") for g in a["optimizer"][name]["param_groups"]}
    # the lrs: float64 products of the schedule (a few u = 1e-16), hence rel=1e-12
    assert groups["matrices"]["lr"] == pytest.approx(0.02 / 4, rel=1e-12) and groups["matrices"]["momentum"] == 0.95
    assert groups["hc"]["lr"] == pytest.approx(1e-2 / 4, rel=1e-12)  # tiny_args' learning_rate: the connections'
    assert groups["embedding"]["lr"] == pytest.approx(0.2 * (32 / 768) ** -0.5 / 4, rel=1e-12)
    lrs = {r["step"]: r["lr"] for r in read_log(full) if r["type"] == "train"}
    assert lrs[1] == lrs[4] == 0.02 and lrs[6] == pytest.approx(0.02 * 3 / 4, rel=1e-12)  # logged: Muon's matrix lr
    with pytest.raises(ConfigError, match="'hc_optimizer' is 'muon'.*--hc_optimizer=adamw"):
        train.main(muon_args(data_dir, part, "--max_iters=10", "--resume", "--hc_optimizer=muon"))


def test_muon_needs_nanochat_and_resume_keeps_the_optimizer(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="optimizer.*arch='nanochat'"):
        train.main(tiny_args(data_dir, tmp_path / "a", "--optimizer=muon"))
    with pytest.raises(ConfigError, match="bias=False"):
        train.main(tiny_args(data_dir, tmp_path / "b", "--arch=nanochat"))
    out = tmp_path / "c"
    train.main(tiny_args(data_dir, out, "--arch=nanochat", "--bias=False", "--max_iters=2", "--eval_interval=2"))
    with pytest.raises(ConfigError, match="optimizer.*adamw"):
        train.main(tiny_args(data_dir, out, "--arch=nanochat", "--bias=False", "--optimizer=muon", "--max_iters=4",
                             "--resume"))


@pytest.mark.numerics
def test_muon_ddp_two_processes_match_one(data_dir, tmp_path, monkeypatch):
    """2-process gloo DDP == one process with the same global batch: Muon orthogonalises the
    all-reduced gradient on every rank, so the update is the same everywhere; the end-of-run
    HellaSwag and CORE split their items over the ranks and agree with one process.

    The two runs sum the gradient in other orders (tests/numerics.py). What they compute before the
    optimizer is held to the rounding bound of the model's path: the first step's loss and gradient norm,
    and the first gradient itself, which the optimizers' state after one step holds linearly (Muon's
    momentum buffer (1 - momentum) g, AdamW's (1 - beta1) g and sqrt(1 - beta2) |g|). After that, Newton-
    Schulz amplifies a rounding difference in the momentum by up to the slope of its quintic at 0,
    3.4445^5 = 487, per step, and AdamW one in a gradient near its eps to a full lr step, so the
    runs may part by more than a bound that would still catch a bug: the later weights are held to what
    the optimizers can move them (numerics.muon_update_bound, adamw_divergence). Both runs do Newton-Schulz
    in float32 (tests/fp32_muon.py), as torch's bf16 iteration rounds each update to 8 bits."""
    def args(out):
        return muon_args(data_dir, out, "--batch_size=2", "--eval_tokens=640", "--eval_batch_size=3",
                         "--eval_interval=1", "--keep_checkpoints=6", "--max_iters=6", "--final_hellaswag",
                         f"--hellaswag_file={HELLASWAG}", "--final_core", f"--core_bundle_dir={BUNDLE}")

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", fp32_muon.newton_schulz_fp32)
    train.main(args(single))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/fp32_muon.py", *args(ddp)], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = read_log(single), read_log(ddp)
    assert (one[0]["grad_accum"], two[0]["world_size"], two[0]["grad_accum"]) == (2, 2, 1)
    # 1 block of width 32, 2 heads, 32 tokens a sequence, GPT-2's vocabulary: 128 tokens a step, 640 for val
    rel_loss = numerics.gpt2_path(1, 32, 2, 32, 50304, 640, n=4, backward=False)
    rel_grad = numerics.gpt2_path(1, 32, 2, 32, 50304, 128, n=4)
    t1, t2 = ([r for r in log if r["type"] == "train"] for log in (one, two))
    assert [r["step"] for r in t1] == [r["step"] for r in t2] == list(range(1, 7))
    numerics.assert_close(t2[0]["loss"], t1[0]["loss"], rel_loss, "step 1 loss")
    numerics.assert_close(t2[0]["grad_norm"], t1[0]["grad_norm"], rel_grad, "step 1 grad norm")
    e1, e2 = ([r for r in log if r["type"] == "eval"] for log in (one, two))
    numerics.assert_close(e2[0]["val_loss"], e1[0]["val_loss"], rel_loss, "step 0 val loss")
    first1, first2 = (torch.load(run / "ckpt_1.pt", weights_only=False)["optimizer"] for run in (single, ddp))
    for i, (a, b) in enumerate(zip(first1["muon"]["state"].values(), first2["muon"]["state"].values())):
        numerics.assert_close(b["momentum_buffer"], a["momentum_buffer"], rel_grad, f"Muon matrix {i}: first gradient")
    for i, (a, b) in enumerate(zip(first1["adamw"]["state"].values(), first2["adamw"]["state"].values())):
        numerics.assert_close(b["exp_avg"], a["exp_avg"], rel_grad, f"AdamW parameter {i}: first gradient")
        numerics.assert_close(b["exp_avg_sq"].sqrt(), a["exp_avg_sq"].sqrt(), rel_grad, f"AdamW parameter {i}: |g|")
    # the ranks' shares of HellaSwag and CORE add up to the scores of the same weights in one process
    from data.tokenizer import get_encoding
    from evals.core import evaluate_core
    from evals.hellaswag import evaluate_hellaswag, load_examples
    from checkpoint import load_model
    final = [r for r in two if r["type"] == "final"]
    model = load_model(ddp)[0]
    hs = evaluate_hellaswag(model, load_examples(HELLASWAG), "cpu")
    assert len(final) == 1 and final[0]["hellaswag_n"] == 7 and final[0]["hellaswag_acc_norm"] == hs["acc_norm"]
    assert final[0]["core"] == pytest.approx(evaluate_core(model, get_encoding(), "cpu", BUNDLE, log=None)["core"])
    c1 = torch.load(single / "ckpt.pt", weights_only=False)
    c2 = torch.load(ddp / "ckpt.pt", weights_only=False)
    # the blocks' matrices: each Muon step moves an entry by at most lr sqrt(max(1, rows / cols)) x 1.20
    schedule = [r["lr"] / 0.02 for r in t1]   # the logged lr is the first group's, Muon's matrix_lr = 0.02
    groups = {g["name"]: g for g in c1["optimizer"]["adamw"]["param_groups"] + c1["optimizer"]["muon"]["param_groups"]}
    muon = [k for k in c1["model"] if k.startswith("transformer.h.") and ".hc_" not in k and c1["model"][k].dim() == 2]
    assert muon and groups["matrices"]["base_lr"] == 0.02
    for k in muon:
        rows, cols = c1["model"][k].shape
        bound = 2 * 0.02 * sum(schedule) * max(1, rows / cols) ** 0.5 * numerics.muon_update_bound()
        numerics.assert_close(c2["model"][k], c1["model"][k], 1.0, k, scale=bound)
    for name in ("embedding", "unembedding"):   # AdamW: up to a full lr step either way per step
        key = {"embedding": "transformer.wte.weight", "unembedding": "lm_head.weight"}[name]
        bound = numerics.adamw_divergence([groups[name]["base_lr"] * f for f in schedule], *groups[name]["betas"])
        numerics.assert_close(c2["model"][key], c1["model"][key], 1.0, key, scale=bound)


# ----------------------------------------------------------------------------- the config and the end of the run

def test_nanochat_d12_config():
    cfg = configurator.load(config.KEYS, [os.path.join(REPO, "configs", "nanochat_d12.py")])
    config.build(cfg)
    assert (cfg["arch"], cfg["optimizer"], cfg["scheme"], cfg["n_streams"]) == ("nanochat", "muon", "kromhc", 0)
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_embd"] // cfg["n_head"], cfg["block_size"]) == (12, 768, 128, 2048)
    assert (cfg["total_batch_tokens"], cfg["dataset"], cfg["grad_clip"]) == (524_288, "fineweb_edu-65536", 1.0)
    assert (cfg["eval_interval"], cfg["eval_tokens"]) == (250, 20 * 524_288)
    assert (cfg["matrix_lr"], cfg["embedding_lr"], cfg["unembedding_lr"]) == (0.02, 0.2, 0.004)
    assert (cfg["beta1"], cfg["beta2"], cfg["adam_eps"], cfg["weight_decay"]) == (0.8, 0.95, 1e-10, 0.0)
    assert (cfg["lr_schedule"], cfg["warmup_iters"], cfg["warmdown_frac"], cfg["min_lr_ratio"]) == ("linear", 0, 0.2, 0)
    for gpus in (1, 2, 4, 8):
        assert cfg["total_batch_tokens"] % (cfg["batch_size"] * cfg["block_size"] * gpus) == 0
    # nanochat: num_iterations = 20 x (every parameter of its model) // tokens per step, at 65,536 tokens
    with torch.device("meta"):
        model = GPT(replace(config.build(cfg).model, scheme="plain", n_streams=1, vocab_size=65536))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2 * 65536 * 768 + 12 * 12 * 768 ** 2 == 185_597_952
    assert cfg["max_iters"] == -1 and optim.ratio_steps(n_params, cfg["param_data_ratio"], 524_288) == 7080


def test_nanochat_d12_trains_with_end_of_run_evals(data_dir, tmp_path):
    """The config at tiny overrides: builds, trains, and scores HellaSwag and CORE once at the end
    (all items), with the results in the log and in hellaswag.json / core.json."""
    from data.tokenizer import get_encoding
    from evals.core import evaluate_core
    from evals.hellaswag import evaluate_hellaswag, load_examples
    out = tmp_path / "run"
    result = train.main([os.path.join(REPO, "configs", "nanochat_d12.py"), f"--data_dir={data_dir}",
                         f"--out_dir={out}", "--device=cpu", "--n_layer=1", "--n_embd=32", "--n_head=2",
                         "--block_size=64", "--batch_size=2", "--total_batch_tokens=128", "--max_iters=3",
                         "--eval_interval=3", "--eval_tokens=256", "--muon_momentum_warmup=2", "--log_interval=1",
                         f"--hellaswag_file={HELLASWAG}", f"--core_bundle_dir={BUNDLE}"])
    log = read_log(out)
    assert log[0]["arch"] == "nanochat" and log[0]["optimizer"] == "muon"
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    final = [r for r in log if r["type"] == "final"]
    assert len(final) == 1 and final[0]["step"] == 3
    # the same numbers from the saved weights, scored here
    from checkpoint import load_model
    model = load_model(out)[0]
    hs = evaluate_hellaswag(model, load_examples(HELLASWAG), "cpu")
    core = evaluate_core(model, get_encoding(), "cpu", BUNDLE, log=None)
    assert final[0]["hellaswag_n"] == hs["n"] == 7 and final[0]["hellaswag_acc_norm"] == hs["acc_norm"]
    assert final[0]["core"] == core["core"] and final[0]["core_complete"] is False  # 4 toy tasks, not CORE
    assert json.loads((out / "hellaswag.json").read_text())["acc_norm"] == hs["acc_norm"]
    assert json.loads((out / "core.json").read_text())["core"] == core["core"] == result["core"]


def test_end_of_run_evals_without_data(data_dir, tmp_path, monkeypatch):
    """Absent from the cache: the run finishes and the log says why there is no HellaSwag / CORE;
    a file or directory named in the config that is not there is an error before training."""
    monkeypatch.setenv("HCGPT_CACHE_DIR", str(tmp_path / "empty_cache"))
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_iters=1", "--final_hellaswag", "--final_core"))
    final = [r for r in read_log(out) if r["type"] == "final"]
    assert len(final) == 1 and "core" not in final[0] and "hellaswag_acc_norm" not in final[0]
    assert [m.split(":")[0] for m in final[0]["skipped"]] == ["final_hellaswag", "final_core"]
    assert not (out / "hellaswag.json").exists() and not (out / "core.json").exists()
    with pytest.raises(ConfigError, match="hellaswag_file.*does not exist"):
        train.main(tiny_args(data_dir, tmp_path / "x", "--final_hellaswag", f"--hellaswag_file={tmp_path}/no.jsonl"))
    with pytest.raises(ConfigError, match="core_bundle_dir.*no core.yaml"):
        train.main(tiny_args(data_dir, tmp_path / "y", "--final_core", f"--core_bundle_dir={tmp_path}"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before training
