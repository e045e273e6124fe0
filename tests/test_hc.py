"""Correctness of the residual schemes in hc.py against the equations of their papers.

Comparisons of fp32 results with float64 formulas, or of two fp32 computations, are held to the rounding
of the reductions on their path (tests/numerics.py), never to a measured tolerance."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

import hc
import numerics
from errors import ConfigError

C = 16  # small width keeps the tests fast; the formulas do not depend on it


def cases(schemes=("hc", "mhc", "mhc_lite", "kromhc"), ns=(2, 4, 8)):
    return [(s, n) for s in schemes for n in ns if not (s == "mhc_lite" and n > hc.MAX_PERM_SIZE)]


def randomize(conn, seed=0, logit_std=3.0):
    """Give every parameter a random non-trivial value: gates open, projections non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if p.dim() == 0:                               # gates s_α, s_β, α_*
                p.fill_(1.0 + torch.rand((), generator=g).item())
            elif name in ("phi", "W_m", "W_r", "W_beta"):  # projections: logits of std ~ logit_std
                p.copy_(torch.randn(p.shape, generator=g) * logit_std / math.sqrt(p.shape[0]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) + (1.0 if name in ("norm_gain", "gamma") else 0.0))
    return conn


def coefficient_path(scheme, n, iters=0):
    """The reductions from the streams to the coefficients (numerics.chain): the norm and the projection over
    n C, then H_res's own (numerics.res_widths)."""
    return numerics.chain(n * C, n * C, *numerics.res_widths(scheme, n, iters))


def streams(n, B=2, T=5, seed=1, dtype=torch.float32):
    return torch.randn(B, T, n, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Branch(nn.Module):
    """A stand-in sublayer with its own pre-norm."""

    def __init__(self, seed=2):
        super().__init__()
        torch.manual_seed(seed)
        self.ln, self.fc = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        return self.fc(self.ln(x))


# ---------------------------------------------------------------------------------------
# the one form: conn(h, branch) applies exactly the coefficients it reports

@pytest.mark.numerics
@pytest.mark.parametrize("scheme,n", cases() + [("plain", 1)])
def test_forward_applies_its_coefficients(scheme, n):
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=1), seed=n)
    h, branch = streams(n), Branch()
    H_pre, H_post, H_res = conn.coefficients(h)
    x_in = torch.einsum("btj,btjc->btc", H_pre, h)
    expected = torch.einsum("btij,btjc->btic", H_res, h) + H_post[..., None] * branch(x_in)[..., None, :]
    out = conn(h, branch)
    # the same coefficients; the pre-mix over n, the branch (LayerNorm over C, Linear over C) and the mix over
    # n in other orders
    numerics.assert_close(out, expected, numerics.chain(n, C, C, C, n), "output")
    if scheme != "plain":
        # H_res really matters: replacing it by the identity changes the output
        ident = h + H_post[..., None] * branch(x_in)[..., None, :]
        assert (out - ident).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------
# the manifold: doubly stochastic H_res, bounded H_pre and H_post

@pytest.mark.numerics
@pytest.mark.parametrize("scheme,n", cases(("mhc_lite", "kromhc")))
def test_exactly_doubly_stochastic(scheme, n):
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=0), seed=3)
    H_pre, H_post, H_res = conn.coefficients(streams(n))
    assert H_res.dtype == torch.float32
    err = hc.doubly_stochastic_error(H_res)
    # exact but for the softmaxes' sums and the mixes of the permutations, and the row (column) sum itself
    rel = numerics.chain(*numerics.res_widths(scheme, n), n)
    assert err["ds_row_err"] <= rel and err["ds_col_err"] <= rel
    assert err["min_entry"] == H_res.min().item()
    assert (H_res - torch.eye(n)).abs().max() > 0.05  # far from the identity: the test is not trivial


def projection(conn, h):
    """m = (x · γ) φ / rms(x) of the mHC family (mHC Eqs. 14-15), in float64 from the parameters."""
    x = h.double().flatten(-2)
    return (x * conn.gamma.double()) @ conn.phi.double() / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def projection_terms(conn, h):
    """The sum of the magnitudes of the terms of each logit of projection(): what its rounding is relative to."""
    x = h.double().flatten(-2)
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (x.abs() * conn.gamma.double().abs()) @ conn.phi.double().abs() / rms


def sinkhorn_probabilities(logits, iters):
    """Sinkhorn-Knopp (mHC Eq. 9) in the probability domain, float64: exp, then alternately
    divide by the column sums and the row sums, ending on the rows."""
    K = torch.exp(logits.double())
    for _ in range(iters):
        K = K / K.sum(-2, keepdim=True)
        K = K / K.sum(-1, keepdim=True)
    return K


@pytest.mark.numerics
@pytest.mark.parametrize("n,iters", [(2, 20), (4, 20), (4, 3), (8, 20)])
def test_mhc_res_is_sinkhorn_of_its_logits(n, iters):
    """H_res = SK(α_res · mat(m_res) + b_res), mat row-major (rows = output streams)."""
    conn = randomize(hc.make_connection("mhc", C, n, layer_idx=0, sinkhorn_iters=iters), seed=4, logit_std=5.0)
    h = streams(n)
    z = conn.alpha_res.double() * projection(conn, h)[..., 2 * n:] + conn.b_res.double()
    expected = sinkhorn_probabilities(z.unflatten(-1, (n, n)), iters)
    H_res = conn.coefficients(h)[2]
    # fp32 against float64 (whose own rounding is 2^-29 of it): the projection and Sinkhorn's logsumexps
    numerics.assert_close(H_res, expected, coefficient_path("mhc", n, iters), "H_res")
    assert (expected - sinkhorn_probabilities(z.unflatten(-1, (n, n)), iters + 1)).abs().max() > 1e-6


@pytest.mark.numerics
@pytest.mark.parametrize("n", [2, 4, 8])
def test_mhc_rows_exact_columns_reported(n):
    conn = randomize(hc.make_connection("mhc", C, n, layer_idx=0, sinkhorn_iters=20), seed=4, logit_std=5.0)
    H_res = conn.coefficients(streams(n))[2]
    err = hc.doubly_stochastic_error(H_res)
    # ends on the rows (mHC Eq. 9 order): exact but for the last logsumexp's sum over n and the row sum over n
    assert err["ds_row_err"] <= numerics.chain(n, n)
    col_err = (H_res.double().sum(-2) - 1).abs().max().item()
    # the reported one sums the same fp32 entries in fp32: off by that sum's rounding, relative to the sum
    assert col_err > 1e-4
    numerics.assert_close(err["ds_col_err"], col_err, numerics.chain(n), "column error", scale=1 + col_err)
    # the reported column error is the real one: more iterations shrink it
    conn.sinkhorn_iters = 500
    assert hc.doubly_stochastic_error(conn.coefficients(streams(n))[2])["ds_col_err"] < err["ds_col_err"]


@pytest.mark.numerics
def test_sinkhorn_column_error_on_sharp_logits():
    """20 iterations on logits of std 5 leave the column sums visibly off; diagnostics must see it."""
    logits = 5 * torch.randn(4096, 4, 4, generator=torch.Generator().manual_seed(0))
    err = hc.doubly_stochastic_error(hc.sinkhorn(logits, 20))
    assert err["ds_row_err"] <= numerics.chain(4, 4)   # the last logsumexp's sum and the row sum, over n
    assert err["ds_col_err"] > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("scheme,n", cases(("mhc", "mhc_lite", "kromhc")))
def test_pre_post_follow_the_formula(scheme, n):
    """H_pre = σ(α_pre m_pre + b_pre), H_post = 2 σ(α_post m_post + b_post) (mHC Eqs. 7-8, 16-18)
    with non-zero φ, γ, gates and biases, recomputed in float64 from the parameters."""
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=0), seed=5)
    h = streams(n)
    m = projection(conn, h)
    sig = lambda t: 1 / (1 + torch.exp(-t))  # noqa: E731
    pre = sig(conn.alpha_pre.double() * m[..., :n] + conn.b_pre.double())
    post = 2 * sig(conn.alpha_post.double() * m[..., n:2 * n] + conn.b_post.double())
    H_pre, H_post, _ = conn.coefficients(h)
    # fp32 against float64: a logit rounds in the norm and the projection over n C, relative to its terms'
    # magnitudes; the gate scales it, the sigmoid's slope (at most 1/4, 2 x that for H_post) passes it on; and
    # the sigmoid's exp (1 ulp), sum and division round (4 u)
    terms, rel = projection_terms(conn, h), numerics.chain(n * C, n * C)
    bound_pre = conn.alpha_pre.item() / 4 * rel * terms[..., :n].max().item() + 4 * numerics.u()
    bound_post = conn.alpha_post.item() / 2 * rel * terms[..., n:2 * n].max().item() + 8 * numerics.u()
    numerics.assert_close(H_pre, pre, 1.0, "H_pre", scale=bound_pre)
    numerics.assert_close(H_post, post, 1.0, "H_post", scale=bound_post)
    assert pre.std() > 0.05 and post.std() > 0.05 and (pre - post / 2).abs().max() > 0.05  # not trivial


# ---------------------------------------------------------------------------------------
# independent computations of H_res

def res_logits(conn, h):
    """α_res · m_res + b_res, recomputed from the parameters."""
    x = h.flatten(-2)
    m = (x * conn.gamma) @ conn.phi / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return conn.alpha_res * m[..., 2 * conn.n:] + conn.b_res


@pytest.mark.numerics
@pytest.mark.parametrize("n", [2, 4])
def test_mhc_lite_is_convex_combination_of_all_permutations(n):
    conn = randomize(hc.make_connection("mhc_lite", C, n, layer_idx=0), seed=6)
    h = streams(n)
    a = torch.softmax(res_logits(conn, h), dim=-1)
    expected = torch.zeros(*h.shape[:2], n, n)
    for k, perm in enumerate(itertools.permutations(range(n))):
        P = torch.zeros(n, n)
        for i, j in enumerate(perm):
            P[i, j] = 1.0
        expected += a[..., k, None, None] * P
    # two fp32 computations: the projection, the softmax and the mix over the n! permutations
    numerics.assert_close(conn.coefficients(h)[2], expected, coefficient_path("mhc_lite", n), "H_res")


@pytest.mark.numerics
@pytest.mark.parametrize("n,factors", [(2, None), (4, None), (8, None), (6, (2, 3)), (6, (3, 2)), (12, None)])
def test_kromhc_is_kronecker_product_of_factors(n, factors):
    conn = randomize(hc.make_connection("kromhc", C, n, layer_idx=0, kron_factors=factors), seed=7)
    h = streams(n)
    z = res_logits(conn, h)
    sizes = factors or hc.prime_factors(n)
    Us, start = [], 0
    for f in sizes:
        a = torch.softmax(z[..., start:start + math.factorial(f)], dim=-1)
        start += math.factorial(f)
        U = torch.zeros(*z.shape[:-1], f, f)
        for k, perm in enumerate(itertools.permutations(range(f))):
            for i, j in enumerate(perm):
                U[..., i, j] += a[..., k]
        Us.append(U)
    H_res = conn.coefficients(h)[2]
    res = numerics.res_widths("kromhc", n, factors=sizes)
    for b, t in itertools.product(range(h.shape[0]), range(h.shape[1])):
        K = Us[0][b, t]
        for U in Us[1:]:
            K = torch.kron(K, U[b, t])
        # two fp32 computations: the projection, each factor's softmax and mix over its f! permutations
        numerics.assert_close(H_res[b, t], K, numerics.chain(n * C, n * C, *res), f"H_res at {b, t}")
    err = hc.doubly_stochastic_error(H_res)
    rel = numerics.chain(*res, n)   # exact but for the factors' sums, and the row (column) sum itself
    assert err["ds_row_err"] <= rel and err["ds_col_err"] <= rel


@pytest.mark.numerics
def test_kromhc_two_by_two_factor_form():
    """For i_k = 2 a factor is [[p, 1-p], [1-p, p]]."""
    conn = randomize(hc.make_connection("kromhc", C, 2, layer_idx=0), seed=8)
    h = streams(2)
    p = torch.softmax(res_logits(conn, h), dim=-1)[..., 0]
    H = conn.coefficients(h)[2]
    # two fp32 computations: the projection, the softmax over 2 and the mix over 2 (against 1 - p: one rounding)
    numerics.assert_close(H, torch.stack([torch.stack([p, 1 - p], -1), torch.stack([1 - p, p], -1)], -2),
                          coefficient_path("kromhc", 2) + numerics.u(), "H_res")


@pytest.mark.numerics
@pytest.mark.parametrize("n", [2, 4])
def test_hc_coefficients_follow_equations_10_13(n):
    conn = randomize(hc.make_connection("hc", C, n, layer_idx=0), seed=9)
    h = streams(n).double()
    P = {k: p.detach().double() for k, p in conn.named_parameters()}
    H_bar = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * P["norm_gain"]
    A_m = P["s_alpha"] * torch.tanh(H_bar @ P["W_m"])[..., 0] + P["A_m"]
    A_r = P["s_alpha"] * torch.tanh(H_bar @ P["W_r"]) + P["A_r"]
    B = P["s_beta"] * torch.tanh(H_bar @ P["W_beta"])[..., 0] + P["B"]
    H_pre, H_post, H_res = (c.double() for c in conn.coefficients(h.float()))
    # fp32 against float64: a projection rounds in the per-stream norm and the sum over C, relative to its terms'
    # magnitudes; the gate scales it (tanh's slope is at most 1); tanh (1 ulp), the product and the sum round (4 u)
    rel = numerics.chain(C, C)
    for what, got, want, W, gate in (("H_pre", H_pre, A_m, P["W_m"], P["s_alpha"]),
                                     ("H_post", H_post, B, P["W_beta"], P["s_beta"]),
                                     ("H_res", H_res, A_r.transpose(-1, -2), P["W_r"], P["s_alpha"])):
        terms = (H_bar.abs() @ W.abs()).max().item()
        bound = gate.item() * rel * terms + 4 * numerics.u() * want.abs().max().item()
        numerics.assert_close(got, want, 1.0, what, scale=bound)
    # HC is unconstrained: H_res leaves the Birkhoff polytope
    assert hc.doubly_stochastic_error(H_res)["ds_row_err"] > 1e-2


# ---------------------------------------------------------------------------------------
# init

@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("layer_idx", [0, 3])
def test_hc_at_init_is_plain_pre_norm_residual(n, layer_idx):
    x = torch.randn(2, 5, C)
    branch = Branch()
    plain = hc.make_connection("plain", C, 1, layer_idx)(hc.expand_streams(x, 1), branch)
    out = hc.make_connection("hc", C, n, layer_idx)(hc.expand_streams(x, n), branch)
    for i in range(n):
        assert torch.equal(out[:, :, i], plain[:, :, 0])
    assert torch.equal(hc.reduce_streams(plain), x + branch(x))


@pytest.mark.numerics
@pytest.mark.parametrize("scheme", ["mhc", "mhc_lite", "kromhc"])
def test_constrained_init(scheme):
    n, layer_idx = 4, 6  # home stream 6 mod 4 = 2
    conn = hc.make_connection(scheme, C, n, layer_idx)
    H_pre, H_post, H_res = conn.coefficients(streams(n))
    sig = torch.sigmoid
    expected_pre = torch.tensor([sig(torch.tensor(-1.0)).item()] * n)
    expected_pre[2] = sig(torch.tensor(1.0))
    # phi = 0: sigmoid(+-1) on both sides, each as 1 / (1 + exp(-x)) within 1 ulp (2 u) for exp and a rounding
    # for the add and the division: 4 u a side
    numerics.assert_close(H_pre[0, 0], expected_pre, 8 * numerics.u(), "H_pre")
    numerics.assert_close(H_post[0, 0], 2 * expected_pre, 8 * numerics.u(), "H_post")
    assert (H_res.diagonal(dim1=-2, dim2=-1) > 0.99).all()             # near the identity at -8
    # the off-identity logit option moves it off the identity
    soft = hc.make_connection(scheme, C, n, layer_idx, res_logit_init=-2.0).coefficients(streams(n))[2]
    assert (soft.diagonal(dim1=-2, dim2=-1) < 0.9).all()


# ---------------------------------------------------------------------------------------
# parameter counts (spec section 4) and gradients

def spec_count(scheme, n, C, factors=None):
    if scheme == "plain":
        return 0
    if scheme == "hc":
        return C * (n + 2) + n * (n + 2) + 2 + C
    r = {"mhc": n * n, "mhc_lite": math.factorial(n),
         "kromhc": sum(math.factorial(f) for f in (factors or hc.prime_factors(n)))}[scheme]
    return n * C * (r + 2 * n) + n * C + r + 2 * n + 3


def n_params(conn):
    return sum(p.numel() for p in conn.parameters())


def test_parameter_counts_gpt2_small():
    got = {s: n_params(hc.make_connection(s, 768, 4, 0)) for s in ("hc", "mhc", "mhc_lite", "kromhc")}
    assert got == {"hc": 5402, "mhc": 76827, "mhc_lite": 101411, "kromhc": 39951}
    # whole GPT-2 small: 12 blocks x 2 connections, the KromHC paper's figures
    assert round(24 * got["mhc"] / 1e3, 1) == 1843.8
    assert round(24 * got["mhc_lite"] / 1e3, 1) == 2433.9
    assert round(24 * got["kromhc"] / 1e3, 1) == 958.8


@pytest.mark.parametrize("scheme,n", cases() + [("kromhc", 6), ("mhc_lite", 3), ("plain", 1)])
def test_parameter_counts_match_formulas(scheme, n):
    assert n_params(hc.make_connection(scheme, 24, n, 0)) == spec_count(scheme, n, 24)


@pytest.mark.parametrize("scheme,n", cases(ns=(2, 4)))
def test_grads_reach_every_parameter(scheme, n):
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=1), seed=10)
    h = streams(n).requires_grad_()
    out = conn(h, Branch())
    (out * torch.randn_like(out)).sum().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(h.grad).all()


def test_decay_parameters_are_the_dynamic_projections():
    c = hc.make_connection("hc", C, 4, 0)
    assert [id(p) for p in c.decay_parameters()] == [id(c.W_m), id(c.W_r), id(c.W_beta)]
    for s in ("mhc", "mhc_lite", "kromhc"):
        c = hc.make_connection(s, C, 4, 0)
        assert [id(p) for p in c.decay_parameters()] == [id(c.phi)]
    assert hc.make_connection("plain", C, 1, 0).decay_parameters() == []


# ---------------------------------------------------------------------------------------
# Sinkhorn: the recomputing backward is the gradient of the loop

def test_sinkhorn_backward_gradcheck():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: hc.sinkhorn(z, 7), (logits,))


@pytest.mark.numerics
@pytest.mark.parametrize("n,iters", [(2, 1), (4, 20), (8, 20)])
def test_sinkhorn_backward_matches_autograd_through_loop(n, iters):
    z = 3 * torch.randn(5, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    w = torch.randn(5, n, n, dtype=torch.float64)
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    out_a, out_b = hc.sinkhorn(a, iters), hc.sinkhorn_reference(b, iters)
    assert torch.equal(out_a, out_b)    # exact: SinkhornLog's forward is the reference's loop, op for op
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    # float64, the recomputing backward against autograd's: Sinkhorn's logsumexps over n, both ways
    rel = numerics.sinkhorn_path(n, iters, z.abs().max().item(), backward=True, dtype=torch.float64)
    numerics.assert_close(a.grad, b.grad, rel, "gradient")


# ---------------------------------------------------------------------------------------
# dtypes and compile

@pytest.mark.numerics
@pytest.mark.parametrize("scheme,n", cases(ns=(4,)) + [("plain", 1)])
def test_bf16_stream_fp32_coefficients(scheme, n):
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=0), seed=11)
    h = streams(n, dtype=torch.bfloat16)
    branch = Branch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conn(h, branch)
        coeffs = conn.coefficients(h)
    assert out.dtype == torch.bfloat16
    assert all(c.dtype == torch.float32 for c in coeffs)
    ref = conn(h.float(), branch)
    # the same streams in fp32: bf16's roundings of x_in, the Linear's input, weight and output, and the new
    # streams (u(bf16) each), beside the forward's fp32 rounding
    rel = 5 * numerics.u(torch.bfloat16) + numerics.connection_path(scheme, n, C, 10, 20, backward=False)
    numerics.assert_close(out, ref, rel, "output")


@pytest.mark.numerics
@pytest.mark.parametrize("scheme,n", cases(ns=(4,)) + [("plain", 1)])
def test_compile_fullgraph(scheme, n):
    torch._dynamo.reset()
    conn = randomize(hc.make_connection(scheme, C, n, layer_idx=0), seed=12)
    branch = Branch()
    compiled = torch.compile(lambda h: conn(h, branch), fullgraph=True, backend="aot_eager")
    h1 = streams(n).requires_grad_()
    h2 = h1.detach().clone().requires_grad_()
    out_c, out_e = compiled(h1), conn(h2, branch)
    # AOT autograd's decomposed graph against eager: the same sums, perhaps in other orders
    rel = numerics.connection_path(scheme, n, C, 10, sinkhorn_iters=20)
    numerics.assert_close(out_c, out_e, rel, "output")
    out_c.pow(2).sum().backward()
    out_e.pow(2).sum().backward()
    numerics.assert_close(h1.grad, h2.grad, rel, "gradient of h")


# ---------------------------------------------------------------------------------------
# streams in and out, diagnostics

@pytest.mark.numerics
def test_expand_reduce():
    x = torch.randn(2, 3, C)
    h = hc.expand_streams(x, 4)
    assert h.shape == (2, 3, 4, C) and all(torch.equal(h[:, :, i], x) for i in range(4))
    # the mean's sum over the streams rounds (gamma(n) of its terms), its division by n = 2^k does not; 3 x once
    numerics.assert_close(hc.reduce_streams(h), x, numerics.gamma(4), "mean of 4 copies")
    numerics.assert_close(hc.reduce_streams(torch.stack([x, 3 * x], dim=2)), 2 * x, numerics.gamma(2) + numerics.u(),
                          "mean of x and 3 x", scale=(x.abs().max() * 2).item())


@pytest.mark.numerics
def test_diagnostics_composite_and_gain():
    n, names = 4, ["blk0.attn", "blk0.mlp", "blk1.attn"]
    conns = [randomize(hc.make_connection("hc", C, n, i), seed=i) for i in range(3)]
    h = streams(n)
    coeffs = [c.coefficients(h) for c in conns]
    d = hc.diagnostics(coeffs, names)
    H = [c[2] for c in coeffs]
    composite = H[2] @ H[1] @ H[0]
    # diagnostics multiplies H2 (H1 H0), here (H2 H1) H0: two sums over n in other orders, then the abs row
    # (column) sums over n alike; HC's entries are signed, so relative to the products of their magnitudes
    terms = H[2].abs() @ H[1].abs() @ H[0].abs()
    rel = numerics.chain(n, n)
    numerics.assert_close(d["scalars"]["composite/amax_fwd"], composite.abs().sum(-1).max().item(), rel, "amax_fwd",
                          scale=terms.sum(-1).max().item())
    numerics.assert_close(d["scalars"]["composite/amax_bwd"], composite.abs().sum(-2).max().item(), rel, "amax_bwd",
                          scale=terms.sum(-2).max().item())
    numerics.assert_close(d["composite"], composite.mean((0, 1)), numerics.chain(n, n, 10), "token-averaged composite",
                          scale=terms.mean((0, 1)).max().item())                       # 10 tokens
    numerics.assert_close(d["matrices"]["blk0.mlp"], H[1].mean((0, 1)), numerics.chain(10), "token-averaged H_res")
    # the same function on the same values: exact
    assert d["scalars"]["blk1.attn/ds_row_err"] == hc.doubly_stochastic_error(H[2])["ds_row_err"]
    assert d["scalars"]["blk0.attn/h_pre_max/3"] == coeffs[0][0][..., 3].max().item()
    dist = (H[0] - torch.eye(n)).flatten(-2).norm(dim=-1).mean().item()   # Frobenius, token-averaged
    assert dist > 0.1 and d["scalars"]["blk0.attn/dist_identity"] == dist  # diagnostics' own expression: exact
    # a doubly stochastic stack keeps its gain at 1: each H_res's rows and columns sum to 1 but for its softmaxes'
    # and mixes' rounding, and the two products and the abs sums add their sums over n
    kron = [hc.make_connection("kromhc", C, n, i) for i in range(3)]
    dk = hc.diagnostics([randomize(c, seed=i).coefficients(h) for i, c in enumerate(kron)], names)
    rel = 3 * numerics.chain(*numerics.res_widths("kromhc", n)) + numerics.chain(n, n, n)
    numerics.assert_close(dk["scalars"]["composite/amax_fwd"], 1.0, rel, "kromhc amax_fwd")
    numerics.assert_close(dk["scalars"]["composite/amax_bwd"], 1.0, rel, "kromhc amax_bwd")


# ---------------------------------------------------------------------------------------
# bad arguments

@pytest.mark.parametrize("args,kwargs,match", [
    (("residual", C, 4, 0), {}, "config key 'scheme' must be one of"),
    (("plain", C, 4, 0), {}, "n_streams=1"),
    (("hc", C, 1, 0), {}, "n_streams >= 2"),
    (("mhc", C, -1, 0), {}, "config key 'n_streams' must be >= 0"),   # 0: the scheme's default n (4)
    (("mhc", C, True, 0), {}, "config key 'n_streams' must be int"),
    (("mhc", 0, 4, 0), {}, "dim must be a positive integer"),
    (("mhc_lite", C, 8, 0), {}, "n_streams <= 6"),
    (("kromhc", C, 4, 0), {"kron_factors": (2, 3)}, "product is n_streams"),
    (("kromhc", C, 7, 0), {}, r"\[2, 6\]"),
    (("kromhc", C, 4, 0), {"kron_factors": (4, 1)}, "do not fit"),
    (("mhc", C, 4, 0), {"sinkhorn_iters": 0}, "sinkhorn_iters"),
    (("mhc", C, 4, 0), {"sinkhorn_iter": 5}, "unknown connection option"),
])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        hc.make_connection(*args, **kwargs)


def test_kromhc_general_factors():
    assert hc.make_connection("kromhc", C, 6, 0).factors == (2, 3)
    assert hc.make_connection("kromhc", C, 12, 0).factors == (2, 2, 3)
    assert hc.make_connection("kromhc", C, 4, 0, kron_factors=(4,)).factors == (4,)


@pytest.mark.parametrize("scheme,n", [("plain", 1), ("hc", 4), ("kromhc", 4)])
def test_wrong_stream_shape(scheme, n):
    conn = hc.make_connection(scheme, C, n, 0)
    with pytest.raises(ValueError, match=r"expects streams of shape \(B, T, n=%d, C=%d\)" % (n, C)):
        conn(torch.randn(2, 3, C), Branch())
    with pytest.raises(ValueError, match="expects streams"):
        conn.coefficients(torch.randn(2, 3, n + 1, C))
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        hc.expand_streams(torch.randn(3, C, 1, 1), n)


def test_param_table_script(capsys):
    import importlib.util, pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "param_table.py"
    spec = importlib.util.spec_from_file_location("param_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--n-streams", "4", "8"])
    out = capsys.readouterr().out
    assert "| mhc | 4 | 76,827 | 1,843,848 | 1,843.8 |" in out
    assert "| mhc_lite | 4 | 101,411 | 2,433,864 | 2,433.9 |" in out
    assert "| kromhc | 4 | 39,951 | 958,824 | 958.8 |" in out
    assert "| hc | 4 | 5,402 |" in out
    assert "| mhc_lite | 8 | refused |" in out
