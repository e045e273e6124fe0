"""Residual schemes for hcgpt: plain, HC, mHC, mHC-lite, KromHC, DeepSeek-V4's mHC behind one interface.

Every sublayer F (attention or MLP, with its own pre-norm) is wrapped by a *connection*
acting on n parallel residual streams h of shape (B, T, n, C):

    x_in     = sum_j H_pre[j] * h[j]                          branch input   (B, T, C)
    y        = F(x_in)
    h_new[i] = sum_j H_res[i, j] * h[j] + H_post[i] * y        new streams    (B, T, n, C)

Convention, everywhere in hcgpt: ``H_res[..., i, j]`` is the weight of INPUT stream j in
OUTPUT stream i (rows = outputs, as in the papers). Coefficients are computed in fp32 and
may depend on the token: H_pre, H_post are (B, T, n), H_res is (B, T, n, n). The stream keeps
the dtype it was given.

SchemeConfig declares the scheme's config keys; identity_res=True fixes H_res = I in hc, mhc,
mhc_lite and kromhc (the Identity-HC ablation: the read and write still learned).

This file is the reference path (plain torch). The fused path, the same equations as Triton
kernels, lives in hc_kernels.py; hc_verify.py checks it on the device before a run; each
connection's `fused` chooses between them. Dependencies point one way: hc_verify -> hc,
hc_kernels; hc -> hc_kernels.

References (formulas, init and parameter counts per scheme: docs/schemes.md):
  HC        Zhu et al., Hyper-Connections, arXiv 2409.19606, Eqs. 10-14
  mHC       Xie et al., Manifold-Constrained Hyper-Connections, arXiv 2512.24880, Eqs. 7-9, 14-19
  mHC-lite  Yang & Gao, arXiv 2601.05732 (Birkhoff-von Neumann: convex hull of permutations)
  KromHC    Zhou et al., arXiv 2601.21579 (Kronecker product of small doubly stochastic factors)
  mHC (V4)  DeepSeek-V4's production mHC and its stream readout hc_head, read from torchtitan, vLLM,
            Megatron-Core and Liger-Kernel (docs/mhc_v4.md names each source file)
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import ConfigError
from keys import check, key

SCHEMES = ("plain", "hc", "mhc", "mhc_lite", "kromhc", "mhc_v4")
MAX_PERM_SIZE = 6  # n! permutation logits: 720 at 6, 40,320 at 8 (248 M parameters at C = 768)
NOT_PLAIN = SCHEMES[1:]
MHC_FAMILY = ("mhc", "mhc_lite", "kromhc")
GATED = ("hc", *MHC_FAMILY)  # the schemes with alpha gates and a learned H_res of their own


@dataclass
class SchemeConfig:
    """The residual scheme: which connection wraps every sublayer, and its options (the config keys of
    hc.py; model.GPTConfig is this plus the architecture). Checked when made: a scheme that cannot take
    n_streams, factors that do not fit n, any value outside its declaration is a ConfigError."""
    SECTION = "residual scheme (hc.py)"
    scheme: str = key("plain", "plain | hc | mhc | mhc_lite | kromhc | mhc_v4 (DeepSeek-V4's mHC, docs/mhc_v4.md)",
                      choices=SCHEMES)
    n_streams: int = key(0, "0 -> 1 for plain, 4 for the others", at_least=0)
    sinkhorn_iters: int = key(20, "mhc, mhc_v4: Sinkhorn-Knopp iterations", above=0,
                              applies={"scheme": ("mhc", "mhc_v4")})
    sinkhorn_end: str = key("rows", "mhc: rows (mHC Eq. 9, rows exact) | cols (the published code: columns exact)",
                            choices=("rows", "cols"), applies={"scheme": ("mhc",)})
    kron_factors: tuple | None = key(None, "kromhc: e.g. (2, 3) for n = 6; None -> the prime factors of n",
                                     applies={"scheme": ("kromhc",)})
    res_logit_init: float = key(-8.0, "mhc / mhc_lite / kromhc: off-identity H_res logit at init",
                                applies={"scheme": MHC_FAMILY})
    gate_init: float = key(0.01, "the alpha gates at init", applies={"scheme": GATED})
    coeff_norm: str = key("flat", "mhc family: flat (mHC Eq. 7: one RMS over the n C values) | stream (each stream "
                          "alone)", choices=("flat", "stream"), applies={"scheme": MHC_FAMILY})
    identity_res: bool = key(False, "H_res fixed to the identity, the read and write still learned (the Identity-HC "
                             "ablation: does the mixing itself help?)", applies={"scheme": GATED})
    hc_eps: float = key(1e-6, "mhc_v4 and readout=hc_head: DeepSeek-V4's eps (added to H_pre and the readout weights, "
                        "in Sinkhorn)", at_least=0, applies={"scheme": ("mhc_v4",), "readout": ("hc_head",)})
    fused: str = key("auto", "auto | on | off: the Triton kernels of the connections (checked at start, hc_verify.py)",
                     choices=("auto", "on", "off"))

    def __post_init__(self):
        if self.n_streams == 0:
            self.n_streams = 1 if self.scheme == "plain" else 4
        if isinstance(self.kron_factors, list):
            self.kron_factors = tuple(self.kron_factors)
        check(self)
        n, scheme = self.n_streams, self.scheme
        if scheme == "plain" and n != 1:
            raise ConfigError(f"config key 'n_streams' is {n}, but scheme 'plain' is the single-stream residual: it "
                              f"takes n_streams=1; use 'hc', 'mhc', 'mhc_lite', 'kromhc' or 'mhc_v4' for n > 1")
        if scheme != "plain" and n < 2:
            raise ConfigError(f"config key 'n_streams' is {n}, but scheme {scheme!r} needs n_streams >= 2; "
                              f"n_streams=1 is the plain residual: use scheme='plain'")
        if scheme == "mhc_lite" and n > MAX_PERM_SIZE:
            raise ConfigError(f"config key 'n_streams' is {n}, but mhc_lite needs n! = {math.factorial(n):,} "
                              f"permutation logits there; it takes n_streams <= {MAX_PERM_SIZE}: use kromhc or mhc "
                              f"for larger n")
        factors = self.factors()
        if scheme == "kromhc" and not (factors and all(isinstance(f, int) and 2 <= f <= MAX_PERM_SIZE for f in factors)
                                       and math.prod(factors) == n):
            raise ConfigError(f"config key 'kron_factors': kron_factors={factors} do not fit n_streams={n}: factors "
                              f"must be integers in "
                              f"[2, {MAX_PERM_SIZE}] whose product is n_streams (default: prime factors "
                              f"{prime_factors(n)})")

    def factors(self):
        """kromhc's Kronecker factors: kron_factors, or the prime factors of n_streams."""
        return tuple(self.kron_factors or prime_factors(self.n_streams))


def prime_factors(n):
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return tuple(factors)


# The fused path. hc_kernels.py holds Triton kernels for the same equations with fewer passes over
# the streams; hc_verify.py checks them against this file on the device before a run uses them
# (train.py and scripts/bench.py call hc_verify.verify_fused; this file never imports it). Every
# connection's `fused` (SchemeConfig.fused, set_fused) chooses at every call: "auto" runs the kernels on
# CUDA where they apply and where that check passed (else this file's torch code, said once); "on"
# always runs them, or raises (CPU needs TRITON_INTERPRET=1); "off" runs this file's torch code only.
AUTO_DEVICES = ("cuda",)  # where "auto" uses the kernels (tests add "cpu" for Triton's interpreter)


def _kernels(t, conn, fused):
    """hc_kernels if its fused kernels run for this connection (conn None: Sinkhorn) on t, else None."""
    if fused == "off" or (fused == "auto" and t.device.type not in AUTO_DEVICES):
        return None
    import hc_kernels  # Triton is imported here only: the torch path needs none
    if not hc_kernels.use_fused(t, conn, fused):
        return None
    if fused == "auto" and not hc_kernels.verified(t, conn):
        return None
    return hc_kernels


def set_fused(module, mode):
    """Set the fused path (auto | on | off) of every connection in module (a model, a block, a connection)."""
    for m in module.modules():
        if isinstance(m, Connection):
            m.fused = mode


# ----------------------------------------------------------------------------------------
# streams in and out

def expand_streams(x, n):
    """(B, T, C) -> (B, T, n, C): n copies of the embedding."""
    if x.dim() != 3:
        raise ValueError(f"expand_streams expects x of shape (B, T, C), got {tuple(x.shape)}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def reduce_streams(h):
    """(B, T, n, C) -> (B, T, C): the mean of the streams (HC paper: sum then norm)."""
    if h.dim() != 4:
        raise ValueError(f"reduce_streams expects h of shape (B, T, n, C), got {tuple(h.shape)}")
    return h.mean(dim=-2)


def rms(x, eps=1e-6):
    """Root mean square over the last dimension, kept for broadcasting."""
    return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------
# the shared form of section 1

class Connection(nn.Module):
    """One residual connection around a sublayer; subclasses define ``coefficients``."""

    def __init__(self, dim, n_streams, layer_idx, fused, identity_res):
        super().__init__()
        self.dim, self.n, self.layer_idx = dim, n_streams, layer_idx
        self.home = layer_idx % n_streams  # the stream this connection reads/writes most at init
        self.fused, self.identity_res = fused, identity_res

    def coefficients(self, h):
        """-> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n), all fp32."""
        raise NotImplementedError

    def decay_parameters(self):
        """Parameters that take weight decay: the dynamic projections (none by default)."""
        return []

    def static_decay_parameters(self):
        """The static coefficients that the published code decays (model config decay_static): its
        optimizer decays every parameter with dim >= 2, and only HC and mHC keep 2-D statics."""
        return []

    def check(self, h):
        if h.dim() != 4 or h.shape[-2:] != (self.n, self.dim):
            raise ValueError(
                f"{type(self).__name__} expects streams of shape (B, T, n={self.n}, C={self.dim}), "
                f"got {tuple(h.shape)}; build the streams with expand_streams(x, {self.n})")

    # True: recompute the coefficients and the pre-mix in backward rather than save their n x C
    # intermediates (normalised streams, fp32 copies); model.GPTConfig.recompute="connections" sets it.
    # Streams held in bf16 always do: their fp32 copy would otherwise be kept beside them (6 bytes a value
    # where fp32 streams keep 4)
    recompute = False

    def forward(self, h, branch):
        self.check(h)
        kernels = _kernels(h, self, self.fused)
        if kernels:   # the kernels save only h and recompute the rest already
            return kernels.connection_forward(self, h, branch)
        if (self.recompute or h.dtype != torch.float32) and torch.is_grad_enabled():
            x_in, H_post, H_res = checkpoint(self.pre_mix, h, use_reentrant=False)
        else:
            x_in, H_post, H_res = self.pre_mix(h)
        y = branch(x_in.to(h.dtype))
        mixed = h if self.identity_res else (H_res.unsqueeze(-1) * h.unsqueeze(-3)).sum(dim=-2)  # sum_j H_res[i,j] h[j]
        return (mixed + H_post.unsqueeze(-1) * y.unsqueeze(-2)).to(h.dtype)

    def identity(self, like):
        """H_res = I of the Identity-HC ablation (identity_res), as (B, T, n, n) for the diagnostics."""
        return torch.eye(self.n, device=like.device).expand(*like.shape[:-1], self.n, self.n)

    def pre_mix(self, h):
        """-> x_in = sum_j H_pre[j] h[j] (B, T, C) fp32, H_post, H_res."""
        H_pre, H_post, H_res = self.coefficients(h)
        # Mixing as broadcast-multiply-sum over the n axis: with n ~ 4 this beats tiny
        # batched matmuls (einsum) by a wide margin once compiled.
        return (H_pre.unsqueeze(-1) * h).sum(dim=-2), H_post, H_res

    def extra_repr(self):
        return f"dim={self.dim}, n_streams={self.n}, layer_idx={self.layer_idx}" + (
            ", identity_res=True" if self.identity_res else "")


def run_connections(conns, branches, h):
    """h through conns[k](h, branches[k]) for k = 0, 1, ...: a stack of sublayers (e.g. a block's attention
    and MLP). The torch path is exactly those calls. The fused path (where hc_kernels runs every one of
    the connections) joins the new streams of one connection with the next one's pre-mix, so the streams
    are read once between two branches, in the forward and in the backward (hc_kernels.chain_forward)."""
    if len(conns) != len(branches):
        raise ValueError(f"run_connections got {len(conns)} connections but {len(branches)} branches")
    for conn in conns:
        conn.check(h)
    if len(conns) > 1 and not any(isinstance(c, Plain) for c in conns):
        kernels = [_kernels(h, c, c.fused) for c in conns]
        if all(kernels):
            return kernels[0].chain_forward(conns, h, branches)
    for conn, branch in zip(conns, branches):
        h = conn(h, branch)
    return h


class Plain(Connection):
    """The standard pre-norm residual h + F(h): H_pre = H_post = H_res = 1, n = 1."""

    def coefficients(self, h):
        self.check(h)
        ones = h.new_ones(h.shape[:-1], dtype=torch.float32)
        return ones, ones, ones.unsqueeze(-1)

    def forward(self, h, branch):
        self.check(h)
        x = h[..., 0, :]
        return (x + branch(x)).unsqueeze(-2)  # bit for bit nanoGPT's x = x + F(x)


# ----------------------------------------------------------------------------------------
# HC: dynamic Hyper-Connections (HC paper Eqs. 10-13, init Eq. 14)

class HyperConnection(Connection):
    """Dynamic HC, coefficients per stream from the normalised stream H̄:

        A_m(h) = s_α tanh(H̄ W_m) + A_m      (n,)      -> H_pre  = A_m
        A_r(h) = s_α tanh(H̄ W_r) + A_r      (n, n)    -> H_res  = A_rᵀ
        B(h)   = s_β tanh(H̄ W_β) + B        (n,)      -> H_post = B
    """

    def __init__(self, dim, n_streams, layer_idx, gate_init, fused, identity_res):
        super().__init__(dim, n_streams, layer_idx, fused, identity_res)
        n = n_streams
        # registered in this order (W_r, A_r where they always were): the parameters' order is the optimizer
        # state's and the checkpoints' (a run from before identity_res resumes), and hc_verify's random draws
        self.norm_gain = nn.Parameter(torch.ones(dim))          # H̄ = norm(h), per stream
        self.W_m = nn.Parameter(torch.zeros(dim, 1))             # Eq. 14: dynamic weights start at 0
        if not identity_res:
            self.W_r = nn.Parameter(torch.zeros(dim, n))
        self.W_beta = nn.Parameter(torch.zeros(dim, 1))
        self.s_alpha = nn.Parameter(torch.tensor(float(gate_init)))
        self.s_beta = nn.Parameter(torch.tensor(float(gate_init)))
        self.A_m = nn.Parameter(F.one_hot(torch.tensor(self.home), n).float())  # e_(layer mod n)
        if not identity_res:
            self.A_r = nn.Parameter(torch.eye(n))
        self.B = nn.Parameter(torch.ones(n))

    def decay_parameters(self):
        return [self.W_m] + ([] if self.identity_res else [self.W_r]) + [self.W_beta]   # the order of old runs

    def static_decay_parameters(self):
        # the published static_alpha (n, 1 + n) = [A_m | A_r]; its static_beta (B) is 1-D
        return [self.A_m] + ([] if self.identity_res else [self.A_r])

    def coefficients(self, h):
        self.check(h)
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            H_bar = h / rms(h) * self.norm_gain                                     # (B, T, n, C)
            p_r = None if self.identity_res else H_bar @ self.W_r
            return self.gates(H_bar @ self.W_m, p_r, H_bar @ self.W_beta)

    def gates(self, p_m, p_r, p_beta):
        """Eqs. 10-13 from the projections H̄ W_m (B, T, n, 1), H̄ W_r (B, T, n, n), H̄ W_β (B, T, n, 1)."""
        A_m = self.s_alpha * torch.tanh(p_m).squeeze(-1) + self.A_m      # (B, T, n)
        B = self.s_beta * torch.tanh(p_beta).squeeze(-1) + self.B         # (B, T, n)
        if self.identity_res:
            return A_m, B, self.identity(A_m)
        A_r = self.s_alpha * torch.tanh(p_r) + self.A_r                   # (B, T, n, n)
        # A_r[j, i] is what input stream j sends to output stream i, so H_res = A_rᵀ
        return A_m, B, A_r.transpose(-1, -2)


# ----------------------------------------------------------------------------------------
# mHC family: coefficients from all streams at once, H_res on the Birkhoff polytope

class ManifoldConnection(Connection):
    """The shared part of mHC, mHC-lite and KromHC (mHC Eqs. 7-8, fused form 14-18):

        x      = flatten(h)                                  (B, T, nC)
        m      = (x · γ) φ / rms(x)                          φ: nC x (r + 2n)
        H_pre  = σ(α_pre · m_pre + b_pre)                    in (0, 1)
        H_post = 2 σ(α_post · m_post + b_post)               in (0, 2)
        H_res  = self.residual_matrix(α_res · m_res + b_res) doubly stochastic (per subclass)

    Init (published mHC-lite / KromHC code): φ = 0, γ = 1, α = gate_init, b_pre = b_post =
    +1 on the home stream and -1 elsewhere (breaks the symmetry of identical streams),
    b_res = 0 on the identity and ``res_logit_init`` elsewhere.

    coeff_norm="flat" is mHC Eq. 7: one RMS over the token's n C values. "stream" divides each
    stream by its own RMS over C instead, as HC and the hyper-connections package's mHC do
    (docs/peers.md); the fused kernels implement "flat" only.
    """

    def __init__(self, dim, n_streams, layer_idx, n_res_logits, gate_init, res_logit_init, coeff_norm, fused,
                 identity_res):
        super().__init__(dim, n_streams, layer_idx, fused, identity_res)
        n, r = n_streams, 0 if identity_res else n_res_logits   # Identity-HC: no H_res logits at all
        self.r, self.coeff_norm = r, coeff_norm
        self.phi = nn.Parameter(torch.zeros(n * dim, r + 2 * n))
        self.gamma = nn.Parameter(torch.ones(n * dim))
        # registered in this order (the H_res ones where they always were: see HyperConnection)
        self.alpha_pre = nn.Parameter(torch.tensor(float(gate_init)))
        self.alpha_post = nn.Parameter(torch.tensor(float(gate_init)))
        if not identity_res:
            self.alpha_res = nn.Parameter(torch.tensor(float(gate_init)))
        home = 2 * F.one_hot(torch.tensor(self.home), n).float() - 1     # +1 home, -1 elsewhere
        self.b_pre = nn.Parameter(home.clone())
        self.b_post = nn.Parameter(home.clone())
        if not identity_res:
            self.b_res = nn.Parameter(self.identity_logits(float(res_logit_init)))

    def identity_logits(self, off):
        """b_res at init: 0 where the logit selects the identity, ``off`` elsewhere."""
        raise NotImplementedError

    def residual_matrix(self, z):
        """(B, T, r) logits -> H_res (B, T, n, n)."""
        raise NotImplementedError

    def decay_parameters(self):
        return [self.phi]

    def coefficients(self, h):
        self.check(h)
        with torch.autocast(h.device.type, enabled=False):
            x = h.float()
            if self.coeff_norm == "stream":   # each stream over its own C (docs/peers.md)
                return self.gates(((x / rms(x)).flatten(-2) * self.gamma) @ self.phi)
            x = x.flatten(-2)                                           # (B, T, nC)
            m = ((x * self.gamma) @ self.phi) / rms(x)                  # (B, T, r + 2n)
            return self.gates(m)

    def gates(self, m):
        """H_pre, H_post, H_res from the projection m (B, T, r + 2n)."""
        n = self.n
        m_pre, m_post, m_res = m.split([n, n, self.r], dim=-1)
        H_pre = torch.sigmoid(self.alpha_pre * m_pre + self.b_pre)
        H_post = 2 * torch.sigmoid(self.alpha_post * m_post + self.b_post)
        if self.identity_res:
            return H_pre, H_post, self.identity(H_pre)
        H_res = self.residual_matrix(self.alpha_res * m_res + self.b_res)
        return H_pre, H_post, H_res


class SinkhornLog(torch.autograd.Function):
    """Log-space Sinkhorn-Knopp (mHC Eq. 9) with a recomputing backward.

    Each half-step is L <- L - logsumexp(L) over columns, then over rows; ending on the rows
    makes every output stream an exact convex combination. Autograd through the loop would
    save 2·iters (…, n, n) tensors per connection; instead only the logits are saved and the
    iterates are recomputed in backward, where d(L - lse(L))ᵀ g = g - softmax(L) · Σ g.
    """

    @staticmethod
    def forward(ctx, logits, iters):
        L = logits
        for _ in range(iters):
            L = L - torch.logsumexp(L, dim=-2, keepdim=True)   # columns sum to 1
            L = L - torch.logsumexp(L, dim=-1, keepdim=True)   # rows sum to 1
        out = torch.exp(L)
        ctx.save_for_backward(logits, out)
        ctx.iters = iters
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, out = ctx.saved_tensors
        steps, L = [], logits                      # recompute the iterates
        for _ in range(ctx.iters):
            steps.append((L, -2))
            L = L - torch.logsumexp(L, dim=-2, keepdim=True)
            steps.append((L, -1))
            L = L - torch.logsumexp(L, dim=-1, keepdim=True)
        g = grad_out * out                         # through exp
        for L, dim in reversed(steps):
            g = g - torch.softmax(L, dim=dim) * g.sum(dim=dim, keepdim=True)
        return g, None


def sinkhorn(logits, iters, end="rows", fused="off"):
    """Doubly stochastic matrix from logits (…, n, n), H[out, in]; fused: the connection's path.

    end="rows" (mHC Eq. 9): rows exact, columns to within the error of ``iters``.
    end="cols": the published mHC code's order, which normalises alpha[in, out] = Hᵀ with the same
    iteration: columns exact, and the forward mix carries the error. Same iteration on the
    transpose, so the fused kernel serves both.
    """
    if end == "cols":
        return sinkhorn(logits.transpose(-1, -2), iters, "rows", fused).transpose(-1, -2)
    kernels = _kernels(logits, None, fused)
    if kernels:
        return kernels.sinkhorn(logits, iters)
    return SinkhornLog.apply(logits, iters)


def sinkhorn_reference(logits, iters, end="rows"):
    """The same iteration with plain autograd through the loop (the reference for tests)."""
    L = logits if end == "rows" else logits.transpose(-1, -2)
    for _ in range(iters):
        L = L - torch.logsumexp(L, dim=-2, keepdim=True)
        L = L - torch.logsumexp(L, dim=-1, keepdim=True)
    return torch.exp(L) if end == "rows" else torch.exp(L).transpose(-1, -2)


class MHC(ManifoldConnection):
    """mHC: H_res = SinkhornKnopp(α_res · mat(m_res) + b_res), r = n² logits."""

    def __init__(self, dim, n_streams, layer_idx, sinkhorn_iters, sinkhorn_end, **opts):
        self.sinkhorn_iters, self.sinkhorn_end = sinkhorn_iters, sinkhorn_end
        super().__init__(dim, n_streams, layer_idx, n_streams ** 2, **opts)

    def identity_logits(self, off):
        n = self.n
        return (off * (1 - torch.eye(n))).flatten()          # 0 on the diagonal, `off` elsewhere

    def static_decay_parameters(self):
        # the published static_alpha (n, 1 + n) holds the H_pre and H_res statics; static_beta is 1-D
        return [self.b_pre] + ([] if self.identity_res else [self.b_res])

    def residual_matrix(self, z):
        return sinkhorn(z.unflatten(-1, (self.n, self.n)), self.sinkhorn_iters, self.sinkhorn_end, self.fused)

    def extra_repr(self):
        return f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn_iters}, sinkhorn_end={self.sinkhorn_end}"


def permutation_matrices(n):
    """All n! permutation matrices (n!, n, n), identity first: P[k, i, perm_k[i]] = 1."""
    perms = torch.tensor(list(itertools.permutations(range(n))))
    return F.one_hot(perms, n).float()


class MHCLite(ManifoldConnection):
    """mHC-lite: H_res = Σ_k a_k P_k with a = softmax(α_res · m_res + b_res) over all n! permutations."""

    def __init__(self, dim, n_streams, layer_idx, **opts):
        super().__init__(dim, n_streams, layer_idx, math.factorial(n_streams), **opts)
        self.register_buffer("P", permutation_matrices(n_streams), persistent=False)

    def identity_logits(self, off):
        b = torch.full((math.factorial(self.n),), off)
        b[0] = 0.0                                            # permutations() yields the identity first
        return b

    def residual_matrix(self, z):
        a = torch.softmax(z, dim=-1)                          # convex weights over n! permutations
        return (a @ self.P.flatten(1)).unflatten(-1, (self.n, self.n))


class KromHC(ManifoldConnection):
    """KromHC: H_res = U¹ ⊗ U² ⊗ … ⊗ Uᴷ with n = i_1 · … · i_K and

        a^k = softmax(α_res · m^k + b^k)      over i_k! entries (one α_res shared by all k)
        U^k = Σ_m a^k_m P_m                   doubly stochastic i_k x i_k

    A Kronecker product of doubly stochastic matrices is doubly stochastic, so H_res is exact.
    """

    def __init__(self, dim, n_streams, layer_idx, factors, **opts):
        self.factors = factors
        perms = [permutation_matrices(f) for f in self.factors]
        super().__init__(dim, n_streams, layer_idx, sum(p.shape[0] for p in perms), **opts)
        for k, p in enumerate(perms):
            self.register_buffer(f"P{k}", p, persistent=False)

    def identity_logits(self, off):
        return torch.cat([self.factor_identity_logits(f, off) for f in self.factors])

    @staticmethod
    def factor_identity_logits(size, off):
        b = torch.full((math.factorial(size),), off)
        b[0] = 0.0
        return b

    def residual_matrix(self, z):
        H = None
        for k, z_k in enumerate(z.split([math.factorial(f) for f in self.factors], dim=-1)):
            P = getattr(self, f"P{k}")
            f = P.shape[-1]
            U = (torch.softmax(z_k, dim=-1) @ P.flatten(1)).unflatten(-1, (f, f))
            if H is None:
                H = U
            else:  # (A ⊗ U)[(a, u), (b, v)] = A[a, b] · U[u, v]
                m = H.shape[-1]
                H = (H[..., :, None, :, None] * U[..., None, :, None, :]).reshape(*U.shape[:-2], m * f, m * f)
        return H


# ----------------------------------------------------------------------------------------
# mHC as DeepSeek-V4 runs it, and its learned readout of the streams (docs/mhc_v4.md: each
# formula with the source file it was read from)

V4_INIT_STD = 0.02  # torchtitan's DeepSeek-V4 init of fn, base and scale: trunc_normal_(std=0.02)


def v4_projection(fn, h):
    """m = (x fnᵀ) · rsqrt(mean(x²) + 1e-6) with x = flatten(h) (B, T, nC) in fp32: DeepSeek-V4's
    coefficient projection (no norm gain γ: the V4 code has none, a gain would fold into fn)."""
    x = h.float().flatten(-2)
    return (x @ fn.t()) / rms(x)


class MHCV4(Connection):
    """DeepSeek-V4's mHC, in DeepSeek's names (fn, base, scale) and coefficient layout:

        m      = (x fnᵀ) · rsqrt(mean(x²) + 1e-6)                  fn: ((2 + n) n, nC), x = flatten(h)
        pre    = σ(scale[0] m_pre + base_pre) + eps                 (n,)
        post   = 2 σ(scale[1] m_post + base_post)                   (n,)
        comb   = softmax_k(scale[2] mat(m_res) + base_res) + eps    (n, n), comb[j, k]: input j -> output k
        comb   = comb / (Σ_j comb[j, k] + eps)                      then (iters - 1) times: rows, columns,
                                                                    each divided by (its sum + eps)
        out[k] = post[k] y + Σ_j comb[j, k] h[j]

    In hcgpt's convention (rows = outputs): H_pre = pre, H_post = post, H_res = combᵀ. The softmax runs
    over comb's rows, i.e. H_res's columns, and the last step normalises H_res's rows: each output stream
    is a convex combination of the inputs to within eps, and the columns carry the error of finitely
    many iterations (measured in docs/mhc_v4.md). Init as torchtitan's training code: fn, base, scale
    ~ N(0, 0.02²), so at step 0 H_pre ≈ 1/2, H_post ≈ 1 and H_res ≈ 1/n everywhere.
    """

    def __init__(self, dim, n_streams, layer_idx, sinkhorn_iters, hc_eps, fused):
        super().__init__(dim, n_streams, layer_idx, fused, identity_res=False)
        n = n_streams
        self.sinkhorn_iters, self.eps = sinkhorn_iters, float(hc_eps)
        self.r = n * n  # H_res logits, as the mHC family counts them (the fused path's key: r + 2n columns)
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * dim))    # rows: pre (n), post (n), comb (n², row-major)
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))                    # pre, post, comb
        for p in (self.fn, self.base, self.scale):
            nn.init.trunc_normal_(p, std=V4_INIT_STD)

    def decay_parameters(self):
        return [self.fn]

    def coefficients(self, h):
        self.check(h)
        n, eps = self.n, self.eps
        with torch.autocast(h.device.type, enabled=False):
            m_pre, m_post, m_res = v4_projection(self.fn, h).split([n, n, n * n], dim=-1)
            base_pre, base_post, base_res = self.base.split([n, n, n * n])
            pre = torch.sigmoid(self.scale[0] * m_pre + base_pre) + eps
            post = 2 * torch.sigmoid(self.scale[1] * m_post + base_post)
            z = (self.scale[2] * m_res + base_res).unflatten(-1, (n, n))           # comb logits [j, k]
            # the 2·iters (…, n, n) iterates are recomputed in backward rather than saved
            comb = checkpoint(self.sinkhorn, z, use_reentrant=False) if torch.is_grad_enabled() else self.sinkhorn(z)
            return pre, post, comb.transpose(-1, -2)                                # H_res[k, j] = comb[j, k]

    def sinkhorn(self, z):
        """comb from its logits z (…, n, n) [input j, output k]: DeepSeek-V4's Sinkhorn with eps, eps added after
        the softmax as DeepSeek's inference kernel (vLLM, Megatron-Core, Liger) has it; torchtitan puts it in
        the softmax's denominator instead, which differs on sharp logits (docs/mhc_v4.md)."""
        eps = self.eps
        comb = torch.softmax(z, dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return comb

    def extra_repr(self):
        return f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn_iters}, hc_eps={self.eps}"


class HCHead(nn.Module):
    """DeepSeek-V4's readout of the streams (hc_head), before the final norm and the unembedding:

        m   = (x fnᵀ) · rsqrt(mean(x²) + 1e-6)          fn: (n, nC), x = flatten(h)
        w   = σ(scale · m + base) + eps                 (B, T, n): one weight per stream and token
        out = Σ_j w[j] h[j]                             (B, T, C)

    Init as torchtitan's: fn, base, scale ~ N(0, 0.02²), so w ≈ 1/2 at step 0 (a scaled mean, which
    the final norm undoes).
    """

    def __init__(self, dim, n_streams, hc_eps):
        super().__init__()
        self.dim, self.n, self.eps = dim, n_streams, float(hc_eps)
        self.fn = nn.Parameter(torch.empty(n_streams, n_streams * dim))
        self.base = nn.Parameter(torch.empty(n_streams))
        self.scale = nn.Parameter(torch.empty(1))
        for p in (self.fn, self.base, self.scale):
            nn.init.trunc_normal_(p, std=V4_INIT_STD)

    def decay_parameters(self):
        """Weight-decayed like the connections' dynamic projections: fn."""
        return [self.fn]

    def static_decay_parameters(self):
        return []

    def weights(self, h):
        """The readout weight of each stream, w (B, T, n), fp32."""
        if h.dim() != 4 or h.shape[-2:] != (self.n, self.dim):
            raise ValueError(f"HCHead expects streams of shape (B, T, n={self.n}, C={self.dim}), got {tuple(h.shape)}")
        with torch.autocast(h.device.type, enabled=False):
            return torch.sigmoid(self.scale * v4_projection(self.fn, h) + self.base) + self.eps

    def forward(self, h):
        w = self.weights(h)
        return (w.unsqueeze(-1) * h.float()).sum(dim=-2).to(h.dtype)

    def extra_repr(self):
        return f"dim={self.dim}, n_streams={self.n}, hc_eps={self.eps}"


# ----------------------------------------------------------------------------------------
# construction

def make_connection(scheme, dim, n_streams, layer_idx, **options):
    """Build the connection of one sublayer. scheme: one of SCHEMES; dim: C; n_streams: n; layer_idx: its
    index in depth (block i: attention 2i, MLP 2i + 1), which picks the home stream layer_idx mod n;
    options: SchemeConfig's other keys (sinkhorn_iters, kron_factors, identity_res, fused, ...), their
    declared defaults where not given. A scheme ignores the options it does not use."""
    try:
        sc = SchemeConfig(scheme=scheme, n_streams=n_streams, **options)
    except TypeError:   # an option SchemeConfig does not declare
        unknown = sorted(set(options) - set(SchemeConfig.__dataclass_fields__))
        raise ConfigError(f"unknown connection option(s) {unknown}; known: "
                          f"{sorted(set(SchemeConfig.__dataclass_fields__) - {'scheme', 'n_streams'})}") from None
    return connection(sc, dim, layer_idx)


def connection(sc, dim, layer_idx):
    """The connection of one sublayer of width dim for a checked SchemeConfig sc (a model's GPTConfig is one)."""
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive integer, got {dim!r}")
    n, scheme = sc.n_streams, sc.scheme
    path = dict(fused=sc.fused)
    if scheme == "plain":
        return Plain(dim, 1, layer_idx, identity_res=False, **path)
    if scheme == "mhc_v4":
        return MHCV4(dim, n, layer_idx, sc.sinkhorn_iters, sc.hc_eps, **path)
    gates = dict(gate_init=sc.gate_init, identity_res=sc.identity_res, **path)
    if scheme == "hc":
        return HyperConnection(dim, n, layer_idx, **gates)
    res = dict(gates, res_logit_init=sc.res_logit_init, coeff_norm=sc.coeff_norm)
    if scheme == "mhc":
        return MHC(dim, n, layer_idx, sc.sinkhorn_iters, sc.sinkhorn_end, **res)
    if scheme == "mhc_lite":
        return MHCLite(dim, n, layer_idx, **res)
    return KromHC(dim, n, layer_idx, sc.factors(), **res)


# ----------------------------------------------------------------------------------------
# diagnostics

def doubly_stochastic_error(H_res):
    """max |row sum - 1|, max |column sum - 1| and the min entry of H_res (…, n, n), as floats."""
    H = H_res.detach().float()
    return {
        "ds_row_err": (H.sum(-1) - 1).abs().max().item(),
        "ds_col_err": (H.sum(-2) - 1).abs().max().item(),
        "min_entry": H.min().item(),
    }


def amax_gain(H):
    """Amax gain of (…, n, n): max absolute row sum (forward) and column sum (backward)."""
    H = H.detach().float().abs()
    return {"amax_fwd": H.sum(-1).max().item(), "amax_bwd": H.sum(-2).max().item()}


@torch.no_grad()
def diagnostics(coeffs, names):
    """Dashboard diagnostics for a stack of connections evaluated on one batch.

    coeffs: list of (H_pre, H_post, H_res) in depth order; names: one label per connection.
    Returns {"scalars": {name/metric: float}, "matrices": {name: token-averaged H_res},
    "composite": token-averaged product H_res^(L) … H_res^(1)}.
    """
    if len(coeffs) != len(names):
        raise ValueError(f"diagnostics got {len(coeffs)} coefficient sets but {len(names)} names")
    scalars, matrices, composite = {}, {}, None
    for name, (H_pre, H_post, H_res) in zip(names, coeffs):
        H_res = H_res.float()
        n = H_res.shape[-1]
        eye = torch.eye(n, device=H_res.device)
        s = {**doubly_stochastic_error(H_res), **amax_gain(H_res),
             "dist_identity": (H_res - eye).flatten(-2).norm(dim=-1).mean().item()}
        for label, H in (("h_pre", H_pre), ("h_post", H_post)):
            H = H.float().flatten(0, -2)                                   # (tokens, n)
            for i in range(n):
                s[f"{label}_mean/{i}"] = H[:, i].mean().item()
                s[f"{label}_min/{i}"] = H[:, i].min().item()
                s[f"{label}_max/{i}"] = H[:, i].max().item()
        scalars.update({f"{name}/{k}": v for k, v in s.items()})
        matrices[name] = H_res.flatten(0, -3).mean(0).tolist()
        composite = H_res if composite is None else H_res @ composite     # later layers act on the left
    if composite is not None:
        scalars.update({f"composite/{k}": v for k, v in {**amax_gain(composite),
                                                           **doubly_stochastic_error(composite)}.items()})
        composite = composite.flatten(0, -3).mean(0).tolist()
    return {"scalars": scalars, "matrices": matrices, "composite": composite}


@torch.no_grad()
def readout_diagnostics(w):
    """Mean, min and max readout weight of each stream over the tokens, from HCHead.weights (…, n)."""
    w = w.float().flatten(0, -2)
    return {f"readout/w_{stat}/{i}": getattr(w[:, i], stat)().item()
            for stat in ("mean", "min", "max") for i in range(w.shape[-1])}
