"""DeepSeek-V4's mHC (scheme="mhc_v4") and its stream readout (readout="hc_head") against float64
transcriptions of the public formulas (docs/mhc_v4.md names the source file of each), and their
place in the model: optimizer groups, diagnostics, parameter counts, training, resume, fused routing."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evals.val
import hc
import hc_kernels
import hc_verify
import numerics
import optim
import train
from errors import ConfigError
from conftest import read_log, tiny_args
import model as model_module
from model import GPT, GPTConfig

C = 16
N_STREAM_SCHEMES = [s for s in hc.SCHEMES if s != "plain"]


# ---------------------------------------------------------------------------------------
# the public formulas, float64, in DeepSeek's layout (comb[j, k]: input stream j -> output stream k)

def mixes_ref(fn, h, norm_eps=1e-6):
    """x = flatten(h); mixes = F.linear(x, fn) * rsqrt(mean(x^2) + norm_eps)   (HcPre / hc_head)."""
    x = h.double().flatten(-2)
    return F.linear(x, fn.double()) * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)


def split_sinkhorn_ref(mixes, scale, base, n, iters, eps, softmax_eps="after"):
    """hc_split_sinkhorn. softmax_eps="after": softmax(l) + eps (vLLM kernels/mhc/torch.py, Megatron-Core
    hyper_connection.py, Liger-Kernel ops/mhc.py); "inside": exp(l - max) / (Σ exp + eps) (torchtitan mhc.py)."""
    scale, base = scale.double(), base.double()
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    if softmax_eps == "after":
        comb = torch.softmax(logits, dim=-1) + eps
    else:
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        comb = e / (e.sum(dim=-1, keepdim=True) + eps)
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_post_ref(y, residual, post, comb):
    """HcPost: out[k] = post[k] y + Σ_j comb[j, k] residual[j], written out stream by stream."""
    n = residual.shape[-2]
    return torch.stack([post[..., k, None] * y + sum(comb[..., j, k, None] * residual[..., j, :] for j in range(n))
                        for k in range(n)], dim=-2)


def hc_head_ref(fn, scale, base, h, eps):
    """hc_head: w = sigmoid(mixes * scale + base) + eps; out = Σ_j w[j] h[j]."""
    w = torch.sigmoid(mixes_ref(fn, h) * scale.double() + base.double()) + eps
    return w, (w.unsqueeze(-1) * h.double()).sum(dim=-2)


# ---------------------------------------------------------------------------------------

def randomize(module, seed=0, logit_std=3.0):
    """Non-trivial parameters: projections giving logits of std ~ logit_std, scales in (1, 2), random biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.fn.copy_(torch.randn(module.fn.shape, generator=g) * logit_std / math.sqrt(module.fn.shape[1]))
        module.scale.copy_(1 + torch.rand(module.scale.shape, generator=g))
        module.base.copy_(torch.randn(module.base.shape, generator=g))
    return module


def coefficient_path(n, iters):
    """fp32 coefficients against their float64 formulas (float64's own rounding is 2^-29 of fp32's): the norm
    and the projection over n C, the softmax over n and Sinkhorn's 2 iters - 1 normalisations over n."""
    return numerics.chain(n * C, n * C, *numerics.res_widths("mhc_v4", n, iters))


def streams(n, B=2, T=5, seed=1):
    return torch.randn(B, T, n, C, generator=torch.Generator().manual_seed(seed))


class Branch(nn.Module):
    def __init__(self, seed=2):
        super().__init__()
        torch.manual_seed(seed)
        self.ln, self.fc = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        return self.fc(self.ln(x))


@pytest.mark.numerics
@pytest.mark.parametrize("n,iters", [(2, 20), (4, 20), (4, 3), (8, 20)])
def test_connection_equals_the_public_formulas(n, iters):
    conn = randomize(hc.make_connection("mhc_v4", C, n, layer_idx=0, sinkhorn_iters=iters), seed=n)
    h, branch = streams(n), Branch()
    pre, post, comb = split_sinkhorn_ref(mixes_ref(conn.fn, h), conn.scale, conn.base, n, iters, 1e-6)
    H_pre, H_post, H_res = conn.coefficients(h)
    rel = coefficient_path(n, iters)
    numerics.assert_close(H_pre, pre, rel, "H_pre")
    numerics.assert_close(H_post, post, rel, "H_post")
    numerics.assert_close(H_res, comb.transpose(-1, -2), rel, "H_res")  # rows = outputs
    y = branch((pre.unsqueeze(-1) * h.double()).sum(-2).float()).double()                       # HcPre's y
    expected = hc_post_ref(y, h.double(), post, comb)
    out = conn(h, branch)
    # the coefficients, then the pre-mix over n (x_in, rounded to fp32 here too), the branch (LayerNorm over C,
    # Linear over C) and the mix over n
    numerics.assert_close(out, expected, rel + numerics.chain(n, C, C, C, n), "output")
    if n > 2:  # (a doubly stochastic 2 x 2 matrix is symmetric) comb is far from symmetric here, and reading it
        assert (comb - comb.transpose(-1, -2)).abs().max() > 0.05         # the other way round changes the output
        assert (hc_post_ref(y, h.double(), post, comb.transpose(-1, -2)) - expected).abs().max() > 1e-2
    # and the iteration count matters for these logits
    assert (split_sinkhorn_ref(mixes_ref(conn.fn, h), conn.scale, conn.base, n, iters + 5, 1e-6)[2] - comb
            ).abs().max() > 1e-6


@pytest.mark.numerics
def test_eps_enters_after_the_softmax():
    """The sources differ on where eps enters the softmax. hcgpt follows DeepSeek-V4's inference kernel
    (softmax(l) + eps, as vLLM, Megatron-Core and Liger-Kernel carry it), not torchtitan's exp / (Σ exp + eps).
    Not a rounding matter: on sharp logits the eps floor keeps near-empty columns in the Sinkhorn scaling, and
    the two differ by far more than eps (docs/mhc_v4.md measures it)."""
    n = 4
    conn = randomize(hc.make_connection("mhc_v4", C, n, layer_idx=0), seed=5)
    h = streams(n)
    m = mixes_ref(conn.fn, h)
    after, inside = (split_sinkhorn_ref(m, conn.scale, conn.base, n, 20, 1e-6, at)[2] for at in ("after", "inside"))
    H_res = conn.coefficients(h)[2].double()
    numerics.assert_close(H_res, after.transpose(-1, -2), coefficient_path(n, 20), "H_res")
    assert (H_res - inside.transpose(-1, -2)).abs().max() > 1e-2
    # pre = sigmoid(...) + eps, post without eps (seen at a large eps)
    conn = randomize(hc.make_connection("mhc_v4", C, n, layer_idx=0, hc_eps=0.25), seed=5)
    pre, post, _ = split_sinkhorn_ref(m, conn.scale, conn.base, n, 20, 0.25)
    H_pre, H_post, _ = conn.coefficients(h)
    numerics.assert_close(H_pre, pre, coefficient_path(n, 20), "H_pre")
    numerics.assert_close(H_post, post, coefficient_path(n, 20), "H_post")
    assert H_pre.min() > 0.25 and H_pre.max() < 1.25


@pytest.mark.numerics
@pytest.mark.parametrize("n", [2, 4, 8])
def test_doubly_stochastic_error_at_20_iterations(n):
    """The last step normalises H_res's rows (comb's columns): rows sum to 1 within ~eps; the columns carry the
    error of 20 iterations, which the diagnostics report as it is, and more iterations shrink."""
    conn = randomize(hc.make_connection("mhc_v4", C, n, layer_idx=0), seed=4, logit_std=5.0)
    h = streams(n, B=4, T=64)
    H_res = conn.coefficients(h)[2]
    err = hc.doubly_stochastic_error(H_res)
    # the last step divides the rows by (their sum S + eps): they sum to S / (S + eps), about eps = 1e-6 off 1, and
    # for that sum's rounding over n and the row sum itself over n
    assert err["ds_row_err"] <= 1e-6 + numerics.chain(n, n) and err["min_entry"] > 0
    col_err = (H_res.double().sum(-2) - 1).abs().max().item()
    # the reported one sums the same fp32 entries in fp32: off by that sum's rounding, relative to the sum
    assert col_err > 1e-4
    numerics.assert_close(err["ds_col_err"], col_err, numerics.chain(n), "column error", scale=1 + col_err)
    conn.sinkhorn_iters = 500
    assert hc.doubly_stochastic_error(conn.coefficients(h)[2])["ds_col_err"] < err["ds_col_err"]


def test_torchtitan_init():
    """fn, base, scale ~ N(0, 0.02^2) (torchtitan's DeepSeek-V4 init): H_pre ~ 1/2, H_post ~ 1, H_res ~ 1/n."""
    torch.manual_seed(0)
    n = 4
    conn = hc.make_connection("mhc_v4", 256, n, layer_idx=0)
    for p in (conn.fn, conn.base):   # 24,576 and 24 draws
        assert 0.012 < p.std().item() < 0.028 and abs(p.mean().item()) < 4 * 0.02 / math.sqrt(p.numel())
    # sampling, not rounding: 4 standard errors of the std of N draws, 0.02 / sqrt(2 N) (1e-4 was 1.1 of them)
    assert abs(conn.fn.std().item() - 0.02) < 4 * 0.02 / math.sqrt(2 * conn.fn.numel())
    assert conn.scale.abs().max() < 0.1
    H_pre, H_post, H_res = conn.coefficients(torch.randn(2, 8, n, 256))
    assert (H_pre - 0.5).abs().max() < 0.05 and (H_post - 1).abs().max() < 0.1
    assert (H_res - 1 / n).abs().max() < 0.02
    head = hc.HCHead(256, n, hc.SchemeConfig.hc_eps)
    assert (head.weights(torch.randn(2, 8, n, 256)) - 0.5).abs().max() < 0.05


def test_bad_options():
    with pytest.raises(ConfigError, match="config key 'hc_eps' must be >= 0"):
        hc.make_connection("mhc_v4", C, 4, 0, hc_eps=-1.0)
    with pytest.raises(ConfigError, match="config key 'sinkhorn_iters' must be > 0"):
        hc.make_connection("mhc_v4", C, 4, 0, sinkhorn_iters=0)
    with pytest.raises(ConfigError, match="needs n_streams >= 2"):
        hc.make_connection("mhc_v4", C, 1, 0)
    with pytest.raises(ValueError, match=r"HCHead expects streams of shape \(B, T, n=4"):
        hc.HCHead(C, 4, hc.SchemeConfig.hc_eps)(torch.randn(2, 3, 2, C))


# ---------------------------------------------------------------------------------------
# hc_head

@pytest.mark.numerics
@pytest.mark.parametrize("n", [2, 4])
def test_hc_head_equals_the_public_formula(n):
    head = randomize(hc.HCHead(C, n, hc.SchemeConfig.hc_eps), seed=7)
    h = streams(n)
    w, out = hc_head_ref(head.fn, head.scale, head.base, h, 1e-6)
    rel = numerics.chain(n * C, n * C, n)   # fp32 against float64: the norm and projection over n C, the sum over n
    numerics.assert_close(head.weights(h), w, rel, "weights")
    numerics.assert_close(head(h), out, rel, "readout")
    assert w.std() > 0.1                                              # weights vary by token and stream
    assert (out - h.double().mean(-2)).abs().max() > 0.1              # not the mean readout


def tiny(arch="gpt2", **kw):
    cfg = dict(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=24, dropout=0.0, arch=arch,
               bias=arch == "gpt2", n_streams=4)
    cfg.update(kw)
    return GPTConfig(**cfg)


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["gpt2", "nanochat"])
def test_hc_head_readout_in_both_architectures(arch):
    """read_out = final norm of the hc_head sum; the head trains with every n-stream scheme; building it last leaves
    the rest of the model as with readout="mean" (paired readout ablations at one seed)."""
    for scheme in N_STREAM_SCHEMES:
        torch.manual_seed(0)
        model = GPT(tiny(arch, scheme=scheme, readout="hc_head"))
        torch.manual_seed(0)
        mean = GPT(tiny(arch, scheme=scheme))
        sd, sd_mean = model.state_dict(), mean.state_dict()
        assert set(sd) - set(sd_mean) == {"hc_head.fn", "hc_head.base", "hc_head.scale"}
        assert all(torch.equal(sd_mean[k], sd[k]) for k in sd_mean), scheme
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.02)   # nanochat's zero unembedding would give the head no gradient
        idx = torch.randint(0, 96, (2, 16))
        _, loss = model(idx, idx)
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hc_head.parameters()), scheme
    randomize(model.hc_head, seed=3)
    h = streams(4, T=6).repeat(1, 1, 1, 2)[..., :24].contiguous()
    norm = model.transformer.ln_f if arch == "gpt2" else model_module.norm
    _, out = hc_head_ref(model.hc_head.fn, model.hc_head.scale, model.hc_head.base, h, 1e-6)
    # hc_head's norm and projection over n C and sum over n against float64 (rounded to fp32), then the same norm
    # (mean and variance over C)
    rel = numerics.chain(4 * 24, 4 * 24, 4, 24, 24)
    numerics.assert_close(model.read_out(h, norm), norm(out.float()), rel, "read_out")


def test_hc_head_needs_streams(data_dir, tmp_path):
    with pytest.raises(ValueError, match="readout 'hc_head' weighs n streams"):
        GPT(tiny(scheme="plain", n_streams=1, readout="hc_head"))
    with pytest.raises(ConfigError, match="readout 'hc_head' weighs n streams"):
        train.main(tiny_args(data_dir, tmp_path / "p", "--scheme=plain", "--readout=hc_head"))
    with pytest.raises(ConfigError, match="'hc_eps' must be >= 0"):
        train.main(tiny_args(data_dir, tmp_path / "e", "--scheme=mhc_v4", "--hc_eps=-1"))


# ---------------------------------------------------------------------------------------
# optimizer groups, parameter counts

def test_adamw_groups():
    """Decayed: the projections fn of the connections and of hc_head; not decayed: base and scale."""
    model = GPT(tiny(scheme="mhc_v4", readout="hc_head"))
    names = {id(p): k for k, p in model.named_parameters()}
    opt = optim.build(model, optim.OptimConfig(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95), "cpu")
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert not decay & no_decay and decay | no_decay == set(names.values())
    v4 = {k for k in names.values() if ".hc_" in k or k.startswith("hc_head.")}
    assert {k for k in v4 if k.endswith(".fn")} == v4 & decay == {
        "hc_head.fn", *(f"transformer.h.{i}.hc_{s}.fn" for i in range(2) for s in ("attn", "mlp"))}
    assert {k.rsplit(".", 1)[1] for k in v4 & no_decay} == {"base", "scale"}


@pytest.mark.parametrize("hc_optimizer", ["adamw", "muon"])
def test_muon_groups(hc_optimizer):
    model = GPT(tiny("nanochat", scheme="mhc_v4", readout="hc_head"))
    names = {id(p): k for k, p in model.named_parameters()}
    # configure_muon's former defaults (betas (0.8, 0.95), eps 1e-10) where OptimConfig's differ
    opt = optim.build(model, optim.OptimConfig(optimizer="muon", learning_rate=1e-3, hc_optimizer=hc_optimizer,
                                               weight_decay=0.1, beta1=0.8, beta2=0.95, adam_eps=1e-10), "cpu")
    sets = {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert sum(len(s) for s in sets.values()) == len(names)            # every parameter exactly once
    fns = {k for k in names.values() if k.endswith(".fn")}
    assert "hc_head.fn" in fns and len(fns) == 5
    assert sets["hc_decay" if hc_optimizer == "adamw" else "hc_matrices"] == fns
    assert sets["hc"] == {k for k in names.values() if k.endswith((".base", ".scale"))}
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["hc"]["weight_decay"] == 0.0
    if hc_optimizer == "adamw":
        assert groups["hc_decay"]["weight_decay"] == 0.1 and groups["hc_decay"]["base_lr"] == 1e-3


def test_parameter_counts(capsys):
    """Per connection nC(n² + 2n) + n² + 2n + 3 (mHC's count less the norm gain γ); hc_head n·nC + n + 1."""
    for n, dim in ((4, 768), (2, 64), (8, 32)):
        conn = hc.make_connection("mhc_v4", dim, n, 0)
        mhc = hc.make_connection("mhc", dim, n, 0)
        count = sum(p.numel() for p in conn.parameters())
        assert count == n * dim * (n * n + 2 * n) + n * n + 2 * n + 3
        assert sum(p.numel() for p in mhc.parameters()) - count == n * dim
        assert sum(p.numel() for p in hc.HCHead(dim, n, hc.SchemeConfig.hc_eps).parameters()) == n * n * dim + n + 1
    from scripts import param_table
    param_table.main(["--n-streams", "4"])
    out = capsys.readouterr().out
    assert "| mhc_v4 | 4 | 73,755 | 1,770,120 | 1,770.1 |" in out
    assert "| hc_head | 4 | 12,293 |" in out
    model = GPT(tiny(scheme="mhc_v4", readout="hc_head", n_embd=32))
    plain = GPT(tiny(scheme="plain", n_streams=1, n_embd=32))
    assert model.num_params() - plain.num_params() == 4 * (4 * 32 * 24 + 24 + 3) + (4 * 4 * 32 + 5)


def test_sweep_schemes_preset_in_both_setups(capsys):
    """--preset schemes runs mhc_v4 beside the paper schemes in the GPT-2 grid and in the nanochat setup; a
    readout=hc_head sweep names the n-stream schemes (plain has one stream)."""
    from scripts import sweep
    assert sweep.main(["--preset", "schemes", "--configs", "configs/fwe_s.py", "configs/nanochat_d12.py",
                       "--nproc", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [(line.split(" train.py ")[1].split()[0], line.split("--scheme=")[1].split()[0]) for line in lines]
    assert runs == [(c, s) for c in ("configs/fwe_s.py", "configs/nanochat_d12.py") for s in hc.SCHEMES]
    assert sum("--scheme=mhc_v4 --n_streams=4" in line for line in lines) == 2
    with pytest.raises(SystemExit):
        sweep.main(["--preset", "schemes", "--configs", "configs/fwe_s.py", "--nproc", "8", "--", "--readout=hc_head"])
    assert "readout 'hc_head' weighs n streams and plain has one" in capsys.readouterr().err
    assert sweep.main(["--schemes", "mhc", "mhc_v4", "--configs", "configs/fwe_s.py", "--nproc", "8", "--",
                       "--readout=hc_head"]) == 0
    assert all(line.endswith("--readout=hc_head  # start") for line in capsys.readouterr().out.splitlines())


# ---------------------------------------------------------------------------------------
# diagnostics, fused routing, compile

@pytest.mark.numerics
def test_diagnostics_report_readout_weights():
    torch.manual_seed(0)
    model = GPT(tiny(scheme="mhc_v4", readout="hc_head"))
    randomize(model.hc_head, seed=1)
    x = torch.randint(0, 96, (2, 16))
    d = evals.val.residual_diagnostics(model, x, torch.autocast("cpu", enabled=False))
    s = d["scalars"]
    seen = []
    hook = model.hc_head.register_forward_pre_hook(lambda mod, args: seen.append(mod.weights(args[0])))
    model.eval()
    with torch.no_grad():
        model(x)
    hook.remove()
    w = seen[0].flatten(0, 1)
    # the weights of the same streams, which one forward with and one without autograd computed (the model's
    # forward, at most), then hc_head's norm and projection over n C and the mean over the 32 tokens
    rel = numerics.gpt2_path(2, 24, 2, 16, 96, 32, n=4, sinkhorn_iters=20, backward=False) + numerics.chain(96, 96, 32)
    for i in range(4):
        numerics.assert_close(s[f"readout/w_mean/{i}"], w[:, i].mean().item(), rel, f"mean readout weight {i}")
        assert s[f"readout/w_min/{i}"] <= s[f"readout/w_mean/{i}"] <= s[f"readout/w_max/{i}"]
    assert len({round(s[f"readout/w_mean/{i}"], 4) for i in range(4)}) > 1
    # mhc_v4's rows: eps off 1 (see test_doubly_stochastic_error_at_20_iterations), and rounding
    assert s["L00.attn/ds_row_err"] <= 1e-6 + numerics.chain(4, 4) and "composite/amax_fwd" in s
    assert len(d["matrices"]) == 4
    assert not any(k.startswith("readout/") for k in evals.val.residual_diagnostics(
        GPT(tiny(scheme="mhc_v4")), x, torch.autocast("cpu", enabled=False))["scalars"])


def test_fused_path_routes_mhc_v4_to_torch(monkeypatch):
    """No Triton kernel covers mhc_v4: the dispatch says so and runs the torch path (fused='on' refuses)."""
    model = GPT(tiny(scheme="mhc_v4", readout="hc_head"))
    conn = model.connections()[0]
    assert hc_kernels.unsupported(conn, torch.zeros(1, 1, 4, 24)) == "there is no fused kernel for MHCV4"
    hc.set_fused(model, "auto")
    monkeypatch.setattr(hc, "AUTO_DEVICES", ("cuda", "cpu"))
    with pytest.warns(UserWarning, match="torch reference path runs MHCV4: there is no fused kernel"):
        check = hc_verify.verify_fused(model)
    assert check["path"] == "torch" and "no fused kernel for MHCV4" in check["reason"] and check["checks"] == []
    hc.set_fused(model, "on")
    with pytest.raises(RuntimeError, match="fused MHCV4 kernels cannot run: there is no fused kernel for MHCV4"):
        hc_verify.verify_fused(model)


@pytest.mark.numerics
def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = GPT(tiny(scheme="mhc_v4", readout="hc_head", sinkhorn_iters=3))   # 3: a shorter trace, the same ops
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 96, (2, 16))
    loss = compiled(idx, idx)[1]
    loss.backward()
    # AOT autograd's decomposed graph against eager: the model's forward in perhaps other orders (and hc_head's
    # norm, projection and sum over the streams)
    rel = numerics.gpt2_path(2, 24, 2, 16, 96, 32, n=4, sinkhorn_iters=3, backward=False) + numerics.chain(96, 96, 4)
    numerics.assert_close(loss, model(idx, idx)[1], rel, "loss")


def test_sinkhorn_backward_recomputes_and_matches_autograd():
    """The connection keeps only the logits of its Sinkhorn for backward: the gradients equal plain autograd's."""
    n = 4
    conn = randomize(hc.make_connection("mhc_v4", C, n, 0), seed=2)
    h = streams(n).requires_grad_()
    grads = torch.autograd.grad(conn(h, Branch()).square().sum(), [h, conn.fn, conn.base, conn.scale])
    z = torch.randn(3, n, n, requires_grad=True)
    plain = torch.autograd.grad(conn.sinkhorn(z).pow(3).sum(), z)[0]
    with torch.no_grad():
        z2 = z.detach().clone().requires_grad_()
    with torch.enable_grad():
        from torch.utils.checkpoint import checkpoint
        ckpt = torch.autograd.grad(checkpoint(conn.sinkhorn, z2, use_reentrant=False).pow(3).sum(), z2)[0]
    assert torch.equal(ckpt, plain)   # exact: the checkpoint recomputes the same ops on the same values
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------
# training runs

@pytest.mark.parametrize("arch", ["gpt2", "nanochat"])
def test_trains_logs_and_reloads(arch, data_dir, tmp_path, capsys):
    extra = ["--arch=nanochat", "--bias=False", "--optimizer=muon"] if arch == "nanochat" else []
    out = tmp_path / arch
    train.main(tiny_args(data_dir, out, "--scheme=mhc_v4", "--readout=hc_head", "--max_iters=6", "--eval_interval=3",
                         *extra))
    console = capsys.readouterr().out
    assert "residual path: torch" in console and " | readout w " in console
    log = read_log(out)
    evals_ = [r for r in log if r["type"] == "eval"]
    assert evals_[-1]["val_loss"] < evals_[0]["val_loss"] - 0.5
    diag = evals_[-1]["diag"]
    assert {f"readout/w_mean/{i}" for i in range(4)} <= set(diag)
    assert diag["L01.mlp/ds_row_err"] <= 1e-6 + numerics.chain(4, 4)   # eps and rounding (as above)
    assert log[0]["hc_eps"] == 1e-6 and log[0]["readout"] == "hc_head"
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert isinstance(model.hc_head, hc.HCHead) and isinstance(model.connections()[0], hc.MHCV4)


def test_exact_resume(data_dir, tmp_path):
    """Stop at step 3 and resume to 6: the same losses and weights as an uninterrupted run, bit for bit."""
    common = ["--scheme=mhc_v4", "--readout=hc_head", "--eval_interval=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(tiny_args(data_dir, full, *common, "--max_iters=6"))
    train.main(tiny_args(data_dir, part, *common, "--max_iters=3", "--lr_decay_iters=6"))
    train.main(tiny_args(data_dir, part, *common, "--max_iters=6", "--resume"))

    def records(out):
        return [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(out)
                if r["type"] in ("train", "eval")]

    assert records(part) == records(full)
    a, b = (torch.load(d / "ckpt.pt", weights_only=False)["model"] for d in (full, part))
    assert "hc_head.fn" in a and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in \['hc_eps'\]"):
        train.main(tiny_args(data_dir, part, *common, "--max_iters=8", "--resume", "--hc_eps=1e-5"))
