"""hcgpt's connections against two independent implementations, forward and backward, with the
parameters of one mapped onto the other (the mappings and every difference found: docs/peers.md).

  lucidrains' hyper-connections 0.4.11   HyperConnections == hcgpt's hc (also as initialised);
                                          ManifoldConstrainedHyperConnections == hcgpt's mhc with
                                          sinkhorn_end="cols" and coeff_norm="stream"
  Liger-Kernel 0.8.5 (Triton kernels)     LigerMHC with sinkhorn_eps=0 == hcgpt's mhc with
                                          sinkhorn_end="cols"; its pre-mix and post + residual kernels
                                          == hcgpt's mixes for the H_pre, H_post, H_res of hc, mhc_lite
                                          and kromhc

The mapping is a differentiable function from one side's parameters to the other's
(torch.func.functional_call), so one backward compares every gradient in one parametrisation. Both
sides compute in fp32 and differ by the rounding of reductions taken in other orders: each comparison
holds them to the bound that the reductions on its longest path give (tests/numerics.py: the widths
are listed in connection_path and numerics.gpt2_path), relative to the compared tensor's largest
entry. Sinkhorn runs 4 iterations,
where its order and count change H_res (the negative controls check that they do).

The peers are test dependencies (requirements-test.txt): a missing one is an error here, not a skip.
On a CPU Liger's kernels run in Triton's interpreter (TRITON_INTERPRET=1 before Triton's first
import), so their shapes are tiny: 32 tokens, one of Liger's 32-token tiles (see
test_liger_coefficients_on_a_partial_tile for the interpreter's warning on a partial one).
"""

import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before Triton's first import (Liger imports it)

from hyper_connections import HyperConnections, ManifoldConstrainedHyperConnections  # noqa: E402
from liger_kernel.ops.mhc import (LigerMHCCoeffsFunction, LigerMHCPostResFunction,  # noqa: E402
                                  LigerMHCPreFunction)
from liger_kernel.transformers import LigerMHC  # noqa: E402

import hc  # noqa: E402
import hc_kernels  # noqa: E402
import numerics  # noqa: E402
from errors import ConfigError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import peers  # noqa: E402

ITERS = 4


def streams(B, T, n, C, seed=0):
    """Streams with different RMS per stream (5 to 20): a per-stream and a one-per-token norm then
    differ, and the RMS eps (hcgpt 1e-6 under the root, lucidrains 1e-12 on the norm) moves the
    result by eps / (2 RMS^2) <= 2e-8, below fp32 rounding."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(5.0, 20.0, n).view(n, 1)
    return (torch.randn(B, T, n, C, generator=g) * scale).requires_grad_()


def make_branch(C, seed=1):
    """A sublayer with its own pre-norm, as in a block."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.LayerNorm(C), nn.Linear(C, C))


def randomize(module, seed=2, skip=()):
    """Every parameter non-trivial: scalars (gates) 0.5-1.5, matrices with unit-scale products, the rest N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(name.startswith(s) for s in skip):
                continue
            if p.numel() == 1:
                p.fill_(0.5 + torch.rand((), generator=g).item())
            elif p.dim() >= 2 or name.endswith(("dynamic_beta_fn", "norm.gamma")):
                fan_in = p.shape[-2] if p.dim() >= 2 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (2 / math.sqrt(fan_in) if "gamma" not in name else 0.3))
            else:
                p.copy_(torch.randn(p.shape, generator=g) + (1.0 if name in ("gamma", "norm_gain") else 0.0))
    return module


def connection_path(n, C, tokens, sinkhorn_iters=0):
    """The relative rounding bound of one connection around make_branch's sublayer (numerics.chain): forward,
    the coefficients' norm and projection over n C, Sinkhorn's two logsumexps over n per iteration, the pre-mix
    over n, LayerNorm's mean and variance over C, the Linear over C, the mix over n; backward, the same
    reductions transposed; then every weight's gradient summed over the tokens (a scalar gate's over the
    tokens and the up to n^2 logits it scales)."""
    fwd = (n * C, n * C, *(n,) * (2 * sinkhorn_iters), n, C, C, C, n)
    return numerics.chain(*fwd, *fwd, tokens * n * n)


# hcgpt's RMS adds eps 1e-6 under the root, lucidrains' norm divides by max(|x|, 1e-12): on a stream of RMS r
# the normed values differ by eps / (2 r^2) relative, 2e-8 at the smallest RMS streams() draws (5)
EPS_GAP = 1e-6 / (2 * 5.0 ** 2)


def close(a, b, what, rel):
    """|a - b| <= rel x the largest |b| (numerics.assert_close): rel is the comparison's derived bound."""
    numerics.assert_close(a.detach(), b.detach(), rel, what)


def assert_same(run_a, run_b, leaves, rel, seed=3):
    """run_a() == run_b() and the gradients of a random projection of the output w.r.t. every leaf."""
    out_a, out_b = run_a(), run_b()
    close(out_a, out_b, "output", rel)
    g = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(seed))
    names, tensors = zip(*leaves.items())
    grads_a = torch.autograd.grad(out_a, tensors, g)
    grads_b = torch.autograd.grad(out_b, tensors, g)
    for name, a, b in zip(names, grads_a, grads_b):
        close(a, b, f"gradient of {name}", rel)
    return out_a


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------
# lucidrains' hyper-connections: streams folded into the batch, (B n, T, C), b-major

def to_lucidrains(h):
    B, T, n, C = h.shape
    return h.transpose(1, 2).reshape(B * n, T, C)


def from_lucidrains(x, n):
    return x.unflatten(0, (-1, n)).transpose(1, 2)


def run_lucidrains(peer, h, branch):
    branch_input, add_residual = peer(to_lucidrains(h))
    return from_lucidrains(add_residual(branch(branch_input)), h.shape[-2])


def hc_from_lucidrains(p):
    """HyperConnections -> hcgpt's HyperConnection (a bijection). static_alpha (n, 1 + n) = [A_m | A_r]
    (row: input stream; column 0: the branch input, 1 + i: output stream i), dynamic_alpha_fn (C, 1 + n)
    = [W_m | W_r] and one scale for both (s_α), dynamic_beta_fn (C,) = W_β; RMSNorm gain = 1 + gamma."""
    return {"norm_gain": p.norm.gamma + 1, "W_m": p.dynamic_alpha_fn[:, :1], "W_r": p.dynamic_alpha_fn[:, 1:],
            "W_beta": p.dynamic_beta_fn[:, None], "s_alpha": p.dynamic_alpha_scale, "s_beta": p.dynamic_beta_scale,
            "A_m": p.static_alpha[:, 0], "A_r": p.static_alpha[:, 1:], "B": p.static_beta}


def mhc_from_lucidrains(p, n):
    """ManifoldConstrainedHyperConnections -> hcgpt's MHC with coeff_norm="stream". The package projects
    each stream with one shared W = dynamic_alpha_fn[0] (C, 1 + n) and w_β = dynamic_beta_fn (C,): in
    hcgpt's dense φ (n C, 2n + n²) that is a block structure, stream j's rows feeding only its own
    logits: m_pre[j] = x_j·W[:, 0], m_post[j] = x_j·w_β, m_res[i n + j] = x_j·W[:, 1 + i] (H_res[i, j]:
    input j to output i). Statics: b_pre = static_alpha[:, 0], b_post = static_beta,
    b_res[i n + j] = static_alpha[j, 1 + i]; gates: pre_branch_scale, h_post_scale, residual_scale."""
    W = p.dynamic_alpha_fn[0]
    eye = torch.eye(n)
    pre = torch.einsum("jk,c->jck", eye, W[:, 0])
    post = torch.einsum("jk,c->jck", eye, p.dynamic_beta_fn)
    res = torch.einsum("jl,ci->jcil", eye, W[:, 1:]).flatten(2)
    return {"phi": torch.cat([pre, post, res], dim=-1).flatten(0, 1), "gamma": (p.norm.gamma + 1).repeat(n),
            "alpha_pre": p.pre_branch_scale[0], "alpha_post": p.h_post_scale, "alpha_res": p.residual_scale[0],
            "b_pre": p.static_alpha[:, 0], "b_post": p.static_beta, "b_res": p.static_alpha[:, 1:].T.flatten()}


@pytest.mark.parametrize("n", [2, 4])
def test_hc_equals_lucidrains_hc(n):
    C, layer = 24, 3
    peer = randomize(HyperConnections(n, dim=C, layer_index=layer))
    ours = hc.make_connection("hc", C, n, layer)
    branch, h = make_branch(C), streams(2, 5, n, C)
    leaves = {"h": h, **{f"peer.{k}": v for k, v in peer.named_parameters()},
              **{f"branch.{k}": v for k, v in branch.named_parameters()}}
    assert_same(lambda: functional_call(ours, hc_from_lucidrains(peer), (h, branch)),
                lambda: run_lucidrains(peer, h, branch), leaves, connection_path(n, C, 2 * 5) + EPS_GAP)


@pytest.mark.parametrize("n", [2, 4])
def test_hc_init_equals_lucidrains_init(n):
    """As initialised (layer_index = hcgpt's layer_idx), the two HC are the same parameters."""
    for layer in range(n + 1):
        peer, ours = HyperConnections(n, dim=16, layer_index=layer), hc.make_connection("hc", 16, n, layer)
        for k, v in hc_from_lucidrains(peer).items():
            assert torch.equal(getattr(ours, k).data, v.data.reshape(getattr(ours, k).shape)), (k, layer)


@pytest.mark.parametrize("exp_space", [True, False])
@pytest.mark.parametrize("n", [2, 4])
def test_mhc_equals_lucidrains_mhc(n, exp_space):
    """The package's default Sinkhorn is in exp space (amax-shifted, l1 normalisations), its option
    log_domain_sinkhorn the log-space iteration hcgpt runs: the same function, equal at fp32 rounding."""
    C, layer = 24, 3
    peer = randomize(ManifoldConstrainedHyperConnections(n, dim=C, layer_index=layer, sinkhorn_iters=ITERS,
                                                         log_domain_sinkhorn=not exp_space))
    ours = hc.make_connection("mhc", C, n, layer, sinkhorn_iters=ITERS, sinkhorn_end="cols", coeff_norm="stream")
    branch, h = make_branch(C), streams(2, 5, n, C)
    leaves = {"h": h, **{f"peer.{k}": v for k, v in peer.named_parameters()},
              **{f"branch.{k}": v for k, v in branch.named_parameters()}}
    out = assert_same(lambda: functional_call(ours, mhc_from_lucidrains(peer, n), (h, branch)),
                      lambda: run_lucidrains(peer, h, branch), leaves,
                      connection_path(n, C, 2 * 5, sinkhorn_iters=ITERS) + EPS_GAP)
    # negative controls: hcgpt's defaults (mHC Eq. 9's order, Eq. 7's one norm per token) are other functions
    with torch.no_grad():
        for option in (dict(sinkhorn_end="rows", coeff_norm="stream"), dict(sinkhorn_end="cols", coeff_norm="flat")):
            other = hc.make_connection("mhc", C, n, layer, sinkhorn_iters=ITERS, **option)
            assert max_diff(functional_call(other, mhc_from_lucidrains(peer, n), (h, branch)), out) > 1e-3, option


def test_coeff_norm_option():
    assert hc.SchemeConfig.coeff_norm == "flat" and hc.make_connection("kromhc", 8, 4, 0).coeff_norm == "flat"
    with pytest.raises(ConfigError, match="config key 'coeff_norm' must be one of"):
        hc.make_connection("mhc", 8, 2, 0, coeff_norm="streams")
    conn = hc.make_connection("mhc_lite", 8, 2, 0, coeff_norm="stream")
    reason = hc_kernels.unsupported(conn, torch.empty(1, 1, 2, 8, device="cuda" if torch.cuda.is_available()
                                                      else "cpu"))
    assert reason is not None and "coeff_norm='stream'" in reason   # the fused kernels norm once per token
    hc.make_connection("hc", 8, 2, 0, coeff_norm="stream")   # an option hc ignores (its norm is per stream)


def test_lucidrains_wired_into_gpt():
    """scripts/peers.py's wiring (the package's (B n, T, C) layout as a view of the model's streams,
    layer_index = the connection's index): a GPT whose connections are lucidrains' HC computes what
    hcgpt's hc computes, at init and with every connection's parameters mapped. The position embedding
    is drawn with std 5 instead of GPT-2's 0.02, so the streams have RMS about 5: at RMS 0.03 the two RMS
    eps (1e-6 under the root, 1e-12 on the norm) would differ by 6e-4 of the normed stream, at RMS 5 by
    2e-8 (EPS_GAP, docs/peers.md). The token embedding, tied to lm_head, keeps GPT-2's init: scaled with
    it, the logits would be in the hundreds and the softmax would amplify every rounding by their size."""
    cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, scheme="hc", n_streams=4)
    models = []
    for wire in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg))
        with torch.no_grad():
            model.transformer.wpe.weight.mul_(250)
        models.append(peers.wire(model, "lucidrains HC") if wire else model)
    ours, theirs = models
    assert all(isinstance(c, peers.LucidrainsConnection) for c in theirs.connections())
    assert hc.rms(ours.transformer.wpe.weight).min() > 3.0   # EPS_GAP at RMS 3: 6e-8
    rel = numerics.gpt2_path(2, 32, 2, 16, 64, 2 * 16, n=4) + 1e-6 / (2 * 3.0 ** 2)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in ("init", "mapped"):
        if step == "mapped":
            with torch.no_grad():
                for i, (a, b) in enumerate(zip(ours.connections(), theirs.connections())):
                    randomize(b.peer, seed=10 + i)
                    for k, v in hc_from_lucidrains(b.peer).items():
                        getattr(a, k).copy_(v.reshape(getattr(a, k).shape))
        losses = []
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            loss = model(idx, idx)[1]
            loss.backward()
            losses.append((loss, model.transformer.wte.weight.grad, model.transformer.h[0].attn.c_attn.weight.grad))
        for a, b, what in zip(*losses, ("loss", "wte gradient", "c_attn gradient")):
            close(a, b, f"{step}: {what}", rel)


# ----------------------------------------------------------------------------------------
# Liger-Kernel's mHC kernels (Triton; on a CPU in Triton's interpreter)

@pytest.fixture
def liger(monkeypatch):
    if not torch.cuda.is_available() and not hc_kernels.INTERPRETER_READY:
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set: Liger's kernels cannot run "
                           "on this CPU; run this file on its own (python3 -m pytest tests/test_peers.py)")
    if hc_kernels.INTERPRETER_READY:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return "cpu"
    pytest.skip("Triton is compiled on this CUDA machine: Liger's fp32 kernels use TF32 there, so the fp32 "
                "comparison runs on CPU-only machines (in CI); scripts/bench.py --peers times Liger on the GPU")


def liger_from_hcgpt(o):
    """hcgpt's MHC -> LigerMHC. Liger has no γ: it is folded into φ (φ_liger = diag(γ) φ, the same
    product (x γ) φ); b = [b_pre | b_post | b_res] (b_res row-major, H_res[out, in], as hcgpt's)."""
    return {"phi": o.gamma[:, None] * o.phi, "b": torch.cat([o.b_pre, o.b_post, o.b_res]),
            "alpha_pre": o.alpha_pre, "alpha_post": o.alpha_post, "alpha_res": o.alpha_res}


def hcgpt_mhc(n, C, **options):
    return randomize(hc.make_connection("mhc", C, n, 1, sinkhorn_iters=ITERS, **options))


def test_liger_mhc_equals_hcgpt_mhc(liger):
    """LigerMHC (fused matmul + RMS, Sinkhorn, pre-mix, post + residual kernels) == hcgpt's mhc with
    sinkhorn_end="cols" (Liger starts with a row softmax and ends on the columns) and Liger's
    sinkhorn_eps = 0 (its default 1e-6 is added to every entry and denominator), tmax = sinkhorn_iters."""
    n, C = 4, 16
    ours = hcgpt_mhc(n, C, sinkhorn_end="cols")
    branch, h = make_branch(C), streams(2, 16, n, C).detach().div_(10).requires_grad_()
    peer = LigerMHC(branch, hc=n, c=C, tmax=ITERS, sinkhorn_eps=0.0, phi_dtype=torch.float32, allow_fp32=True)
    leaves = {"h": h, **{f"hcgpt.{k}": v for k, v in ours.named_parameters()},
              **{f"branch.{k}": v for k, v in branch.named_parameters()}}
    with np.errstate(invalid="raise", divide="raise"):   # no invalid value anywhere on whole tiles
        rel = connection_path(n, C, 2 * 16, sinkhorn_iters=ITERS)
        assert_same(lambda: ours(h, branch), lambda: functional_call(peer, liger_from_hcgpt(ours), (h,)), leaves, rel)
        with torch.no_grad():   # the coefficients themselves, and the control: mHC Eq. 9's order differs
            mapped = liger_from_hcgpt(ours)
            theirs = LigerMHCCoeffsFunction.apply(h, mapped["phi"], mapped["b"], ours.alpha_pre, ours.alpha_post,
                                                  ours.alpha_res, True, ITERS, 1e-6, 0.0, 0.0, 2.0)
            for a, b, what in zip(ours.coefficients(h), theirs, ("H_pre", "H_post", "H_res")):
                close(a, b, what, rel)
            rows = hcgpt_mhc(n, C, sinkhorn_end="rows")
            rows.load_state_dict(ours.state_dict())
            assert max_diff(rows.coefficients(h)[2], theirs[2]) > 1e-3


def test_liger_coefficients_on_a_partial_tile(liger):
    """16 tokens, half of Liger's 32-token tile: the interpreter warns 'invalid value in divide' in
    the coefficients' backward. It is the masked rows: _mhc_mm_norm_bwd_fused_kernel loads their 1/rms
    as 0 (other=0.0) and forms g_acc / invr = 0 / 0 for them, and the masked store drops it. The
    gradients of the real rows are finite and equal to hcgpt's."""
    n, C = 4, 16
    ours = hcgpt_mhc(n, C, sinkhorn_end="cols")
    h = streams(1, 16, n, C, seed=5).detach().div_(10).requires_grad_()
    leaves = {"h": h, **{f"hcgpt.{k}": v for k, v in ours.named_parameters()}}

    def theirs():
        m = liger_from_hcgpt(ours)
        out = LigerMHCCoeffsFunction.apply(h, m["phi"], m["b"], ours.alpha_pre, ours.alpha_post, ours.alpha_res,
                                           True, ITERS, 1e-6, 0.0, 0.0, 2.0)
        return torch.cat([out[0], out[1], out[2].flatten(-2)], dim=-1)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        assert_same(lambda: torch.cat([t.flatten(2) if t.dim() == 4 else t for t in ours.coefficients(h)], dim=-1),
                    theirs, leaves, connection_path(n, C, 16, sinkhorn_iters=ITERS))


@pytest.mark.parametrize("scheme,n", [("hc", 2), ("mhc_lite", 4), ("kromhc", 4)])
def test_liger_mixes_equal_hcgpt_mixes(liger, scheme, n):
    """Liger's pre-mix and post + residual kernels take any per-token H_pre, H_post, H_res: fed hcgpt's
    coefficients they compute hcgpt's connection, x_in = Σ_j H_pre[j] h_j, h_new = H_res h + H_post y."""
    C = 16
    ours = randomize(hc.make_connection(scheme, C, n, 1))
    branch, h = make_branch(C), streams(2, 16, n, C).detach().div_(10).requires_grad_()

    def theirs():
        H_pre, H_post, H_res = ours.coefficients(h)
        y = branch(LigerMHCPreFunction.apply(h, H_pre))
        return LigerMHCPostResFunction.apply(h, y, H_post, H_res)

    leaves = {"h": h, **{f"hcgpt.{k}": v for k, v in ours.named_parameters()},
              **{f"branch.{k}": v for k, v in branch.named_parameters()}}
    with np.errstate(invalid="raise", divide="raise"):
        assert_same(lambda: ours(h, branch), theirs, leaves, connection_path(n, C, 2 * 16))


def test_liger_wired_into_gpt(liger):
    """scripts/peers.py's LigerConnection (Liger's liger_mhc_forward with the block's branch as its layer)
    in a GPT computes what hcgpt's mhc computes with the parameters mapped (forward: the backward of
    each piece is above)."""
    cfg = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=64, block_size=16, scheme="mhc", n_streams=4,
               sinkhorn_iters=ITERS, sinkhorn_end="cols")
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**cfg))
    torch.manual_seed(0)
    theirs = peers.wire(GPT(GPTConfig(**cfg)), "liger mHC")   # the same branch weights: the connections draw none
    assert all(isinstance(c, peers.LigerConnection) for c in theirs.connections())
    with torch.no_grad():
        for a, b in zip(ours.connections(), theirs.connections()):
            randomize(a)
            b.peer.tmax, b.peer.sinkhorn_eps = ITERS, 0.0
            for k, v in liger_from_hcgpt(a).items():
                getattr(b.peer, k).copy_(v)
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        with np.errstate(invalid="raise", divide="raise"):
            rel = numerics.gpt2_path(1, 16, 2, 16, 64, 2 * 16, n=4, sinkhorn_iters=ITERS, backward=False)
            close(ours(idx)[0], theirs(idx)[0], "logits", rel)
