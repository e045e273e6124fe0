"""The fused Triton kernels of hc_kernels.py against the torch reference path of hc.py.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is slow, so shapes
are tiny (but cross tile edges: more tokens than one program holds, C not a multiple of the
channel tile). The same tests run compiled on CUDA when a GPU is present.
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

C = 40  # two channel tiles of 32 in the interpreter, the second one partial
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
CASES = [("hc", 2), ("hc", 4), ("mhc", 2), ("mhc", 4), ("mhc_lite", 2), ("mhc_lite", 4),
         ("kromhc", 2), ("kromhc", 4), ("kromhc", 6)]


@pytest.fixture
def fused(monkeypatch, device):
    """hc.FUSED = 'on' for this test; on CPU through Triton's interpreter."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(hc, "FUSED", "on")
    return device


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


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_connection(conn, branch, h, w, mode, monkeypatch):
    """Output and the gradients of <out, w> w.r.t. h and every parameter, with hc.FUSED = mode."""
    monkeypatch.setattr(hc, "FUSED", mode)
    conn.zero_grad(set_to_none=True)
    branch.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=h.dtype == torch.bfloat16):
        out = conn(h, branch)
    (out.double() * w).sum().backward()
    grads = {"h": h.grad}
    grads.update({f"conn.{k}": p.grad for k, p in conn.named_parameters()})
    grads.update({f"branch.{k}": p.grad for k, p in branch.named_parameters()})
    return out.detach(), grads


# ---------------------------------------------------------------------------------------
# the whole connection: hc.FUSED = "on" against "off"

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,n", CASES)
def test_connection_matches_torch_path(scheme, n, dtype, device, fused, monkeypatch):
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=1), seed=n).to(device)
    branch = Branch().to(device)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 12, n, C, generator=g).to(device, dtype)      # 24 tokens: two programs of 16
    w = torch.randn(2, 12, n, C, generator=g, dtype=torch.float64).to(device)
    out_f, grads_f = run_connection(conn, branch, h, w, "on", monkeypatch)
    out_t, grads_t = run_connection(conn, branch, h, w, "off", monkeypatch)
    assert out_f.dtype == dtype and out_f.shape == out_t.shape
    if dtype == torch.float32:
        assert rel_err(out_f, out_t) < 1e-5
        for k in grads_t:
            assert rel_err(grads_f[k], grads_t[k]) < 1e-4, k
        return
    # bf16 streams: both paths round (x_in, y, the output, grads), so they differ by bf16 ulps, and
    # a rounding flip early on moves everything after it. Measure both against an fp64 run of the
    # same equations: per tensor the fused error stays within 4x the torch path's or 2^-5 (the
    # scalar gates' gradients are sums with heavy cancellation: a few % in both paths), and over
    # all tensors it is no larger than the torch path's (geometric mean of the ratios).
    out_64, grads_64 = run_connection(copy.deepcopy(conn).double(), copy.deepcopy(branch).double(),
                                      h.double(), w, "off", monkeypatch)
    pairs = [(out_f, out_t, out_64)] + [(grads_f[k], grads_t[k], grads_64[k]) for k in grads_64]
    errs = [(rel_err(f, ref), rel_err(t, ref)) for f, t, ref in pairs]
    for name, (ef, et) in zip(["out"] + list(grads_64), errs):
        assert ef <= max(4 * et, 2 ** -5), (name, ef, et)
    log_ratio = sum(math.log((ef + 1e-4) / (et + 1e-4)) for ef, et in errs) / len(errs)
    assert math.exp(log_ratio) < 1.5


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
        monkeypatch.setattr(hc, "FUSED", mode)
        xx = x.detach().clone().requires_grad_()
        out = conn(hc.expand_streams(xx, n), branch)
        (out.double() * w).sum().backward()
        results.append((out.detach(), xx.grad))
    assert rel_err(results[0][0], results[1][0]) < 1e-5
    assert rel_err(results[0][1], results[1][1]) < 1e-4


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
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2        # bf16: one rounding of x_in
    assert rel_err(x_in, x_ref) < tol
    gm, gx = torch.randn_like(m), torch.randn_like(x_in.float())
    (m * gm).sum().add((x_in.float() * gx).sum()).backward()
    (m_ref * gm).sum().add((x_ref.float() * gx).sum()).backward()
    for k in leaves:
        assert rel_err(leaves[k].grad, ref[k].grad) < (1e-4 if dtype == torch.float32 else 2e-2), k


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
    tol = 1e-5 if h_dtype == torch.float32 else 1e-2
    assert rel_err(out, out_ref) < tol
    w = torch.randn(out.shape, dtype=torch.float64, device=device)
    (out.double() * w).sum().backward()
    (out_ref.double() * w).sum().backward()
    for k in leaves:
        assert leaves[k].grad.dtype == leaves[k].dtype
        assert rel_err(leaves[k].grad, ref[k].grad) < (1e-5 if h_dtype == y_dtype == torch.float32 else 1e-2), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,iters", [(2, 1), (3, 20), (4, 20), (6, 5)])
def test_sinkhorn_kernel(n, iters, device, fused):
    z = (4 * torch.randn(5, 7, n, n, generator=torch.Generator().manual_seed(n))).to(device)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, out_ref = hc.sinkhorn(a, iters), hc.sinkhorn_reference(b, iters)   # hc.sinkhorn dispatches
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert hc.doubly_stochastic_error(out)["ds_row_err"] < 1e-5             # ends on the rows
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# training: the same loss curve, and the ops under torch.compile

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["hc", "mhc", "mhc_lite", "kromhc"])
def test_same_loss_curve(scheme, device, fused, monkeypatch):
    """A tiny GPT, 3 AdamW steps from the same seed: the fused path follows the torch path."""
    from model import GPT, GPTConfig

    def curve(mode):
        monkeypatch.setattr(hc, "FUSED", mode)
        torch.manual_seed(0)
        cfg = GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=32, scheme=scheme, n_streams=4,
                        gate_init=0.5, res_logit_init=-1.0,   # gates open: the connections matter
                        sinkhorn_iters=5)                      # the interpreter is slow
        model = GPT(cfg).to(device)
        opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), device)
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
    assert fused_curve == pytest.approx(torch_curve, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["hc", "mhc"])
def test_compile_fullgraph(scheme, device, fused):
    """The kernels are custom ops: torch.compile traces the connection in one graph around them."""
    torch._dynamo.reset()
    n = 4
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=0), seed=12).to(device)
    branch = Branch().to(device)
    compiled = torch.compile(lambda h: conn(h, branch), fullgraph=True, backend="aot_eager")
    h1 = torch.randn(2, 5, n, C, device=device).requires_grad_()
    h2 = h1.detach().clone().requires_grad_()
    out_c, out_e = compiled(h1), conn(h2, branch)
    torch.testing.assert_close(out_c, out_e)
    out_c.pow(2).sum().backward()
    out_e.pow(2).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, fused):
    """Schema, fake (meta) kernels and autograd registration of the custom ops."""
    n = 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g).to(device).requires_grad_()  # noqa: E731
    cases = [(hc_kernels.pre_mix, (r(2, 3, n, C), r(n * C, 24), r(n * C), r(), r(n), False, False)),
             (hc_kernels.pre_mix, (r(2, 3, n, C), r(C, n + 2), r(C), r(), r(n), True, False)),
             (hc_kernels.post_mix, (r(2, 3, n, C), r(2, 3, C), r(2, 3, n, n), r(2, 3, n))),
             (hc_kernels.sinkhorn_op, (r(2, 3, n, n), 5))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ---------------------------------------------------------------------------------------
# the switch

def test_fused_off_and_auto_on_cpu_use_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # even with the interpreter available
    calls = []
    monkeypatch.setattr(hc_kernels, "connection_forward", lambda *a: calls.append(a))
    monkeypatch.setattr(hc_kernels, "sinkhorn", lambda *a: calls.append(a))
    conn = hc.make_connection("mhc", C, 4, 0)
    for mode in ("off", "auto"):
        monkeypatch.setattr(hc, "FUSED", mode)
        conn(torch.randn(2, 3, 4, C), Branch())
    assert calls == []


def test_fused_on_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(hc, "FUSED", "on")
    conn = hc.make_connection("kromhc", C, 4, 0)
    with pytest.raises(RuntimeError, match="need CUDA, or TRITON_INTERPRET=1"):
        conn(torch.randn(2, 3, 4, C), Branch())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="130 coefficients per token"):   # mhc_lite at n = 5: 5! + 10
        hc.make_connection("mhc_lite", C, 5, 0)(torch.randn(2, 3, 5, C), Branch())
    with pytest.raises(RuntimeError, match="float64"):
        hc.sinkhorn(torch.randn(3, 4, 4, dtype=torch.float64))
    # plain has nothing to fuse and runs as it is
    x = torch.randn(2, 3, 1, C)
    assert hc.make_connection("plain", C, 1, 0)(x, Branch()).shape == x.shape
    monkeypatch.setattr(hc, "FUSED", "yes")
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        conn(torch.randn(2, 3, 4, C), Branch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_auto_on_cuda_reports_the_torch_path(monkeypatch):
    monkeypatch.setattr(hc, "FUSED", "auto")
    monkeypatch.setattr(hc_kernels, "_WARNED", set())
    conn = hc.make_connection("mhc_lite", C, 5, 0).cuda()
    with pytest.warns(UserWarning, match="torch reference path runs MHCLite"):
        conn(torch.randn(2, 3, 5, C, device="cuda"), Branch().cuda())


# ---------------------------------------------------------------------------------------
# every kernel compiles for the H100 (sm_90), which the interpreter does not check

COMPILE_SM90 = """
import inspect, triton, hc_kernels as K
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

def signature(fn, constexprs, dtypes):
    return {a: "constexpr" if a in constexprs else dtypes.get(a, "*fp32") if a.endswith("_ptr")
            else "fp32" if a == "eps" else "i32" for a in inspect.signature(fn).parameters}

bf16 = "*bf16"
pre = dict(N=4, N_PAD=4, BLOCK_M=32, BLOCK_C=32, PRECISION="tf32")
N_PAD, BM, BC = K._post_blocks(4, 768)
post = dict(N=4, N_PAD=N_PAD, BLOCK_M=BM, BLOCK_C=BC)
sink = dict(N=4, N_PAD=4, BLOCK_M=K._sinkhorn_block(4))
grads = {"h_ptr": bf16, "gx_ptr": bf16, "gh_ptr": bf16}
for fn, constexprs, dtypes in [
        (K._pre_mix_fwd_kernel, dict(pre, R_PAD=32, HC=False), {"h_ptr": bf16, "x_ptr": bf16}),
        (K._pre_mix_fwd_kernel, dict(pre, R_PAD=16, HC=True), {"h_ptr": bf16, "x_ptr": bf16}),
        (K._pre_mix_bwd_kernel, dict(pre, R_PAD=32, HC=False, HAS_GM=True), grads),
        (K._pre_mix_bwd_kernel, dict(pre, R_PAD=16, HC=True, HAS_GM=False), grads),
        (K._post_mix_fwd_kernel, post, {"h_ptr": bf16, "y_ptr": bf16, "out_ptr": bf16}),
        (K._post_mix_bwd_kernel, post, {"g_ptr": bf16, "h_ptr": bf16, "y_ptr": bf16, "gh_ptr": bf16, "gy_ptr": bf16}),
        (K._sinkhorn_fwd_kernel, sink, {}),
        (K._sinkhorn_bwd_kernel, sink, {})]:
    src = triton.compiler.ASTSource(JITFunction(fn), signature(fn, constexprs, dtypes), constexprs)
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm, fn.__name__
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Triton compiles to sm_90 cubins without a GPU; in a fresh process, as this one may be in
    interpreter mode (which replaces Triton's library functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
