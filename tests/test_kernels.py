"""The fused Triton kernels of hc_kernels.py against the torch reference path of hc.py.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is slow, so shapes
are tiny (but cross tile edges: more tokens than one program holds, C not a multiple of the
channel tile). The same tests run compiled on CUDA when a GPU is present.

The kernels and torch compute the same sums in other orders: every comparison is held to the bound
of the reductions on its path (tests/numerics.py: connection_path, chain), relative to the compared
tensor's largest entry, or for a scalar gate's gradient to the sum of its terms' magnitudes; bf16
adds u(bf16) for each rounding to bf16 on the path.
"""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    # before Triton's first import, which builds its library functions for the interpreter or not
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import hc  # noqa: E402
import hc_kernels  # noqa: E402
import numerics  # noqa: E402
import optim  # noqa: E402

C = 40  # two channel tiles of 32 in the interpreter, the second one partial
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
CASES = [("hc", 2), ("hc", 3), ("hc", 4), ("mhc", 2), ("mhc", 3), ("mhc", 4), ("mhc_lite", 2), ("mhc_lite", 3),
         ("mhc_lite", 4), ("kromhc", 2), ("kromhc", 4), ("kromhc", 6)]
ITERS = hc.SchemeConfig.sinkhorn_iters   # mhc's Sinkhorn iterations as built here
# bf16 streams under autocast: the roundings to bf16 on one connection's path, each a relative error of at most
# u(bf16) = 2^-8 on its value: forward x_in, the Linear's input, weight and output, the new streams; backward the
# output's gradient, y's, the Linear's input and weight gradients, x_in's and h's
BF16_ROUNDINGS = 11


def bound(scheme, n, tokens, dtype=torch.float32, depth=1):
    """The derived relative bound of `depth` connections (and their branches) on `tokens` tokens against an exact
    (float64) run, or of two fp32 runs in other orders: numerics.connection_path, plus bf16's roundings."""
    rel = numerics.connection_path(scheme, n, C, tokens, sinkhorn_iters=ITERS, depth=depth)
    return rel + (depth * BF16_ROUNDINGS * numerics.u(torch.bfloat16) if dtype == torch.bfloat16 else 0.0)


@pytest.fixture
def fused(monkeypatch, device):
    """The fused path 'on' for this test (the mode to build its connections with); on CPU through Triton's
    interpreter."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "on"


def randomize(conn, seed=0, logit_std=3.0):
    """Non-trivial parameters: gates open, projections giving logits of std ~ logit_std."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if p.dim() == 0:
                p.fill_(0.5 + torch.rand((), generator=g).item())
            elif name in ("phi", "W_m", "W_r", "W_beta"):
                p.copy_(torch.randn(p.shape, generator=g) * logit_std / math.sqrt(p.shape[0]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) + (1.0 if name in ("norm_gain", "gamma") else 0.0))
    return conn


class Branch(nn.Module):
    """A stand-in sublayer with its own pre-norm."""

    def __init__(self, dim=C):
        super().__init__()
        torch.manual_seed(2)
        self.ln, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(self.ln(x))


def run_connection(conn, branch, h, w, mode, monkeypatch):
    """Output and the gradients of <out, w> w.r.t. h and every parameter, with the connection's fused = mode, and
    the scalar gates' gradient scales (numerics.gate_term_scales; found on the torch path only)."""
    hc.set_fused(conn, mode)
    conn.zero_grad(set_to_none=True)
    branch.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=h.dtype == torch.bfloat16):
        out = conn(h, branch)
    scales = numerics.gate_term_scales(out, {f"conn.{k}": p for k, p in conn.named_parameters() if p.dim() == 0})
    (out.double() * w).sum().backward()
    grads = {"h": h.grad}
    grads.update({f"conn.{k}": p.grad for k, p in conn.named_parameters()})
    grads.update({f"branch.{k}": p.grad for k, p in branch.named_parameters()})
    return out.detach(), grads, scales


# ---------------------------------------------------------------------------------------
# the whole connection: fused="on" against "off"

@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,n", CASES)
def test_connection_matches_torch_path(scheme, n, dtype, device, fused, monkeypatch):
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=1), seed=n).to(device)
    branch = Branch().to(device)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 12, n, C, generator=g).to(device, dtype)      # 24 tokens: two programs of 16
    w = torch.randn(2, 12, n, C, generator=g, dtype=torch.float64).to(device)
    out_f, grads_f, _ = run_connection(conn, branch, h, w, "on", monkeypatch)
    out_t, grads_t, _ = run_connection(conn, branch, h, w, "off", monkeypatch)
    assert_follows_torch(out_f, grads_f, out_t, grads_t, dtype, lambda: run_connection(
        copy.deepcopy(conn).double(), copy.deepcopy(branch).double(), h.double(), w, "off", monkeypatch),
        bound(scheme, n, 24, dtype))


def assert_follows_torch(out_f, grads_f, out_t, grads_t, dtype, fp64_run, rel):
    """The fused output and gradients against the torch path's (fp32: two orders of the same sums) or, with bf16
    streams, both paths against an fp64 run of the torch path (fp64_run(), whose float64 rounding is 2^-29 of
    fp32's); rel: the derived bound of the path. A scalar gate's gradient is a sum with cancellation: its
    rounding is relative to the sum of its terms' magnitudes (numerics.gate_term_scales, from the fp64 run)."""
    assert out_f.dtype == dtype and out_f.shape == out_t.shape
    assert grads_f.keys() == grads_t.keys()
    out_64, grads_64, scales = fp64_run()
    if dtype == torch.float32:
        numerics.assert_close(out_f, out_t, rel, "output")
        for k in grads_t:
            numerics.assert_close(grads_f[k], grads_t[k], rel, f"gradient of {k}", scale=scales.get(k))
        return
    # bf16: the two paths round at the same places but may round one value to neighbouring bf16 numbers,
    # and such a flip moves everything after it; each path is held to its own roundings against fp64
    for path, out, grads in (("fused", out_f, grads_f), ("torch", out_t, grads_t)):
        numerics.assert_close(out, out_64, rel, f"{path}: output")
        for k in grads_64:
            numerics.assert_close(grads[k], grads_64[k], rel, f"{path}: gradient of {k}", scale=scales.get(k))


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,n,T", [("hc", 3, 1), ("mhc", 3, 5), ("kromhc", 6, 1)])
def test_h_gradient_summed_in_the_pre_mix_kernel(scheme, n, T, device, fused, monkeypatch):
    """The post-mix's h-gradient reaches the pre-mix backward kernel, which writes h's whole
    gradient (no second gradient of h summed by autograd); n = 3 and 6, one token per sequence."""
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=2), seed=n).to(device)
    branch = Branch().to(device)
    h = torch.randn(3, T, n, C, device=device)
    w = torch.randn(3, T, n, C, dtype=torch.float64, device=device)
    given = []
    backward = hc_kernels.pre_mix_backward
    monkeypatch.setattr(hc_kernels, "pre_mix_backward",
                        lambda *a: (given.append(a[9] is not None), backward(*a))[1])
    out_f, grads_f, _ = run_connection(conn, branch, h, w, "on", monkeypatch)
    out_t, grads_t, _ = run_connection(conn, branch, h, w, "off", monkeypatch)
    assert given == [True]
    assert_follows_torch(out_f, grads_f, out_t, grads_t, torch.float32, lambda: run_connection(
        copy.deepcopy(conn).double(), copy.deepcopy(branch).double(), h.double(), w, "off", monkeypatch),
        bound(scheme, n, 3 * T))


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["hc", "kromhc"])
def test_expanded_streams(scheme, device, fused, monkeypatch):
    """The first connection sees expand_streams' view (stride 0 over n); the kernels read it in place."""
    n = 4
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=0), seed=5).to(device)
    branch = Branch().to(device)
    x = torch.randn(2, 9, C, device=device)
    h = hc.expand_streams(x, n)
    assert h.stride(-2) == 0
    w = torch.randn(2, 9, n, C, dtype=torch.float64, device=device)
    results = []
    for mode in ("on", "off"):
        hc.set_fused(conn, mode)
        xx = x.detach().clone().requires_grad_()
        out = conn(hc.expand_streams(xx, n), branch)
        (out.double() * w).sum().backward()
        results.append((out.detach(), xx.grad))
    # x's gradient adds up the n streams' (one more sum over n)
    rel = bound(scheme, n, 2 * 9) + numerics.gamma_p(n)
    numerics.assert_close(results[0][0], results[1][0], rel, "output")
    numerics.assert_close(results[0][1], results[1][1], rel, "gradient of x")


# ---------------------------------------------------------------------------------------
# a stack of connections (hc.run_connections): (b) of one and (a) of the next in one kernel

def make_chain(scheme, n, device, depth=3):
    """depth connections of a scheme, each with its own branch (different weights: a mixed-up y shows)."""
    conns = [randomize(hc.make_connection(scheme, C, n, layer_idx=i), seed=10 * n + i).to(device) for i in range(depth)]
    branches = []
    for i in range(depth):
        branch = Branch().to(device)
        with torch.no_grad():
            branch.fc.weight.mul_(1 + i / 2)
            branch.ln.bias.add_(i)
        branches.append(branch)
    return conns, branches


def run_chain(conns, branches, x, w, mode, monkeypatch):
    """run_connections' output, the gradients of <out, w> w.r.t. its input and every parameter, and the gates'
    gradient scales. x: the streams (B, T, n, C), or the embedding (B, T, C) expanded to n streams (a stride-0 view)."""
    for conn in conns:
        hc.set_fused(conn, mode)
    for module in (*conns, *branches):
        module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    h = x if x.dim() == 4 else hc.expand_streams(x, conns[0].n)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        out = hc.run_connections(conns, branches, h)
    scales = numerics.gate_term_scales(out, {f"conn{i}.{k}": p for i, conn in enumerate(conns)
                                             for k, p in conn.named_parameters() if p.dim() == 0})
    (out.double() * w).sum().backward()
    grads = {"x": x.grad}
    for i, (conn, branch) in enumerate(zip(conns, branches)):
        grads.update({f"conn{i}.{k}": p.grad for k, p in conn.named_parameters()})
        grads.update({f"branch{i}.{k}": p.grad for k, p in branch.named_parameters()})
    return out.detach(), grads, scales


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,n", [("hc", 3), ("mhc", 3), ("mhc_lite", 3), ("kromhc", 4)])
def test_chain_matches_torch_path(scheme, n, dtype, device, fused, monkeypatch):
    """Three connections, two joined boundaries: the forward and every gradient (the input, each
    connection's and each branch's parameters) follow the sequential torch calls."""
    conns, branches = make_chain(scheme, n, device)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 7, n, C, generator=g).to(device, dtype)       # 21 tokens: two programs of 16
    w = torch.randn(3, 7, n, C, generator=g, dtype=torch.float64).to(device)
    out_f, grads_f, _ = run_chain(conns, branches, h, w, "on", monkeypatch)
    out_t, grads_t, _ = run_chain(conns, branches, h, w, "off", monkeypatch)
    assert_follows_torch(out_f, grads_f, out_t, grads_t, dtype, lambda: run_chain(
        [copy.deepcopy(c).double() for c in conns], [copy.deepcopy(b).double() for b in branches],
        h.double(), w, "off", monkeypatch), bound(scheme, n, 21, dtype, depth=3))


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,n", [("hc", 3), ("mhc", 3), ("kromhc", 6)])
def test_chain_runs_one_kernel_per_boundary(scheme, n, device, fused, monkeypatch):
    """One token per sequence, the embedding's expanded streams (stride 0 over n) as input: (a) of the
    first connection, post_pre_mix at each of the two boundaries, (b) of the last; in the backward
    each boundary's kernel gets the next (b)'s h-gradient to add on chip, and no separate (b)
    backward runs there. The result is the torch path's."""
    conns, branches = make_chain(scheme, n, device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, C, generator=g).to(device)
    w = torch.randn(4, 1, n, C, generator=g, dtype=torch.float64).to(device)
    calls = []
    for name in ("pre_mix", "pre_mix_backward", "post_mix", "post_mix_backward", "post_pre_mix",
                 "post_pre_mix_backward"):
        op = getattr(hc_kernels, name)
        monkeypatch.setattr(hc_kernels, name, lambda *a, op=op, name=name: (calls.append((name, a)), op(*a))[1])
    out_f, grads_f, _ = run_chain(conns, branches, x, w, "on", monkeypatch)
    names = [name for name, _ in calls]
    assert names == ["pre_mix", "post_pre_mix", "post_pre_mix", "post_mix", "post_mix_backward",
                     "post_pre_mix_backward", "post_pre_mix_backward", "pre_mix_backward"], names
    assert all(a[13] is not None for name, a in calls if name == "post_pre_mix_backward")   # grad h_new
    assert calls[-1][1][9] is not None                                   # the first (b)'s h-gradient into (a)
    assert calls[1][1][0].stride(-2) == 0                                # read in place, not copied
    out_t, grads_t, _ = run_chain(conns, branches, x, w, "off", monkeypatch)
    # n identical streams: the first connection's H_res gets gradients that are 0 in exact arithmetic (a
    # mix of equal streams changes nothing), so rounding alone, in every path; the rest is compared
    kept = lambda grads: {k: v for k, v in grads.items() if not k.startswith("conn0.")}  # noqa: E731
    fp64 = lambda: run_chain([copy.deepcopy(c).double() for c in conns],  # noqa: E731
                             [copy.deepcopy(b).double() for b in branches], x.double(), w, "off", monkeypatch)
    # x's gradient also adds up the n streams' (one more sum over n)
    assert_follows_torch(out_f, kept(grads_f), out_t, kept(grads_t), torch.float32, fp64,
                         bound(scheme, n, 4, depth=3) + numerics.gamma_p(n))


# ---------------------------------------------------------------------------------------
# each kernel against the equations of hc.py

def pre_mix_reference(h, weight, gain, scale, bias, per_stream):
    """m, x_in of hc.py: HC Eqs. 10-13 (per-stream norm, H_pre = s tanh(H̄ W_m) + A_m) or
    mHC Eqs. 14-18 (m = (x γ) φ / rms(x), H_pre = σ(α m_pre + b_pre))."""
    n = h.shape[-2]
    hf = h.float()
    if per_stream:
        m = (hf / hc.rms(hf) * gain) @ weight
        H_pre = scale * torch.tanh(m[..., 0]) + bias
    else:
        x = hf.flatten(-2)
        m = ((x * gain) @ weight) / hc.rms(x)
        H_pre = torch.sigmoid(scale * m[..., :n] + bias)
    x_in = (H_pre.unsqueeze(-1) * hf).sum(dim=-2)
    return m, x_in.to(h.dtype)


def pre_mix_path(K, n, R, tokens, dtype=torch.float32):
    """The bound of pre_mix against its reference (numerics.chain): the RMS and the projection over K, the mix
    over n; backward the mix and the projection transposed (over n and R), the RMS's over K, and the parameters'
    gradients summed over the tokens and the R logits. bf16: x_in and h's gradient are rounded to bf16 on each
    side, which may land on neighbouring bf16 numbers: 2 u(bf16)."""
    rel = numerics.chain(K, K, n, n, R, K, tokens * R)
    return rel + (2 * numerics.u(torch.bfloat16) if dtype == torch.bfloat16 else 0.0)


def backward_with_gate_scale(loss, gate):
    """loss.backward(), and the sum of the magnitudes of the terms of the scalar gate's gradient."""
    scales = numerics.gate_term_scales(loss, {"scale": gate})
    loss.backward()
    return scales["scale"]


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_stream,n,R", [(True, 2, 4), (True, 4, 6), (False, 2, 8), (False, 4, 24),
                                            (False, 4, 32), (False, 6, 20)])
def test_pre_mix_kernel(per_stream, n, R, dtype, device, fused):
    g = torch.Generator().manual_seed(n + R)
    K = C if per_stream else n * C
    leaves = dict(h=torch.randn(3, 7, n, C, generator=g).to(dtype),
                  weight=torch.randn(K, R, generator=g) * 2 / math.sqrt(K),
                  gain=1 + torch.randn(K, generator=g),
                  scale=torch.tensor(0.8), bias=torch.randn(n, generator=g))
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    ref = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    m, rstd, x_in = hc_kernels.pre_mix(*leaves.values(), per_stream, False)
    m_ref, x_ref = pre_mix_reference(*ref.values(), per_stream)
    assert m.shape == m_ref.shape and x_in.dtype == dtype
    rel = pre_mix_path(K, n, R, 21, dtype)
    numerics.assert_close(m, m_ref, rel, "m")
    numerics.assert_close(x_in, x_ref, rel, "x_in")
    gm, gx = torch.randn_like(m), torch.randn_like(x_in.float())
    (m * gm).sum().add((x_in.float() * gx).sum()).backward()
    scale = backward_with_gate_scale((m_ref * gm).sum().add((x_ref.float() * gx).sum()), ref["scale"])
    for k in leaves:
        numerics.assert_close(leaves[k].grad, ref[k].grad, rel, f"gradient of {k}", scale if k == "scale" else None)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_stream,n,R", [(True, 3, 5), (False, 3, 15)])
def test_post_pre_mix_kernel(per_stream, n, R, device, fused):
    """(b) and the next (a) as one op (its own autograd): h_new = H_res h + H_post y, then m and x_in of
    pre_mix_reference(h_new); every gradient, with h_new's own gradient as well as m's and x_in's."""
    g = torch.Generator().manual_seed(n + R)
    K = C if per_stream else n * C
    leaves = dict(h=torch.randn(3, 7, n, C, generator=g), y=torch.randn(3, 7, C, generator=g),
                  H_res=torch.rand(3, 7, n, n, generator=g), H_post=2 * torch.rand(3, 7, n, generator=g),
                  weight=torch.randn(K, R, generator=g) * 2 / math.sqrt(K), gain=1 + torch.randn(K, generator=g),
                  scale=torch.tensor(0.8), bias=torch.randn(n, generator=g))
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    ref = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    h_new, m, rstd, x_in = hc_kernels.post_pre_mix(*leaves.values(), per_stream, False)
    h, y, H_res, H_post, *projection = ref.values()
    h_ref = (H_res.unsqueeze(-1) * h.unsqueeze(-3)).sum(dim=-2) + H_post.unsqueeze(-1) * y.unsqueeze(-2)
    m_ref, x_ref = pre_mix_reference(h_ref, *projection, per_stream)
    assert not rstd.requires_grad
    rel = numerics.chain(n + 1, n + 1) + pre_mix_path(K, n, R, 21)   # the mix over n + 1 (y), forward and back
    for what, a, b in (("h_new", h_new, h_ref), ("m", m, m_ref), ("x_in", x_in, x_ref)):
        assert a.shape == b.shape
        numerics.assert_close(a, b, rel, what)
    outs = [(h_new, h_ref), (m, m_ref), (x_in, x_ref)]
    ws = [torch.randn(a.shape, generator=g).to(device) for a, _ in outs]
    sum((a * w).sum() for (a, _), w in zip(outs, ws)).backward()
    scale = backward_with_gate_scale(sum((b * w).sum() for (_, b), w in zip(outs, ws)), ref["scale"])
    for k in leaves:
        numerics.assert_close(leaves[k].grad, ref[k].grad, rel, f"gradient of {k}", scale if k == "scale" else None)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_dtype,y_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n", [2, 4, 6])
def test_post_mix_kernel(n, h_dtype, y_dtype, device, fused):
    g = torch.Generator().manual_seed(n)
    leaves = dict(h=torch.randn(3, 7, n, C, generator=g).to(h_dtype), y=torch.randn(3, 7, C, generator=g).to(y_dtype),
                  H_res=torch.rand(3, 7, n, n, generator=g), H_post=2 * torch.rand(3, 7, n, generator=g))
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    ref = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out = hc_kernels.post_mix(*leaves.values())
    h, y, H_res, H_post = ref.values()   # the lines of hc.Connection.forward
    mixed = (H_res.unsqueeze(-1) * h.unsqueeze(-3)).sum(dim=-2)
    out_ref = (mixed + H_post.unsqueeze(-1) * y.unsqueeze(-2)).to(h.dtype)
    assert out.dtype == h_dtype
    # the mix over n + 1 terms; backward over n (h's, y's gradient) and C (H_res's, H_post's); bf16: each side
    # rounds the output (a bf16 h) and h's, y's gradients once, maybe to neighbouring bf16 numbers
    bf16 = torch.bfloat16 in (h_dtype, y_dtype)
    rel = numerics.chain(n + 1, C) + (2 * numerics.u(torch.bfloat16) if bf16 else 0.0)
    numerics.assert_close(out, out_ref, rel, "output")
    w = torch.randn(out.shape, dtype=torch.float64, device=device)
    (out.double() * w).sum().backward()
    (out_ref.double() * w).sum().backward()
    for k in leaves:
        assert leaves[k].grad.dtype == leaves[k].dtype
        numerics.assert_close(leaves[k].grad, ref[k].grad, rel, f"gradient of {k}")


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,iters", [(2, 1), (3, 20), (4, 20), (6, 5)])
def test_sinkhorn_kernel(n, iters, device, fused):
    z = (4 * torch.randn(5, 7, n, n, generator=torch.Generator().manual_seed(n))).to(device)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, out_ref = hc.sinkhorn(a, iters, fused=fused), hc.sinkhorn_reference(b, iters)   # hc.sinkhorn dispatches
    rel = numerics.sinkhorn_path(n, iters, z.abs().max().item(), backward=True)   # forward and backward
    numerics.assert_close(out, out_ref, rel, "H")
    # ends on the rows: exact but for the last logsumexp's sum over n and the row sum itself over n (the exps'
    # and subtractions' roundings add (1 + ln n) u each, within gamma_p's factor 8)
    assert hc.doubly_stochastic_error(out)["ds_row_err"] <= numerics.chain(n, n)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    numerics.assert_close(a.grad, b.grad, rel, "gradient of the logits")


# ---------------------------------------------------------------------------------------
# training: the same loss curve, and the ops under torch.compile

@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["hc", "mhc", "mhc_lite", "kromhc"])
def test_same_loss_curve(scheme, device, fused, monkeypatch):
    """A tiny GPT, 3 AdamW steps from the same seed: the fused path follows the torch path."""
    from model import GPT, GPTConfig

    def curve(mode):
        torch.manual_seed(0)
        cfg = GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=32, scheme=scheme, n_streams=4,
                        gate_init=0.5, res_logit_init=-1.0,   # gates open: the connections matter
                        sinkhorn_iters=5,                      # the interpreter is slow
                        fused=mode)
        model = GPT(cfg).to(device)
        opt = optim.build(model, optim.OptimConfig(weight_decay=0.1, learning_rate=3e-3, beta1=0.9, beta2=0.95),
                          device)
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randint(0, 64, (2, 8), generator=g).to(device) for _ in range(2))
        losses = []
        for _ in range(3):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    fused_curve, torch_curve = curve("on"), curve("off")
    assert fused_curve[-1] < fused_curve[0] - 0.05          # it trains
    # the forward's rounding, relative to the loss (tests/test_train_ddp.py: AdamW may part the two runs only on
    # weights whose gradient is rounding alone, where they cannot move the loss)
    rel = numerics.gpt2_path(2, 32, 2, 8, 64, 16, n=4, res=numerics.res_widths(scheme, 4, 5), backward=False)
    for step, (f, t) in enumerate(zip(fused_curve, torch_curve)):
        numerics.assert_close(f, t, rel, f"loss at step {step}")


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["hc", "mhc"])
def test_compile_fullgraph(scheme, device, fused):
    """The kernels are custom ops: torch.compile traces two connections (joined at their boundary)
    in one graph around them."""
    torch._dynamo.reset()
    n = 4
    conns = [randomize(hc.make_connection(scheme, C, n, layer_idx=i, fused=fused), seed=12 + i).to(device)
             for i in range(2)]
    branches = [Branch().to(device), Branch().to(device)]
    compiled = torch.compile(lambda h: hc.run_connections(conns, branches, h), fullgraph=True, backend="aot_eager")
    h1 = torch.randn(2, 5, n, C, device=device).requires_grad_()
    h2 = h1.detach().clone().requires_grad_()
    out_c, out_e = compiled(h1), conns[1](conns[0](h2, branches[0]), branches[1])
    rel = bound(scheme, n, 10, depth=2)        # the joined boundary kernel against two connections' kernels
    numerics.assert_close(out_c, out_e, rel, "output")
    out_c.pow(2).sum().backward()
    out_e.pow(2).sum().backward()
    numerics.assert_close(h1.grad, h2.grad, rel, "gradient of h")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, fused):
    """Schema, fake (meta) kernels and autograd registration of the custom ops."""
    n = 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g).to(device).requires_grad_()  # noqa: E731
    cases = [(hc_kernels.pre_mix, (r(2, 3, n, C), r(n * C, 24), r(n * C), r(), r(n), False, False)),
             (hc_kernels.pre_mix, (r(2, 3, n, C), r(C, n + 2), r(C), r(), r(n), True, False)),
             (hc_kernels.post_mix, (r(2, 3, n, C), r(2, 3, C), r(2, 3, n, n), r(2, 3, n))),
             (hc_kernels.post_pre_mix, (r(2, 3, n, C), r(2, 3, C), r(2, 3, n, n), r(2, 3, n), r(n * C, 24), r(n * C),
                                        r(), r(n), False, False)),
             (hc_kernels.post_pre_mix, (r(2, 3, n, C), r(2, 3, C), r(2, 3, n, n), r(2, 3, n), r(C, n + 2), r(C),
                                        r(), r(n), True, False)),
             (hc_kernels.sinkhorn_op, (r(2, 3, n, n), 5))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("device", ["cpu"])
def test_rstd_is_not_differentiable(device, fused):
    """pre_mix's rstd is saved for the backward only: it must not claim a gradient it would drop."""
    n = 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g).requires_grad_()  # noqa: E731
    for args in [(r(2, 3, n, C), r(n * C, 24), r(n * C), r(), r(n), False, False),
                 (r(2, 3, n, C), r(C, n + 2), r(C), r(), r(n), True, False)]:
        m, rstd, x_in = hc_kernels.pre_mix(*args)
        assert m.requires_grad and x_in.requires_grad and not rstd.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            rstd.sum().backward()


@pytest.fixture
def restore_tf32():
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.numerics
@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("how,tf32", [("allow_tf32", True), ("matmul.fp32_precision", True),
                                      ("fp32_precision", True), ("matmul.fp32_precision ieee", False),
                                      ("unset", False)])
def test_tf32_setting_through_either_api(how, tf32, device, fused, restore_tf32, monkeypatch):
    """TF32 set through the legacy or the new API reaches the kernels (reading the legacy flag after
    the new API was used raises in torch >= 2.9), under torch.compile too."""
    if how == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif how == "matmul.fp32_precision":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif how == "fp32_precision":
        torch.backends.fp32_precision = "tf32"
    elif how == "matmul.fp32_precision ieee":
        torch.backends.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    precisions = []
    launch = hc_kernels._launch_pre
    monkeypatch.setattr(hc_kernels, "_launch_pre",
                        lambda *a, **kw: (precisions.append(kw["PRECISION"]), launch(*a, **kw)))
    conn = randomize(hc.make_connection("mhc", C, 4, layer_idx=1, fused=fused), seed=1)
    branch = Branch()
    h = torch.randn(2, 5, 4, C, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(lambda h: conn(h, branch), fullgraph=True, backend="aot_eager")(h)
    out.square().sum().backward()
    assert precisions == ["tf32" if tf32 else "ieee"] * 2         # forward and backward
    hc.set_fused(conn, "off")
    # the interpreter has no TF32 rounding: fp32 in two orders, the connection's forward
    rel = numerics.connection_path("mhc", 4, C, 10, sinkhorn_iters=ITERS, backward=False)
    numerics.assert_close(out, conn(h, branch), rel, "output")


BIG_STRIDES = r"""
import os, tempfile, torch
import hc_kernels as K
# streams 2^30 + 64 elements apart: stream 2 starts past 2^31 elements, in stride terms only; the
# storage is a sparse file, of which the test touches a few pages
n, C, M = 3, 16, 2
S = 2 ** 30 + 64
fd, path = tempfile.mkstemp()
os.ftruncate(fd, (2 * S + M * C + C) * 2)
base = torch.from_file(path, shared=True, size=2 * S + M * C + C, dtype=torch.bfloat16)
os.close(fd); os.unlink(path)
h = base.as_strided((M, n, C), (C, S, 1))
h.copy_(torch.randn(M, n, C))
hd = h.contiguous()                             # the same values, small offsets
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)
y, H_res, H_post, gout = r(M, C).bfloat16(), r(M, n, n), r(M, n), r(M, n, C).bfloat16()
for a, b in zip(K.post_mix_backward(gout, h, y, H_res, H_post), K.post_mix_backward(gout, hd, y, H_res, H_post)):
    assert torch.equal(a, b)
assert torch.equal(K.post_mix(h, y, H_res, H_post), K.post_mix(hd, y, H_res, H_post))
w, gain, sc, bias, gx = r(n * C, 16), r(n * C), r(()), r(n), r(M, C).bfloat16()
fwd, fwd_d = K.pre_mix(h, w, gain, sc, bias, False, False), K.pre_mix(hd, w, gain, sc, bias, False, False)
for a, b in zip(fwd, fwd_d):
    assert torch.equal(a, b)
m, rstd, _ = fwd
# exact too: the same kernel on the same values, and the interpreter runs its programs one after another, so
# even phi's gradient, summed over them with atomics, is added in the same order
for a, b in zip(K.pre_mix_backward(h, w, gain, sc, bias, m, rstd, m, gx, gout, False, False),
                K.pre_mix_backward(hd, w, gain, sc, bias, m, rstd, m, gx, gout, False, False)):
    assert torch.equal(a, b)
print("ok")
"""


def test_offsets_past_2_31_in_stride_terms():
    """Streams whose stride products j s_hn pass 2^31 elements (stride itself below 2^31, so Triton
    passes it as int32) are read where they are: the products are formed in int64. In a fresh
    process in the interpreter: a 32-bit product reads outside the tensor and may crash it."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", BIG_STRIDES], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


def pre_mix_case(per_stream, M, n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = n + 2 if per_stream else n * n + 2 * n
    K = C if per_stream else n * C
    return [torch.randn(M, n, C, generator=g).to(dtype), torch.randn(K, R, generator=g) * 2 / math.sqrt(K),
            1 + torch.randn(K, generator=g), torch.tensor(0.8), torch.randn(n, generator=g)]


@pytest.mark.numerics
@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("config", hc_kernels.PRE_CONFIGS)
def test_every_autotune_config(config, tf32, device, fused, monkeypatch):
    """(a) with the tiles of each CUDA autotune config (in the interpreter: TF32 changes no rounding
    there, but the tf32 variant is traced and run), forward and backward against the equations."""
    monkeypatch.setattr(hc_kernels, "PRE_CPU", dict(BLOCK_M=config[0], BLOCK_C=config[1]))
    torch.manual_seed(0)   # the output weights below: an unseeded draw can make the gate scale's gradient cancel
    for per_stream in (False, True):
        M, n = config[0] + 7, 3                                                             # two token tiles
        leaves = [t.requires_grad_() for t in pre_mix_case(per_stream, M, n)]
        ref = [t.detach().clone().requires_grad_() for t in leaves]
        m, _, x_in = hc_kernels.pre_mix(*leaves, per_stream, tf32)
        m_ref, x_ref = pre_mix_reference(*ref, per_stream)
        rel = pre_mix_path(C if per_stream else n * C, n, m.shape[-1], M)
        numerics.assert_close(m, m_ref, rel, "m")
        numerics.assert_close(x_in, x_ref, rel, "x_in")
        gm, gx = torch.randn_like(m), torch.randn_like(x_in)
        ((m * gm).sum() + (x_in * gx).sum()).backward()
        scale = backward_with_gate_scale((m_ref * gm).sum() + (x_ref * gx).sum(), ref[3])
        for i, (a, b) in enumerate(zip(leaves, ref)):
            numerics.assert_close(a.grad, b.grad, rel, f"gradient {i}", scale if i == 3 else None)


@pytest.mark.parametrize("device", ["cpu"])
def test_autotune_key_has_the_token_count(device, fused, monkeypatch):
    """Each power-of-two bucket of the token count tunes its own tiles (a small eval batch does
    not fix them for the training batch); the same bucket does not tune again."""
    timed = []

    def bench(kernel_call, quantiles):     # stands in for triton.testing.do_bench under the interpreter
        kernel_call()
        timed.append(1)
        return [float(len(timed))] * 3     # the first config tried wins

    tuners = {fn: hc_kernels.autotuned(fn, do_bench=bench)
              for fn in (hc_kernels._pre_mix_fwd_kernel, hc_kernels._pre_mix_bwd_kernel)}
    for fn, tuner in tuners.items():
        monkeypatch.setitem(hc_kernels._KERNELS, (fn, "cpu", True), tuner)
    monkeypatch.setattr(hc_kernels, "_launch_pre", lambda fn, M, device, *a, **kw:
                        tuners[fn][lambda META: (triton.cdiv(M, META["BLOCK_M"]),)](*a, M_BUCKET=hc_kernels._pow2(M), **kw))
    for M in (20, 40, 24):                 # buckets 32, 64, 32
        leaves = [t.requires_grad_() for t in pre_mix_case(False, M)]
        m, _, x_in = hc_kernels.pre_mix(*leaves, False, False)
        (m.sum() + x_in.sum()).backward()
    n_configs = len(hc_kernels.PRE_CONFIGS)
    assert len(timed) == 2 * 2 * n_configs            # two buckets, forward and backward, every config once
    for tuner in tuners.values():
        assert sorted(key[0] for key in tuner.cache) == [32, 64]


# ---------------------------------------------------------------------------------------
# the switch

def test_fused_off_and_auto_on_cpu_use_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # even with the interpreter available
    calls = []
    monkeypatch.setattr(hc_kernels, "connection_forward", lambda *a: calls.append(a))
    monkeypatch.setattr(hc_kernels, "sinkhorn", lambda *a: calls.append(a))
    monkeypatch.setattr(hc_kernels, "chain_forward", lambda *a: calls.append(a))
    conn = hc.make_connection("mhc", C, 4, 0)
    for mode in ("off", "auto"):
        hc.set_fused(conn, mode)
        conn(torch.randn(2, 3, 4, C), Branch())
        hc.run_connections([conn, conn], [Branch(), Branch()], torch.randn(2, 3, 4, C))
    assert calls == []
    with pytest.raises(ValueError, match="2 connections but 1 branches"):
        hc.run_connections([conn, conn], [Branch()], torch.randn(2, 3, 4, C))


def test_fused_on_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    conn = hc.make_connection("kromhc", C, 4, 0, fused="on")
    with pytest.raises(RuntimeError, match="need CUDA, or TRITON_INTERPRET=1"):
        conn(torch.randn(2, 3, 4, C), Branch())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="130 coefficients per token"):   # mhc_lite at n = 5: 5! + 10
        hc.make_connection("mhc_lite", C, 5, 0, fused="on")(torch.randn(2, 3, 5, C), Branch())
    with pytest.raises(RuntimeError, match="float64"):
        hc.sinkhorn(torch.randn(3, 4, 4, dtype=torch.float64), ITERS, fused="on")
    # plain has nothing to fuse and runs as it is
    x = torch.randn(2, 3, 1, C)
    assert hc.make_connection("plain", C, 1, 0, fused="on")(x, Branch()).shape == x.shape
    hc.set_fused(conn, "yes")   # past the config's check (make_connection refuses it: a ConfigError)
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        conn(torch.randn(2, 3, 4, C), Branch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_auto_on_cuda_reports_the_torch_path(monkeypatch):
    monkeypatch.setattr(hc_kernels, "_WARNED", set())
    conn = hc.make_connection("mhc_lite", C, 5, 0, fused="auto").cuda()
    with pytest.warns(UserWarning, match="torch reference path runs MHCLite"):
        conn(torch.randn(2, 3, 5, C, device="cuda"), Branch().cuda())


# ---------------------------------------------------------------------------------------
# every kernel compiles for the H100 (sm_90), which the interpreter does not check

COMPILE_SM90 = r"""
import inspect, re, torch, triton, hc_kernels as K
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.jit import JITFunction
from triton._C.libtriton import native_specialize_impl

launches = []   # what the ops would launch: the kernel, its arguments, and the tiles of a CUDA run

class Record:
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        return lambda *args, **kw: launches.append((self.fn, args, kw))

K._kernel = lambda fn, device: Record(fn)
post_blocks = K._post_blocks
K._post_blocks = lambda C, interpret: post_blocks(C, False)      # the CUDA tiles, not the interpreter's
n, C, R = 4, 768, 24                       # GPT-2 small, mhc at n = 4; 64 tokens of bf16 streams
bf = torch.bfloat16
h, gx, y = torch.randn(2, 32, n, C, dtype=bf), torch.randn(2, 32, C, dtype=bf), torch.randn(2, 32, C, dtype=bf)
par = lambda *s: torch.randn(*s)
for per_stream, K_rows, cols in ((False, n * C, R), (True, C, n + 2)):
    w, g, a, b = par(K_rows, cols), par(K_rows), par(()), par(n)
    m, rstd, _ = K.pre_mix(h, w, g, a, b, per_stream, True)
    K.pre_mix_backward(h, w, g, a, b, m, rstd, None if per_stream else m, gx, h.clone(), per_stream, True)
H_res, H_post = par(2, 32, n, n), par(2, 32, n)
for per_stream, K_rows, cols in ((False, n * C, R), (True, C, n + 2)):   # (b) joined with the next (a)
    w, g, a, b = par(K_rows, cols), par(K_rows), par(()), par(n)
    h_new, m, rstd, _ = K.post_pre_mix(h, y, H_res, H_post, w, g, a, b, per_stream, True)
    K.post_pre_mix_backward(h, y, H_res, H_post, h_new, w, g, a, b, m, rstd, None if per_stream else m, gx,
                            h.clone(), per_stream, True)
K.post_mix(h, y, H_res, H_post)
K.post_mix_backward(h.clone(), h, y, H_res, H_post)
K.sinkhorn_op(par(2, 32, n, n), 20)
K.sinkhorn_backward(par(2, 32, n, n), par(2, 32, n, n), 20)

def specialise(fn, args, kw):
    # what triton.jit does at launch: ints equal to 1 become constants, pointers and ints that
    # are multiples of 16 get the divisibility hint (16-byte vector loads follow from it)
    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip([p.name for p in params], args), **kw)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = values[p.name]
        if p.annotation is triton.language.constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs

target = GPUTarget("cuda", 90, 32)
seen = set()
for fn, args, kw in launches:
    tiles = [dict(BLOCK_M=bm, BLOCK_C=bc, num_warps=w, num_stages=s) for bm, bc, w, s in K.PRE_CONFIGS] \
        if "M_BUCKET" in kw else [{}]                  # (a): every autotune config
    for tile in tiles:
        opts = {k: tile.pop(k) for k in ("num_warps", "num_stages") if k in tile}
        sig, constexprs, attrs = specialise(fn, args, dict(kw, **tile))
        assert "s_hc" not in sig or sig["s_hc"] == "constexpr", "a unit channel stride is a constant at launch"
        src = triton.compiler.ASTSource(JITFunction(fn), sig, constexprs, attrs)
        asm = triton.compile(src, target=target, options=opts).asm
        assert "cubin" in asm, fn.__name__
        if "h_ptr" in sig:   # the streams are read with 16-byte vector loads, as a real launch reads them
            assert re.search(r"ld\.global(\.\w+)*\.v4\.", asm["ptx"]), (fn.__name__, tile)
        if fn is K._post_mix_fwd_kernel:  # the sums over streams stay in each thread: no shared memory
            assert "bar.sync" not in asm["ptx"] and "shfl" not in asm["ptx"]
        if fn is K._pre_mix_bwd_kernel:   # φ's gradient: relaxed atomics, no GPU-wide fence before each
            assert re.search(r"(red|atom)\.global\.gpu\.relaxed|(red|atom)\.relaxed", asm["ptx"]) \
                and "acq_rel" not in asm["ptx"], re.findall(r"(?:red|atom)\.\S+", asm["ptx"])[:3]
        seen.add(fn.__name__)
assert len(seen) == 6, seen
print("compiled", len(launches))
"""


def test_kernels_compile_for_sm90():
    """Triton compiles to sm_90 cubins without a GPU: every kernel, and (a) in every autotune config,
    from the arguments the ops pass (GPT-2-small shapes, bf16 streams) with the specialisation a
    launch gives them, so the PTX is that of a real run (16-byte loads of the streams). In a
    fresh process, as this one may be in interpreter mode (which replaces Triton's library functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("scheme", ["hc", "kromhc"])
def test_stream_recompute_on_the_fused_path(scheme):
    """recompute="streams" over the fused kernels (custom ops, recomputed in backward from the group's input
    streams): the same loss and gradients as recompute="none" on the fused path, bit for bit (the same kernels
    replayed on the same inputs)."""
    from model import GPT, GPTConfig
    results = {}
    for mode in ("none", "streams"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, scheme=scheme,
                              fused="on", recompute=mode, recompute_group=2))
        x = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(x, x)[1]
        loss.backward()
        results[mode] = loss.item(), {n: p.grad for n, p in model.named_parameters()}
    (loss, grads), (other_loss, other) = results["none"], results["streams"]
    assert other_loss == loss and all(torch.equal(other[n], g) for n, g in grads.items())
