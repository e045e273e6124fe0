"""Tolerances derived from the arithmetic, for tests that compare two computations of one quantity.

Two float computations of the same value (one process and two ranks, hcgpt and a peer package, a
Triton kernel and torch, AVX2 and AVX-512 kernels) differ by the rounding of the operations they
run in different orders, never by more than the format and the lengths of the reductions allow.
Every tolerance of such a test is one of the bounds below, with the reductions it counts written
beside it; none is a measurement of one machine.

    u(dtype)             the unit roundoff: 2^-24 float32, 2^-53 float64, 2^-8 bfloat16, 2^-11 float16
    gamma(n)             a sum or dot product of n terms, in any order, is within gamma(n) * sum|terms| of the
                         exact one: n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms,
                         2nd ed., Lemma 3.1 and eq. 3.5). Deterministic and worst case.
    gamma_p(n)           the same with rounding errors treated as independent and of mean zero (Higham & Mary,
                         SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4): lam sqrt(n) u + O(n u^2), holding with
                         probability >= 1 - 2 n exp(-lam^2 / 2) per sum (lam = 8: 1 - n 2.5e-14). What a long
                         model computation is held to: its worst case gamma(n) is a factor sqrt(n) / lam looser.
    chain(*widths)       a value computed through a path of reductions of those widths (a model's forward,
                         backward and the sum over tokens), each of terms of bounded relative size: the
                         relative errors add to first order, sum of gamma_p(width).
    gpt2_path            chain() of a gpt2-arch GPT's forward (and backward, and the gradients' sum over tokens)
    adam_update_bound    the largest |m_hat / (sqrt(v_hat) + eps)| Adam can take in its first t steps, whatever the
                         gradients: an element whose gradient is only rounding moves by at most lr times this,
                         in either direction (the optimizer's amplification of a rounding difference).
    res_widths           the reductions from a connection's H_res logits to H_res, per scheme (hc.py)
    sinkhorn_path        chain() of log-space Sinkhorn on given logits, with its log-domain rounding
    connection_path      chain() of one connection (or a stack of them) around a LayerNorm + Linear stand-in branch
    gate_term_scales     the scale of a scalar gate's gradient: the sum of its terms' magnitudes (it cancels)
    newton_schulz_rounding  Muon's orthogonalisation's own rounding, with the amplification of its later steps

A tolerance relative to "the scale" of a tensor uses its largest entry: the terms that produce an
entry near zero are as large as those of the largest entry (a gradient summed over tokens cancels),
so its rounding is too.
"""

import math

import torch

U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LAM = 8.0  # gamma_p's confidence: each sum fails the bound with probability < 2 n exp(-32) = n 2.5e-14


def u(dtype=torch.float32):
    """The unit roundoff of a format: half the distance from 1 to the next float."""
    return U[dtype]


def gamma(n, dtype=torch.float32):
    """Higham's gamma_n: the worst-case relative error of any order of a sum or dot product of n terms."""
    nu = n * u(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) is unbounded in {dtype}: n u >= 1")
    return nu / (1 - nu)


def gamma_p(n, dtype=torch.float32, lam=LAM):
    """Higham & Mary's probabilistic gamma_n: exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1."""
    uu = u(dtype)
    return math.expm1(lam * math.sqrt(n) * uu + n * uu * uu / (1 - uu))


def chain(*widths, dtype=torch.float32):
    """Relative error of a value computed through reductions of these widths one after another."""
    return sum(gamma_p(w, dtype) for w in widths)


def gpt2_path(n_layer, C, n_head, T, vocab, tokens, n=1, sinkhorn_iters=0, backward=True, dtype=torch.float32,
              res=None):
    """The relative rounding bound of a GPT (model.py, either arch) through the reductions on its longest path.
    Per block, the attention sublayer: its connection (n > 1: the coefficients' norm and projection over n C,
    Sinkhorn's two logsumexps over n per iteration, or res: H_res's own reductions (res_widths) of another
    scheme, the pre-mix and the mix over n), the norm's mean and variance over C, the q, k, v projections over
    C, (nanochat: QK-norm over the head,) q.k over the head, the softmax and the value sum over T, c_proj over
    C; the MLP sublayer: its connection, the norm, c_fc over C, c_proj over 4 C. Then the final norm, lm_head
    over C, the softmax over the vocabulary and the mean over the tokens. backward: the same reductions
    transposed, then every weight's gradient summed over the tokens (a scalar gate's also over the n^2 logits
    it scales)."""
    res = (n,) * (2 * sinkhorn_iters) if res is None else tuple(res)
    conn = (n * C, n * C, *res, n, n) if n > 1 else ()
    block = (*conn, C, C, C, C // n_head, C // n_head, T, T, C, *conn, C, C, C, 4 * C)
    fwd = (*block * n_layer, C, C, C, vocab, tokens)
    return chain(*fwd, *fwd, tokens * n * n, dtype=dtype) if backward else chain(*fwd, dtype=dtype)


def res_widths(scheme, n, sinkhorn_iters=0, factors=None):
    """The reductions from a connection's H_res logits to H_res (hc.py): Sinkhorn's two normalisations over n
    per iteration (mhc, mhc_v4), the softmax and the mix over the n! permutations (mhc_lite), over each
    factor's f! (kromhc: the Kronecker product multiplies the factors, so their errors add); none for hc."""
    if scheme in ("mhc", "mhc_v4"):
        return (n,) * (2 * sinkhorn_iters)
    if scheme == "mhc_lite":
        return (math.factorial(n),) * 2
    if scheme == "kromhc":
        if factors is None:   # hc.py's default: the prime factors of n
            factors, m = [], n
            for p in range(2, n + 1):
                while m % p == 0:
                    factors.append(p)
                    m //= p
        return tuple(w for f in factors for w in (math.factorial(f),) * 2)
    return ()


def sinkhorn_path(n, iters, logits, backward=False, dtype=torch.float32):
    """chain() of log-space Sinkhorn (hc.sinkhorn, 2 iters logsumexps over n) on logits of magnitude at most
    `logits`, and its log-domain rounding: each half step's logsumexp and subtraction round values of L of size
    up to 2 logits + ln n by a few u (4: the shift, the log, its addition, the subtraction), an absolute error
    of L and so a relative one of exp(L). backward: the recomputed iterates and the transposed steps again."""
    steps = 2 * iters * (2 if backward else 1)
    return chain(*(n,) * steps, dtype=dtype) + steps * 4 * u(dtype) * (2 * logits + math.log(n))


def connection_path(scheme, n, C, tokens, sinkhorn_iters=0, depth=1, backward=True, factors=None):
    """chain() of `depth` connections (hc.py) in a row, each around a stand-in branch LayerNorm(C) + Linear(C, C):
    forward, the coefficients' norm and projection over n C, H_res's own reductions (res_widths), the pre-mix
    over n, the LayerNorm's mean and variance over C, the Linear over C, the mix over n; backward, the same
    reductions transposed, the projection's over its r + 2n logits; then every weight's gradient summed over
    the tokens (a scalar gate's also over the up to n^2 logits it scales)."""
    res = res_widths(scheme, n, sinkhorn_iters, factors)
    fwd = (n * C, n * C, *res, n, C, C, C, n) * depth
    if not backward:
        return chain(*fwd)
    logits = 2 * n + (n * n if scheme in ("mhc", "mhc_v4") else sum(res[::2]))   # hc: n + 2 per stream
    return chain(*fwd, *fwd, *(logits,) * depth, tokens * n * n)


def adam_update_bound(beta1, beta2, steps):
    """max over t <= steps of |m_hat_t| / sqrt(v_hat_t) for any gradients g_1..g_t (eps > 0 only lowers it).
    By Cauchy-Schwarz, |sum_k beta1^(t-k) g_k| <= sqrt(sum_j (beta1^2 / beta2)^j) sqrt(sum_k beta2^(t-k) g_k^2), so
    |m_t| / sqrt(v_t) <= (1 - beta1) / sqrt(1 - beta2) sqrt(sum_{j<t} (beta1^2 / beta2)^j), and the bias
    corrections multiply it by sqrt(1 - beta2^t) / (1 - beta1^t). It is 1 at t = 1, 1.007 at t = 8 for (0.9, 0.95)."""
    best = 0.0
    for t in range(1, steps + 1):
        geometric = sum((beta1 * beta1 / beta2) ** j for j in range(t))
        best = max(best, (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(geometric)
                   * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t))
    return best


def muon_update_bound(ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5):
    """The largest entry Muon's orthogonalised update can have (before its lr): Newton-Schulz divides the
    momentum by its Frobenius norm, so every singular value starts in [0, 1], and maps each through the odd
    quintic p(x) = a x + b x^3 + c x^5 ns_steps times; an entry is at most the largest singular value, the
    maximum of p^(ns_steps) over [0, 1] (torch.optim.Muon's coefficients: 1.20)."""
    a, b, c = ns_coefficients
    x = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    for _ in range(ns_steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x.abs().max().item()


def newton_schulz_rounding(*widths, ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5, dtype=torch.float32):
    """The relative (Frobenius) rounding bound of Muon's Newton-Schulz orthogonalisation run in dtype: its input
    (divided by its norm) and each step (the Gram matrix and two products: widths) add e = chain(*widths), and
    each later step multiplies an earlier error by at most L, the largest |p'| over the range of the iterates'
    singular values (the Frechet derivative of an odd polynomial of the singular values is bounded by its
    slope there: 3.96 on [0, 1.2] for torch.optim.Muon's coefficients): e (1 + L + ... + L^ns_steps)."""
    a, b, c = ns_coefficients
    x, top = torch.linspace(0, 1, 100_001, dtype=torch.float64), 1.0
    for _ in range(ns_steps):
        x = a * x + b * x ** 3 + c * x ** 5
        top = max(top, x.abs().max().item())
    y = torch.linspace(0, top, 100_001, dtype=torch.float64)
    slope = (a + 3 * b * y ** 2 + 5 * c * y ** 4).abs().max().item()
    return chain(*widths, dtype=dtype) * sum(slope ** k for k in range(ns_steps + 1))


def adamw_divergence(lrs, beta1, beta2):
    """The most two AdamW runs can put between one weight when its gradients differ only by rounding:
    each step moves it by at most lr_k adam_update_bound in either direction (weight decay multiplies an
    earlier difference by 1 - lr wd <= 1), so sum_k 2 lr_k adam_update_bound(...)."""
    return 2 * adam_update_bound(beta1, beta2, len(lrs)) * sum(lrs)


def gate_term_scales(output, gates):
    """The scale of a scalar gate's gradient: a gate g enters as g * x (x a tensor), so its gradient is the
    sum over x's entries of dL/d(g x) x, which cancels (its largest entry is itself), and the sum's rounding is
    relative to sum |dL/d(g x) x| instead. Call on the output before backward: hooks on the products' backward
    nodes (MulBackward0) fill {name: that sum, over every product the gate enters} during it."""
    ids = {id(p): name for name, p in gates.items()}
    scales = {name: 0.0 for name in gates}
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for i, (child, _) in enumerate(node.next_functions):
            name = ids.get(id(getattr(child, "variable", None)))
            if name is not None and node.name() == "MulBackward0":
                x = node._saved_other if i == 0 else node._saved_self
                node.register_prehook(lambda grads, x=x, name=name: scales.__setitem__(
                    name, scales[name] + (grads[0].double() * x.double()).abs().sum().item()))
            stack.append(child)
    return scales


def assert_close(actual, expected, rel, what="", scale=None):
    """|actual - expected| <= rel * scale elementwise, scale defaulting to the largest |expected| (see above).
    rel is a derived bound (chain, gamma, ...), not a measurement."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = rel * scale
    diff = (actual - expected).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    assert worst <= bound, (f"{what}: max |difference| {worst:.3e} exceeds the derived bound {bound:.3e} "
                            f"(= {rel:.2e} x scale {scale:.3e})")
