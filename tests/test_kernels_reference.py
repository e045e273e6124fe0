"""The fused path (fused="on": the Triton kernels of hc_kernels.py) against the papers'
equations written out in this file, in float64, from the connection's parameters.

test_kernels.py compares the kernels with hc.py's torch path; both paths share the connection's
gate code (conn.gates), so a bug there would pass it. Here nothing of hc.py computes the
reference: the coefficients come from the parameters (random, non-zero φ / W, γ, gains,
biases, gates), the output and the gradients from float64 autograd through those formulas.
On CPU the kernels run in Triton's interpreter, as in test_kernels.py. The kernels' fp32 results
are held to their own rounding (tests/numerics.py: connection_path), float64's being negligible.
"""

import copy
import itertools
import math
import os

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before Triton's first import (see test_kernels.py)
triton = pytest.importorskip("triton")

import hc  # noqa: E402
import numerics  # noqa: E402

C = 40  # two channel tiles in the interpreter, the second one partial
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def randomize(conn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if p.dim() == 0:                                          # gates: open, not equal
                p.fill_(0.5 + torch.rand((), generator=g).item())
            elif name in ("phi", "W_m", "W_r", "W_beta"):             # projections: logits of std ~2
                p.copy_(torch.randn(p.shape, generator=g) * 2 / math.sqrt(p.shape[0]))
            else:                                                     # gains around 1, biases around 0
                p.copy_(torch.randn(p.shape, generator=g) + (1.0 if name in ("norm_gain", "gamma") else 0.0))
    return conn


def rms(x):
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def permutations(n):
    """(n!, n, n): P[k, i, perm_k[i]] = 1 in itertools' (lexicographic) order, the identity first."""
    P = torch.zeros(math.factorial(n), n, n, dtype=torch.float64)
    for k, perm in enumerate(itertools.permutations(range(n))):
        for i, j in enumerate(perm):
            P[k, i, j] = 1.0
    return P


def prime_factors(n):
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def coefficients(scheme, P, h, iters):
    """H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) from the parameters P (float64)."""
    n = h.shape[-2]
    sig = lambda t: 1 / (1 + torch.exp(-t))  # noqa: E731
    if scheme == "hc":                                                # HC Eqs. 10-13, per stream
        H_bar = h / rms(h) * P["norm_gain"]
        H_pre = P["s_alpha"] * torch.tanh(H_bar @ P["W_m"])[..., 0] + P["A_m"]
        A_r = P["s_alpha"] * torch.tanh(H_bar @ P["W_r"]) + P["A_r"]   # A_r[j, i]: stream j -> stream i
        H_post = P["s_beta"] * torch.tanh(H_bar @ P["W_beta"])[..., 0] + P["B"]
        return H_pre, H_post, A_r.transpose(-1, -2)
    x = h.flatten(-2)                                                 # mHC Eqs. 14-18, all streams at once
    m = (x * P["gamma"]) @ P["phi"] / rms(x)
    H_pre = sig(P["alpha_pre"] * m[..., :n] + P["b_pre"])
    H_post = 2 * sig(P["alpha_post"] * m[..., n:2 * n] + P["b_post"])
    z = P["alpha_res"] * m[..., 2 * n:] + P["b_res"]
    if scheme == "mhc":                                               # Sinkhorn-Knopp, probability domain
        K = torch.exp(z.unflatten(-1, (n, n)))
        for _ in range(iters):
            K = K / K.sum(-2, keepdim=True)
            K = K / K.sum(-1, keepdim=True)
        return H_pre, H_post, K
    if scheme == "mhc_lite":                                          # convex hull of all n! permutations
        return H_pre, H_post, torch.einsum("...k,kij->...ij", torch.softmax(z, -1), permutations(n))
    H_res, start = None, 0                                            # KromHC: U^1 ⊗ U^2 ⊗ ...
    for f in prime_factors(n):
        U = torch.einsum("...k,kij->...ij", torch.softmax(z[..., start:start + math.factorial(f)], -1),
                         permutations(f))
        start += math.factorial(f)
        H_res = U if H_res is None else torch.einsum("...ab,...uv->...aubv", H_res, U).flatten(-4, -3).flatten(-2)
    return H_pre, H_post, H_res


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.ln, self.fc = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        return self.fc(self.ln(x))


def test_prime_factors_helper():
    assert [prime_factors(n) for n in (2, 4, 6, 8, 12)] == [[2], [2, 2], [2, 3], [2, 2, 2], [2, 2, 3]]


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,n", [("hc", 2), ("hc", 4), ("mhc", 4), ("mhc_lite", 4), ("kromhc", 4),
                                      ("kromhc", 6)])
def test_fused_connection_against_the_equations(scheme, n, device, monkeypatch):
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    iters = 5
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=1, sinkhorn_iters=iters, fused="on"),
                     seed=n).to(device)
    branch = Branch().to(device)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 12, n, C, generator=g).to(device)               # 24 tokens: two programs of 16
    w = torch.randn(2, 12, n, C, generator=g, dtype=torch.float64).to(device)

    hf = h.clone().requires_grad_()
    out = conn(hf, branch)                                             # the fused path
    (out.double() * w).sum().backward()

    P = {k: p.detach().double().requires_grad_() for k, p in conn.named_parameters()}
    branch64 = copy.deepcopy(branch).double()
    h64 = h.double().requires_grad_()
    H_pre, H_post, H_res = coefficients(scheme, P, h64, iters)
    y = branch64(torch.einsum("btj,btjc->btc", H_pre, h64))
    ref = torch.einsum("btij,btjc->btic", H_res, h64) + H_post[..., None] * y[..., None, :]
    scales = numerics.gate_term_scales(ref, {k: v for k, v in P.items() if v.dim() == 0})
    (ref * w).sum().backward()

    assert (H_res - torch.eye(n, device=device, dtype=torch.float64)).abs().max() > 0.05   # not the identity
    # fp32 against float64: the fused side's rounding through the connection's reductions (float64's is 2^-29 of it)
    rel = numerics.connection_path(scheme, n, C, 24, sinkhorn_iters=iters)
    assert out.dtype == torch.float32
    numerics.assert_close(out, ref, rel, "output")
    numerics.assert_close(hf.grad, h64.grad, rel, "gradient of h")
    for k, p in conn.named_parameters():
        numerics.assert_close(p.grad, P[k].grad, rel, f"gradient of {k}", scale=scales.get(k))
    for (k, p), p64 in zip(branch.named_parameters(), branch64.parameters()):
        numerics.assert_close(p.grad, p64.grad, rel, f"gradient of branch.{k}")
