"""Fused Triton kernels for the n-stream connections of hc.py, with their autograd wrappers.

hc.py is the reference: these kernels compute its equations (residual-schemes.md section 1),

    x_in     = sum_j H_pre[j] h[j]
    h_new[i] = sum_j H_res[i, j] h[j] + H_post[i] y,        y = branch(x_in)

with fewer passes over the stream h (B, T, n, C), which is what the stream ops cost: they are
memory-bound (docs/speed.md). Per connection:

  (a) pre_mix   the RMS, the coefficient projection m (mHC Eqs. 14-15; HC Eqs. 10-13 per
                stream) and x_in = sum_j H_pre[j] h[j] (a second pass over h, once H_pre is
                known). H_pre's gate is applied inside the kernel; H_post and H_res come from m
                in torch (conn.gates), since m is only r + 2n floats per token.
  (b) post_mix  one read-modify-write: h_new = H_res h + H_post y, the sums over streams per thread.
  (c) sinkhorn  log-space Sinkhorn-Knopp (mHC Eq. 9), all iterations on chip; the backward
                recomputes the iterates from the logits instead of saving 2 x iters matrices.
  (b)+(a)       post_pre_mix: where one connection follows another (hc.run_connections, e.g. a block's
                attention then MLP), (b) of the first and (a) of the second are one kernel: h_new is
                projected while it is on chip, and in the backward h_new's gradient goes through (b)
                without being written (the same two kernels as (a), with POST set).

Backward saves h (once: the same tensor for (a) and (b)), y, and the small per-token m, rstd,
H_res, H_post; the mixes are recomputed. (b)'s gradient of h is added inside (a)'s backward
kernel (chain_forward routes it there), so h's gradient is written once. The backward of (a)
reduces the projection's gradient per tile with relaxed fp32 atomics, so phi/W and gamma
gradients are summed in a nondeterministic order.

Bytes per token and sublayer at n = 4, C = 768, bf16 streams (a state is 6 KB), forward +
backward: 75 KB with separate (a) and (b), 57 KB at a joined boundary, 66 KB in hcgpt's blocks
(their inner boundary joined); the table and what is left to fuse are in docs/speed.md ("Fused
kernels: bytes per token").

The kernels are torch.library custom ops (torch.compile sees them as opaque ops). They run on
CUDA, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set before Triton is first
imported; for tests). hc.py imports this module only when the fused path is asked for. Each
connection's `fused` (the config key) picks the path: "auto" (these kernels on CUDA where they apply, warning once where they do not),
"on" (these kernels or an error), "off" (the torch reference).
"""

import os
import warnings
from typing import Optional

import torch

from errors import FusedCheckError

try:
    import triton
    import triton.language as tl
    TRITON_ERROR = None
    # Triton's interpreter works only if TRITON_INTERPRET=1 was set before Triton's first import,
    # which builds its library functions (tl.sum, ...) for one mode or the other
    INTERPRETER_READY = type(tl.sum).__name__ == "InterpretedFunction"
except ImportError as e:  # the torch path of hc.py needs no Triton
    triton, TRITON_ERROR = None, f"{type(e).__name__}: {e}"

    class tl:  # only so that the kernel signatures below parse; the kernels cannot run
        constexpr = None

EPS = 1e-6            # hc.rms
MAX_STREAMS = 16      # n per token held on chip
MAX_COLUMNS = 128     # projection columns per token (r + 2n; n + 2 for HC): mhc_lite stops at n = 4

# Tile shapes. (a) is autotuned on CUDA over (BLOCK_M tokens, BLOCK_C channels, warps, stages)
# that compile for sm_90 (tl.dot needs BLOCK_M >= 16). More tokens per program means fewer reads of
# the projection weight from L2 and fewer atomics for its gradient: each program loads each chunk
# of φ (nC x R fp32, 295 KB for mhc at n = 4, C = 768) once for its BLOCK_M tokens, 2.3 KB per token
# at 128 tokens against 9.2 KB at 32, and adds its (K, R) gradient once. (b) keeps few tokens and wide
# channel chunks, TILE elements of (tokens, channels) per stream and step. The interpreter (CPU)
# uses small fixed tiles so that tests cross tile edges.
PRE_CONFIGS = [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (128, 16, 8, 2)]
PRE_CPU = dict(BLOCK_M=16, BLOCK_C=32)
POST_CPU = (8, 32)
TILE = 2048


# ----------------------------------------------------------------------------------------
# (a) RMS + coefficient projection + H_pre mix

def _pre_mix_fwd_kernel(
        h_ptr, w_ptr, g_ptr, a_ptr, b_ptr,          # h (M, N, C) strided; weight (K, R); gain (K,);
                                                    # gate scale (); gate bias (N,)
        m_ptr, rstd_ptr, x_ptr,                     # out: m (M, R) | (M, N, R) fp32; rstd (M,) | (M, N); x_in (M, C)
        hp_ptr, y_ptr, res_ptr, post_ptr,           # POST: the previous connection's h (M, N, C) strided, y (M, C),
                                                    # H_res (M, N, N), H_post (M, N); h_ptr is then its output
        M, C, R, s_hm, s_hn, s_hc, s_pm, s_pn, s_pc, eps, M_BUCKET,
        N: tl.constexpr, N_PAD: tl.constexpr, R_PAD: tl.constexpr, HC: tl.constexpr, POST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """HC=False (mHC family): m = (x γ) φ / rms(x) over the token's N C values (K = N C rows of φ),
    H_pre = σ(α m[:N] + b). HC=True: per stream j, m_j = (h_j g / rms(h_j)) W (K = C),
    H_pre[j] = s tanh(m_j[0]) + A_m[j]. Both: x_in = Σ_j H_pre[j] h_j.
    POST: h is first made, as (b) makes it, from the previous connection's streams: h[j] = Σ_i H_res[j, i]
    hp[i] + H_post[j] y, written out (rounded to its dtype) while pass 1 projects it."""
    s_hm, s_hn, s_hc = tl.cast(s_hm, tl.int64), tl.cast(s_hn, tl.int64), tl.cast(s_hc, tl.int64)  # j s_hn may pass 2^31
    s_pm, s_pn, s_pc = tl.cast(s_pm, tl.int64), tl.cast(s_pn, tl.int64), tl.cast(s_pc, tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    rc = tl.arange(0, R_PAD)
    rc_ok = rc < R
    st = tl.arange(0, N_PAD)
    scale = tl.load(a_ptr).to(tl.float32)
    H_pre = tl.zeros([BLOCK_M, N_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    # pass 1: the projection and the sum of squares, one read of the token's n x C values. HC: stream
    # by stream (its own norm); mHC: channel chunk by chunk, all streams of a chunk together (POST's
    # reloads of hp[i] for the next stream j then hit L1)
    for jo in range(N if HC else 1):
        if HC:
            acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            c_ok = cc < C
            xmask = row_ok[:, None] & c_ok[None, :]
            if POST:
                y = tl.load(y_ptr + rows64[:, None] * C + cc[None, :], mask=xmask, other=0.0).to(tl.float32)
            for j in range(jo if HC else 0, jo + 1 if HC else N):
                h_offs = rows64[:, None] * s_hm + j * s_hn + cc[None, :] * s_hc
                if POST:   # (b) of the previous connection, in fp32, rounded once as post_mix rounds it
                    x = tl.load(post_ptr + rows64 * N + j, mask=row_ok, other=0.0)[:, None] * y
                    for i in range(N):
                        res_ji = tl.load(res_ptr + rows64 * (N * N) + j * N + i, mask=row_ok, other=0.0)
                        x += res_ji[:, None] * tl.load(hp_ptr + rows64[:, None] * s_pm + i * s_pn + cc[None, :] * s_pc,
                                                       mask=xmask, other=0.0).to(tl.float32)
                    x = x.to(h_ptr.dtype.element_ty)
                    tl.store(h_ptr + h_offs, x, mask=xmask)
                    x = x.to(tl.float32)
                else:
                    x = tl.load(h_ptr + h_offs, mask=xmask, other=0.0).to(tl.float32)
                if HC:
                    k = cc              # one C x R weight shared by the streams
                else:
                    k = j * C + cc      # row of φ for flatten(h)[j C + c]
                gain = tl.load(g_ptr + k, mask=c_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + k[:, None] * R + rc[None, :], mask=c_ok[:, None] & rc_ok[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.dot(x * gain[None, :], w, input_precision=PRECISION)
                ss += tl.sum(x * x, axis=1)
        if HC:
            rstd = 1.0 / tl.sqrt(ss / C + eps)
            m = acc * rstd[:, None]                                      # H̄_j W
            tl.store(m_ptr + (rows64[:, None] * N + jo) * R + rc[None, :], m, mask=row_ok[:, None] & rc_ok[None, :])
            tl.store(rstd_ptr + rows64 * N + jo, rstd, mask=row_ok)
            p = tl.sum(tl.where(rc[None, :] == 0, m, 0.0), axis=1)      # H̄_j W_m
            H_j = scale * (2.0 * tl.sigmoid(2.0 * p) - 1.0) + tl.load(b_ptr + jo).to(tl.float32)  # s tanh(.) + A_m
            H_pre = tl.where(st[None, :] == jo, H_j[:, None], H_pre)
    if not HC:
        rstd = 1.0 / tl.sqrt(ss / (N * C) + eps)
        m = acc * rstd[:, None]
        tl.store(m_ptr + rows64[:, None] * R + rc[None, :], m, mask=row_ok[:, None] & rc_ok[None, :])
        tl.store(rstd_ptr + rows64, rstd, mask=row_ok)
        tl.debug_barrier()  # m[:, :N] is read back by other threads of this program
        m_pre = tl.load(m_ptr + rows64[:, None] * R + st[None, :], mask=row_ok[:, None] & (st[None, :] < N), other=0.0)
        b = tl.load(b_ptr + st, mask=st < N, other=0.0).to(tl.float32)
        H_pre = tl.sigmoid(scale * m_pre + b[None, :])
    if POST:
        tl.debug_barrier()  # pass 2 reads h where other threads of this program wrote it
    # pass 2: x_in = Σ_j H_pre[j] h_j, a second read of h (from HBM at training sizes: h outgrows L2)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        c_ok = cc < C
        x_in = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for j in range(N):
            x = tl.load(h_ptr + rows64[:, None] * s_hm + j * s_hn + cc[None, :] * s_hc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            H_j = tl.sum(tl.where(st[None, :] == j, H_pre, 0.0), axis=1)
            x_in += H_j[:, None] * x
        tl.store(x_ptr + rows64[:, None] * C + cc[None, :], x_in.to(x_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok[None, :])


def _pre_mix_bwd_kernel(
        h_ptr, w_ptr, g_ptr, a_ptr, b_ptr, m_ptr, rstd_ptr, gm_ptr, gx_ptr,
        ga_ptr,                           # (M, N, C): h's gradient from (b), added in (HAS_GA)
        gh_ptr, gw_ptr, dH_ptr, gu_ptr,   # out: grad h (M, N, C); G = Σ_tokens x ⊗ grad_u (K, R) fp32, atomic;
                                          # dL/dH_pre (M, N) fp32; scratch grad_u (M, R) fp32 (mHC family)
        hp_ptr, y_ptr, res_ptr, post_ptr,         # POST: the previous connection's h (strided), y, H_res, H_post
        gy_ptr, gres_ptr, gpost_ptr,              # POST out: grad y (M, C), grad H_res (M, N, N), grad H_post (M, N)
        M, C, R, s_hm, s_hn, s_hc, s_pm, s_pn, s_pc, M_BUCKET,
        N: tl.constexpr, N_PAD: tl.constexpr, R_PAD: tl.constexpr, HC: tl.constexpr, HAS_GM: tl.constexpr,
        HAS_GA: tl.constexpr, POST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr):
    """With u = (x γ) W and m = rstd u: grad_u = rstd grad_m, and
    dL/dx = γ (grad_u Wᵀ) - (Σ_k grad_m_k m_k) rstd² x / K + H_pre[j] grad_x_in (+ grad_a: (b)'s share),
    where grad_m includes the H_pre gate's share. dW = γ G and dγ = rowsum(W G) are formed outside.
    POST (h = H_res hp + H_post y, made by the forward of the same name): grad h stays on chip, and
    (b)'s backward runs on it: grad hp[i] = Σ_j H_res[j, i] grad h[j], grad y = Σ_j H_post[j] grad h[j],
    grad H_res[j, i] = Σ_c grad h[j] hp[i], grad H_post[j] = Σ_c grad h[j] y; gh_ptr is then grad hp."""
    s_hm, s_hn, s_hc = tl.cast(s_hm, tl.int64), tl.cast(s_hn, tl.int64), tl.cast(s_hc, tl.int64)  # j s_hn may pass 2^31
    s_pm, s_pn, s_pc = tl.cast(s_pm, tl.int64), tl.cast(s_pn, tl.int64), tl.cast(s_pc, tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    rc = tl.arange(0, R_PAD)
    rc_ok = rc < R
    st = tl.arange(0, N_PAD)
    st_ok = st < N
    scale = tl.load(a_ptr).to(tl.float32)
    # pass 1: dL/dH_pre[j] = Σ_c grad_x_in[c] h_j[c]
    dH = tl.zeros([BLOCK_M, N_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        c_ok = cc < C
        gx = tl.load(gx_ptr + rows64[:, None] * C + cc[None, :], mask=row_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        for j in range(N):
            x = tl.load(h_ptr + rows64[:, None] * s_hm + j * s_hn + cc[None, :] * s_hc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            dH += tl.where(st[None, :] == j, tl.sum(gx * x, axis=1)[:, None], 0.0)
    tl.store(dH_ptr + rows64[:, None] * N + st[None, :], dH, mask=row_ok[:, None] & st_ok[None, :])
    if not HC:
        # through H_pre = σ(α m[:N] + b) into grad_m[:N]; the whole token shares one rstd
        rmask = row_ok[:, None] & rc_ok[None, :]
        pmask = row_ok[:, None] & st_ok[None, :]
        m = tl.load(m_ptr + rows64[:, None] * R + rc[None, :], mask=rmask, other=0.0)
        m_pre = tl.load(m_ptr + rows64[:, None] * R + st[None, :], mask=pmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows64, mask=row_ok, other=0.0)
        b = tl.load(b_ptr + st, mask=st_ok, other=0.0).to(tl.float32)
        H_pre = tl.sigmoid(scale * m_pre + b[None, :])
        dz = dH * H_pre * (1.0 - H_pre) * scale
        if HAS_GM:
            gm = tl.load(gm_ptr + rows64[:, None] * R + rc[None, :], mask=rmask, other=0.0)
            gm_pre = tl.load(gm_ptr + rows64[:, None] * R + st[None, :], mask=pmask, other=0.0)
        else:
            gm = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
            gm_pre = tl.zeros([BLOCK_M, N_PAD], dtype=tl.float32)
        # grad_u = rstd (grad_m + the gate's share in columns < N), assembled in the scratch row
        tl.store(gu_ptr + rows64[:, None] * R + rc[None, :], gm * rstd[:, None], mask=rmask)
        tl.debug_barrier()
        tl.store(gu_ptr + rows64[:, None] * R + st[None, :], (gm_pre + dz) * rstd[:, None], mask=pmask)
        tl.debug_barrier()
        gu = tl.load(gu_ptr + rows64[:, None] * R + rc[None, :], mask=rmask, other=0.0)
        coef = tl.sum(gu * m, axis=1) * rstd / (N * C)
    # pass 2: grad of h, and G += xᵀ grad_u for the weight (h and grad x_in read a second time), channel
    # chunk by chunk, all streams of a chunk together (POST needs every grad h[j] of the chunk)
    if POST:
        d_res = tl.zeros([BLOCK_M, N_PAD, N_PAD], dtype=tl.float32)    # [token, j, i]
        d_post = tl.zeros([BLOCK_M, N_PAD], dtype=tl.float32)
        res_offs = rows64[:, None] * (N * N) + st[None, :]              # + j N: row j of H_res
        nn_mask = row_ok[:, None] & st_ok[None, :]
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        c_ok = cc < C
        xmask = row_ok[:, None] & c_ok[None, :]
        gx = tl.load(gx_ptr + rows64[:, None] * C + cc[None, :], mask=xmask, other=0.0).to(tl.float32)
        if POST:
            y = tl.load(y_ptr + rows64[:, None] * C + cc[None, :], mask=xmask, other=0.0).to(tl.float32)
            gy = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            ghp = tl.zeros([BLOCK_M, N_PAD, BLOCK_C], dtype=tl.float32)
        for j in range(N):
            if HC:   # the stream's own norm and gate (small per-token rows, reloaded per chunk from cache)
                rmask = row_ok[:, None] & rc_ok[None, :]
                m = tl.load(m_ptr + (rows64[:, None] * N + j) * R + rc[None, :], mask=rmask, other=0.0)
                if HAS_GM:
                    gm = tl.load(gm_ptr + (rows64[:, None] * N + j) * R + rc[None, :], mask=rmask, other=0.0)
                else:
                    gm = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
                rstd = tl.load(rstd_ptr + rows64 * N + j, mask=row_ok, other=0.0)
                p = tl.sum(tl.where(rc[None, :] == 0, m, 0.0), axis=1)
                t = 2.0 * tl.sigmoid(2.0 * p) - 1.0                            # tanh(H̄_j W_m)
                H_j = scale * t + tl.load(b_ptr + j).to(tl.float32)
                dH_j = tl.sum(tl.where(st[None, :] == j, dH, 0.0), axis=1)
                gm += tl.where(rc[None, :] == 0, (dH_j * scale * (1.0 - t * t))[:, None], 0.0)
                gu = gm * rstd[:, None]
                coef = tl.sum(gm * m, axis=1) * rstd * rstd / C
                k = cc
            else:
                H_j = tl.sum(tl.where(st[None, :] == j, H_pre, 0.0), axis=1)
                k = j * C + cc
            x = tl.load(h_ptr + rows64[:, None] * s_hm + j * s_hn + cc[None, :] * s_hc, mask=xmask,
                        other=0.0).to(tl.float32)
            gain = tl.load(g_ptr + k, mask=c_ok, other=0.0).to(tl.float32)
            wmask = c_ok[:, None] & rc_ok[None, :]
            w = tl.load(w_ptr + k[:, None] * R + rc[None, :], mask=wmask, other=0.0).to(tl.float32)
            gh = tl.dot(gu, tl.trans(w), input_precision=PRECISION) * gain[None, :] \
                - coef[:, None] * x + H_j[:, None] * gx
            if HAS_GA:   # h's two gradients summed here, rounded once, instead of in a pass of their own
                gh += tl.load(ga_ptr + (rows64[:, None] * N + j) * C + cc[None, :], mask=xmask,
                              other=0.0).to(tl.float32)
            G = tl.dot(tl.trans(x), gu, input_precision=PRECISION)          # (BLOCK_C, R_PAD)
            tl.atomic_add(gw_ptr + k[:, None] * R + rc[None, :], G, mask=wmask, sem="relaxed")  # no fence: a sum
            if POST:     # grad h[j] goes through (b) in fp32 without leaving the chip
                gy += tl.load(post_ptr + rows64 * N + j, mask=row_ok, other=0.0)[:, None] * gh
                d_post += tl.where(st[None, :] == j, tl.sum(gh * y, axis=1)[:, None], 0.0)
                for i in range(N):   # hp[i] from HBM once per chunk, its reloads for later j from L1
                    hp = tl.load(hp_ptr + rows64[:, None] * s_pm + i * s_pn + cc[None, :] * s_pc, mask=xmask,
                                 other=0.0).to(tl.float32)
                    d_res += tl.where((st[None, :, None] == j) & (st[None, None, :] == i),
                                      tl.sum(gh * hp, axis=1)[:, None, None], 0.0)
                res_j = tl.load(res_ptr + res_offs + j * N, mask=nn_mask, other=0.0)   # H_res[j, i] over i
                ghp += res_j[:, :, None] * gh[:, None, :]
            else:
                tl.store(gh_ptr + (rows64[:, None] * N + j) * C + cc[None, :], gh.to(gh_ptr.dtype.element_ty),
                         mask=xmask)
        if POST:
            tl.store(gy_ptr + rows64[:, None] * C + cc[None, :], gy.to(gy_ptr.dtype.element_ty), mask=xmask)
            tl.store(gh_ptr + (rows64[:, None, None] * N + st[None, :, None]) * C + cc[None, None, :],
                     ghp.to(gh_ptr.dtype.element_ty), mask=xmask[:, None, :] & st_ok[None, :, None])
    if POST:
        tl.store(gres_ptr + rows64[:, None, None] * (N * N) + st[None, :, None] * N + st[None, None, :], d_res,
                 mask=row_ok[:, None, None] & st_ok[None, :, None] & st_ok[None, None, :])
        tl.store(gpost_ptr + rows64[:, None] * N + st[None, :], d_post, mask=nn_mask)


# ----------------------------------------------------------------------------------------
# (b) H_res mix + H_post add

def _post_mix_fwd_kernel(h_ptr, y_ptr, res_ptr, post_ptr, out_ptr, M, C, s_hm, s_hn, s_hc,
                         N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[i] = Σ_j H_res[i, j] h[j] + H_post[i] y, in fp32, rounded once to h's dtype. The sums over
    streams are per thread: every tile is (tokens, channels) in one layout, so a thread owns the same
    (token, channel) of every stream; h[j] is read from HBM once, its reloads for later i hit L1."""
    s_hm, s_hn, s_hc = tl.cast(s_hm, tl.int64), tl.cast(s_hn, tl.int64), tl.cast(s_hc, tl.int64)  # j s_hn may pass 2^31
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        xmask = row_ok[:, None] & (cc < C)[None, :]
        h_offs = rows64[:, None] * s_hm + cc[None, :] * s_hc
        y = tl.load(y_ptr + rows64[:, None] * C + cc[None, :], mask=xmask, other=0.0).to(tl.float32)
        for i in range(N):
            out = tl.load(post_ptr + rows64 * N + i, mask=row_ok, other=0.0)[:, None] * y
            for j in range(N):
                res_ij = tl.load(res_ptr + rows64 * (N * N) + i * N + j, mask=row_ok, other=0.0)
                out += res_ij[:, None] * tl.load(h_ptr + h_offs + j * s_hn, mask=xmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + (rows64[:, None] * N + i) * C + cc[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=xmask)


def _post_mix_bwd_kernel(g_ptr, h_ptr, y_ptr, res_ptr, post_ptr, gh_ptr, gy_ptr, gres_ptr, gpost_ptr,
                         M, C, s_hm, s_hn, s_hc,
                         N: tl.constexpr, NN_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad h[j] = Σ_i H_res[i, j] g[i], grad y = Σ_i H_post[i] g[i],
    grad H_res[i, j] = Σ_c g[i, c] h[j, c], grad H_post[i] = Σ_c g[i, c] y[c]; one pass over C.
    As in the forward, the sums over streams are per thread (reloads of g[i] hit L1); the sums over
    channels reduce across threads once per channel chunk."""
    s_hm, s_hn, s_hc = tl.cast(s_hm, tl.int64), tl.cast(s_hn, tl.int64), tl.cast(s_hc, tl.int64)  # j s_hn may pass 2^31
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ij = tl.arange(0, NN_PAD)                        # (i, j) -> i N + j, grad H_res and grad H_post
    d_res = tl.zeros([BLOCK_M, NN_PAD], dtype=tl.float32)
    d_post = tl.zeros([BLOCK_M, NN_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        xmask = row_ok[:, None] & (cc < C)[None, :]
        g_offs = rows64[:, None] * (N * C) + cc[None, :]
        y = tl.load(y_ptr + rows64[:, None] * C + cc[None, :], mask=xmask, other=0.0).to(tl.float32)
        gy = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for i in range(N):
            g = tl.load(g_ptr + g_offs + i * C, mask=xmask, other=0.0).to(tl.float32)
            gy += tl.load(post_ptr + rows64 * N + i, mask=row_ok, other=0.0)[:, None] * g
            d_post += tl.where(ij[None, :] == i, tl.sum(g * y, axis=1)[:, None], 0.0)
        tl.store(gy_ptr + rows64[:, None] * C + cc[None, :], gy.to(gy_ptr.dtype.element_ty), mask=xmask)
        for j in range(N):
            x = tl.load(h_ptr + rows64[:, None] * s_hm + j * s_hn + cc[None, :] * s_hc, mask=xmask,
                        other=0.0).to(tl.float32)
            gh = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            for i in range(N):
                g = tl.load(g_ptr + g_offs + i * C, mask=xmask, other=0.0).to(tl.float32)
                gh += tl.load(res_ptr + rows64 * (N * N) + i * N + j, mask=row_ok, other=0.0)[:, None] * g
                d_res += tl.where(ij[None, :] == i * N + j, tl.sum(g * x, axis=1)[:, None], 0.0)
            tl.store(gh_ptr + (rows64[:, None] * N + j) * C + cc[None, :], gh.to(gh_ptr.dtype.element_ty), mask=xmask)
    tl.store(gres_ptr + rows64[:, None] * (N * N) + ij[None, :], d_res, mask=row_ok[:, None] & (ij < N * N)[None, :])
    tl.store(gpost_ptr + rows64[:, None] * N + ij[None, :], d_post, mask=row_ok[:, None] & (ij < N)[None, :])


# ----------------------------------------------------------------------------------------
# (c) Sinkhorn-Knopp in log space

def _sinkhorn_fwd_kernel(z_ptr, out_ptr, M, ITERS,
                         N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """L <- L - lse_columns(L), then L <- L - lse_rows(L), ITERS times; out = exp(L)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    st = tl.arange(0, N_PAD)
    ok = (st[None, :, None] < N) & (st[None, None, :] < N)
    offs = rows.to(tl.int64)[:, None, None] * (N * N) + st[None, :, None] * N + st[None, None, :]
    # padded entries are -inf (weight 0); padded tokens are 0 (finite, never stored)
    L = tl.load(z_ptr + offs, mask=row_ok[:, None, None] & ok, other=0.0)
    L = tl.where(ok, L, float("-inf"))
    line_ok = st[None, :] < N
    for _ in range(ITERS):
        # logsumexp per column, then per row; a padded line (all -inf) gets 0: max 0, sum clamped to 1,
        # which a real line never needs (its max term alone is exp(0) = 1)
        mx = tl.where(line_ok, tl.max(L, axis=1), 0.0)
        L = L - (mx + tl.log(tl.maximum(tl.sum(tl.exp(L - mx[:, None, :]), axis=1), 1.0)))[:, None, :]
        mx = tl.where(line_ok, tl.max(L, axis=2), 0.0)
        L = L - (mx + tl.log(tl.maximum(tl.sum(tl.exp(L - mx[:, :, None]), axis=2), 1.0)))[:, :, None]
    tl.store(out_ptr + offs, tl.exp(L), mask=row_ok[:, None, None] & ok)


def _sinkhorn_bwd_kernel(z_ptr, gout_ptr, gz_ptr, lse_ptr, M, ITERS,
                         N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Recompute the iterates keeping each half-step's normaliser (N floats, in scratch), then walk
    back: a half-step L' = L - lse(L) has vector-Jacobian g <- g - exp(L') Σ g (softmax(L) = exp(L')),
    and L = L' + lse(L) restores its input."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    st = tl.arange(0, N_PAD)
    ok = (st[None, :, None] < N) & (st[None, None, :] < N)
    offs = rows64[:, None, None] * (N * N) + st[None, :, None] * N + st[None, None, :]
    lse_offs = rows64[:, None] * (2 * ITERS * N_PAD) + st[None, :]
    L = tl.load(z_ptr + offs, mask=row_ok[:, None, None] & ok, other=0.0)
    L = tl.where(ok, L, float("-inf"))
    line_ok = st[None, :] < N
    for k in range(ITERS):   # the forward iteration, as in _sinkhorn_fwd_kernel
        mx = tl.where(line_ok, tl.max(L, axis=1), 0.0)
        col = mx + tl.log(tl.maximum(tl.sum(tl.exp(L - mx[:, None, :]), axis=1), 1.0))
        tl.store(lse_ptr + lse_offs + (2 * k) * N_PAD, col)
        L = L - col[:, None, :]
        mx = tl.where(line_ok, tl.max(L, axis=2), 0.0)
        row = mx + tl.log(tl.maximum(tl.sum(tl.exp(L - mx[:, :, None]), axis=2), 1.0))
        tl.store(lse_ptr + lse_offs + (2 * k + 1) * N_PAD, row)
        L = L - row[:, :, None]
    P = tl.exp(L)
    g = tl.load(gout_ptr + offs, mask=row_ok[:, None, None] & ok, other=0.0) * P
    for kk in range(ITERS):
        k = ITERS - 1 - kk
        g = g - tl.exp(L) * tl.sum(g, axis=2)[:, :, None]                   # back through the row step
        L = L + tl.load(lse_ptr + lse_offs + (2 * k + 1) * N_PAD)[:, :, None]
        g = g - tl.exp(L) * tl.sum(g, axis=1)[:, None, :]                   # back through the column step
        L = L + tl.load(lse_ptr + lse_offs + (2 * k) * N_PAD)[:, None, :]
    tl.store(gz_ptr + offs, g, mask=row_ok[:, None, None] & ok)


# ----------------------------------------------------------------------------------------
# launching: compiled for CUDA tensors, Triton's interpreter for CPU tensors

_KERNELS = {}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel(fn, device):
    if TRITON_ERROR is not None:
        raise FusedCheckError(f"the fused kernels need Triton: {TRITON_ERROR}")
    key = (fn, device.type, _interpreting())
    if key not in _KERNELS:
        interpret = device.type == "cpu" or _interpreting()   # fixed PRE_CPU tiles there
        tuned = fn in (_pre_mix_fwd_kernel, _pre_mix_bwd_kernel) and not interpret
        _KERNELS[key] = autotuned(fn) if tuned else _jit(fn, interpret)
    return _KERNELS[key]


def _jit(fn, interpret):
    if interpret:  # numpy on the host; slow, for tests
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(fn)
    return triton.jit(fn)


def autotuned(fn, do_bench=None):
    """(a)'s kernel ``fn`` tuned over PRE_CONFIGS per (token count bucket, C, R, n, HC, POST, dtypes):
    M_BUCKET is the token count rounded up to a power of two, so that a diagnostics or eval batch
    gets its own tiles without every new batch shape tuning again. ``do_bench``: Triton's default
    (the tests pass their own to tune under the interpreter)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=st)
               for bm, bc, w, st in PRE_CONFIGS]
    reset = ["gw_ptr"] if fn is _pre_mix_bwd_kernel else None  # G is accumulated atomically
    return triton.autotune(configs, key=["M_BUCKET", "C", "R", "N", "HC", "POST"], reset_to_zero=reset,
                           do_bench=do_bench)(_jit(fn, _interpreting()))


def _launch_pre(fn, M, device, *args, **meta):
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)  # noqa: E731
    kernel = _kernel(fn, device)
    if not isinstance(kernel, triton.runtime.Autotuner):
        meta.update(PRE_CPU)
    kernel[grid](*args, M_BUCKET=_pow2(M), **meta)


def _launch(fn, grid, device, *args, **meta):
    _kernel(fn, device)[grid](*args, **meta)


def _pow2(x, lo=1):
    return max(lo, 1 << (int(x) - 1).bit_length())


def _rows(t, *tail):
    """t as (M, *tail) over its leading dims, a view where the strides allow (expanded streams do)."""
    return t.reshape(-1, *tail)


# ----------------------------------------------------------------------------------------
# custom ops and their autograd

def _empty(t, dtype=None):
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _pre_outputs(h, R, per_stream):
    """Empty m (..., R) [(..., n, R) per stream] and rstd (...) [(..., n)] in fp32, x_in (..., C)."""
    *lead, n, C = h.shape
    mshape = (*lead, n, R) if per_stream else (*lead, R)
    return (h.new_empty(mshape, dtype=torch.float32), h.new_empty(mshape[:-1], dtype=torch.float32),
            h.new_empty((*lead, C)))


def _pre_mix_fwd(h, weight, gain, gate_scale, gate_bias, per_stream, tf32, post=None):
    """pre_mix of h, or with post = (y, H_res, H_post) post_pre_mix -> h_new (None without post), m, rstd, x_in."""
    *lead, n, C = h.shape
    R = weight.shape[1]
    hr = _rows(h, n, C)
    M = hr.shape[0]
    h_new = None if post is None else _empty(h)
    m, rstd, x_in = _pre_outputs(h, R, per_stream)
    if M > 0:
        hs = hr if post is None else h_new.view(M, n, C)   # the streams (a) reads (POST writes them first)
        _launch_pre(_pre_mix_fwd_kernel, M, h.device,
                    hs, weight.contiguous(), gain.contiguous(), gate_scale, gate_bias.contiguous(), m, rstd, x_in,
                    hr, *((x_in, m, m) if post is None else (t.contiguous() for t in post)),   # no POST: unused
                    M, C, R, *hs.stride(), *(hr.stride() if post is not None else (0, 0, 0)), EPS,
                    N=n, N_PAD=_pow2(n), R_PAD=_pow2(R, 16), HC=per_stream, POST=post is not None,
                    PRECISION="tf32" if tf32 else "ieee")
    return h_new, m, rstd, x_in


def _pre_mix_bwd(hs, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_hs, per_stream, tf32,
                 post=None):
    """The backward of (a) on the streams hs it read, grad_hs (None: none) their gradient from beyond (a), added in
    -> grad hs, G, dL/dH_pre. With post = (h, y, H_res, H_post), hs = H_res h + H_post y (post_pre_mix) and its
    gradient goes on through (b) on chip -> grad h, G, dL/dH_pre, grad y, grad H_res, grad H_post (fp32)."""
    *lead, n, C = hs.shape
    R = weight.shape[1]
    hr = _rows(hs, n, C)
    M = hr.shape[0]
    grad_h, dH = _empty(hs), hs.new_empty((*lead, n), dtype=torch.float32)
    G = torch.zeros(weight.shape, dtype=torch.float32, device=hs.device)
    if post is None:
        grads_b, b_args, hp_strides = (), (hr, grad_x, dH, dH, grad_x, dH, dH), (0, 0, 0)   # no POST: unused
    else:
        h, y, H_res, H_post = post
        hp = _rows(h, n, C)
        grads_b = (_empty(y), _empty(H_res, torch.float32), _empty(H_post, torch.float32))
        b_args, hp_strides = (hp, y.contiguous(), H_res.contiguous(), H_post.contiguous(), *grads_b), hp.stride()
    if M > 0:
        gu = torch.empty((1,) if per_stream else (M, R), dtype=torch.float32, device=hs.device)
        _launch_pre(_pre_mix_bwd_kernel, M, hs.device,
                    hr, weight.contiguous(), gain.contiguous(), gate_scale, gate_bias.contiguous(), m, rstd,
                    m if grad_m is None else grad_m.contiguous(), grad_x.contiguous(),
                    grad_h if grad_hs is None else grad_hs.contiguous(), grad_h, G, dH, gu, *b_args,
                    M, C, R, *hr.stride(), *hp_strides,
                    N=n, N_PAD=_pow2(n), R_PAD=_pow2(R, 16), HC=per_stream, HAS_GM=grad_m is not None,
                    HAS_GA=grad_hs is not None, POST=post is not None, PRECISION="tf32" if tf32 else "ieee")
    return (grad_h, G, dH, *grads_b)


@torch.library.custom_op("hcgpt::pre_mix", mutates_args=())
def pre_mix(h: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor, gate_scale: torch.Tensor,
            gate_bias: torch.Tensor, per_stream: bool, tf32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a): h (..., n, C) -> m (..., R) [(..., n, R) per stream], rstd (...) [(..., n)], x_in (..., C)."""
    return _pre_mix_fwd(h, weight, gain, gate_scale, gate_bias, per_stream, tf32)[1:]


@pre_mix.register_fake
def _(h, weight, gain, gate_scale, gate_bias, per_stream, tf32):
    return _pre_outputs(h, weight.shape[1], per_stream)


@torch.library.custom_op("hcgpt::pre_mix_backward", mutates_args=())
def pre_mix_backward(h: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor, gate_scale: torch.Tensor,
                     gate_bias: torch.Tensor, m: torch.Tensor, rstd: torch.Tensor, grad_m: Optional[torch.Tensor],
                     grad_x: torch.Tensor, grad_h_post: Optional[torch.Tensor], per_stream: bool, tf32: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad h (+ grad_h_post, h's gradient from (b), when given), G = Σ_tokens x ⊗ grad_u (K, R) fp32,
    dL/dH_pre (..., n) fp32."""
    return _pre_mix_bwd(h, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_h_post, per_stream,
                        tf32)


@pre_mix_backward.register_fake
def _(h, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_h_post, per_stream, tf32):
    return _empty(h), _empty(weight, torch.float32), h.new_empty(h.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hcgpt::post_pre_mix", mutates_args=())
def post_pre_mix(h: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor, weight: torch.Tensor,
                 gain: torch.Tensor, gate_scale: torch.Tensor, gate_bias: torch.Tensor, per_stream: bool, tf32: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b) of one connection and (a) of the next in one kernel: h (..., n, C), y (..., C), H_res (..., n, n),
    H_post (..., n) -> h_new = H_res h + H_post y (h's dtype), and pre_mix(h_new): m, rstd, x_in."""
    return _pre_mix_fwd(h, weight, gain, gate_scale, gate_bias, per_stream, tf32, (y, H_res, H_post))


@post_pre_mix.register_fake
def _(h, y, H_res, H_post, weight, gain, gate_scale, gate_bias, per_stream, tf32):
    return (_empty(h), *_pre_outputs(h, weight.shape[1], per_stream))


@torch.library.custom_op("hcgpt::post_pre_mix_backward", mutates_args=())
def post_pre_mix_backward(h: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor,
                          h_new: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor, gate_scale: torch.Tensor,
                          gate_bias: torch.Tensor, m: torch.Tensor, rstd: torch.Tensor, grad_m: Optional[torch.Tensor],
                          grad_x: torch.Tensor, grad_h_new: Optional[torch.Tensor], per_stream: bool, tf32: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """The backward of post_pre_mix, one kernel: h_new's gradient (from (a), plus grad_h_new from beyond it)
    is formed on chip and taken through (b) -> grad h, grad y, grad H_res, grad H_post, and pre_mix_backward's
    G, dL/dH_pre."""
    grad_h, G, dH, grad_y, grad_res, grad_post = _pre_mix_bwd(
        h_new, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_h_new, per_stream, tf32,
        (h, y, H_res, H_post))
    return grad_h, grad_y, grad_res.to(H_res.dtype), grad_post.to(H_post.dtype), G, dH


@post_pre_mix_backward.register_fake
def _(h, y, H_res, H_post, h_new, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_h_new,
      per_stream, tf32):
    return (_empty(h), _empty(y), _empty(H_res), _empty(H_post), _empty(weight, torch.float32),
            h.new_empty(h.shape[:-1], dtype=torch.float32))


def _post_pre_mix_setup(ctx, inputs, output):
    h, y, H_res, H_post, weight, gain, gate_scale, gate_bias, per_stream, tf32 = inputs
    h_new, m, rstd, _ = output
    ctx.save_for_backward(h, y, H_res, H_post, h_new, weight, gain, gate_scale, gate_bias, m, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.per_stream, ctx.tf32 = per_stream, tf32


def _post_pre_mix_grad(ctx, grad_h_new, grad_m, grad_rstd, grad_x, grad_link=None):
    """grad_link: the next (b)'s gradient of h_new (see _PostPreMix), added on chip like grad_h_new."""
    h, y, H_res, H_post, h_new, weight, gain, gate_scale, gate_bias, m, rstd = ctx.saved_tensors
    if grad_x is None:
        grad_x = y.new_zeros(y.shape, dtype=h.dtype)
    if grad_h_new is not None:   # the new streams used outside the chain too (not in the model)
        grad_link = grad_h_new if grad_link is None else grad_h_new + grad_link
    grad_h, grad_y, grad_res, grad_post, G, dH = post_pre_mix_backward(
        h, y, H_res, H_post, h_new, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_link,
        ctx.per_stream, ctx.tf32)
    return (grad_h, grad_y, grad_res, grad_post,
            *_projection_grads(weight, gain, gate_scale, gate_bias, m, G, dH, ctx.per_stream), None, None)


post_pre_mix.register_autograd(_post_pre_mix_grad, setup_context=_post_pre_mix_setup)


def _pre_mix_setup(ctx, inputs, output):
    h, weight, gain, gate_scale, gate_bias, per_stream, tf32 = inputs
    m, rstd, _ = output
    ctx.save_for_backward(h, weight, gain, gate_scale, gate_bias, m, rstd)
    ctx.mark_non_differentiable(rstd)   # an output for the backward only: no gradient flows through it
    ctx.per_stream, ctx.tf32 = per_stream, tf32


def _pre_mix_grad(ctx, grad_m, grad_rstd, grad_x, grad_h_post=None):
    h, weight, gain, gate_scale, gate_bias, m, rstd = ctx.saved_tensors
    if grad_x is None:
        grad_x = h.new_zeros((*h.shape[:-2], h.shape[-1]))
    grad_h, G, dH = pre_mix_backward(h, weight, gain, gate_scale, gate_bias, m, rstd, grad_m, grad_x, grad_h_post,
                                     ctx.per_stream, ctx.tf32)
    return (grad_h, *_projection_grads(weight, gain, gate_scale, gate_bias, m, G, dH, ctx.per_stream), None, None)


def _projection_grads(weight, gain, gate_scale, gate_bias, m, G, dH, per_stream):
    """The gradients of (a)'s parameters from the kernel's G = Σ_tokens x ⊗ grad_u and dL/dH_pre."""
    n = dH.shape[-1]
    # m = rstd (x γ) W: dW = γ G, dγ = Σ_r W G
    gf = gain.float()
    grad_weight = (gf[:, None] * G).to(weight.dtype)
    grad_gain = (weight.float() * G).sum(1).to(gain.dtype)
    # the H_pre gate, recomputed from m (the same formula as in the kernel and in conn.gates)
    if per_stream:   # H_pre = s tanh(p) + A_m with p = m[..., 0]
        t = torch.tanh(m[..., 0])
        grad_scale, grad_bias = (dH * t).sum(), dH.reshape(-1, n).sum(0)
    else:                # H_pre = σ(α m[:n] + b)
        s = torch.sigmoid(gate_scale.float() * m[..., :n] + gate_bias.float())
        dz = dH * s * (1 - s)
        grad_scale, grad_bias = (dz * m[..., :n]).sum(), dz.reshape(-1, n).sum(0)
    return grad_weight, grad_gain, grad_scale.to(gate_scale.dtype), grad_bias.to(gate_bias.dtype)


pre_mix.register_autograd(_pre_mix_grad, setup_context=_pre_mix_setup)


def _post_blocks(C, interpret):
    """(BLOCK_M, BLOCK_C) for (b): up to 256 channels, then as many tokens as fit in TILE."""
    if interpret:
        return POST_CPU
    BLOCK_C = min(256, _pow2(C, 16))
    return max(1, TILE // BLOCK_C), BLOCK_C


@torch.library.custom_op("hcgpt::post_mix", mutates_args=())
def post_mix(h: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor, H_post: torch.Tensor) -> torch.Tensor:
    """(b): h (..., n, C), y (..., C), H_res (..., n, n), H_post (..., n) -> H_res h + H_post y in h.dtype."""
    *lead, n, C = h.shape
    hr = _rows(h, n, C)
    M = hr.shape[0]
    out = _empty(h)
    if M > 0:
        BLOCK_M, BLOCK_C = _post_blocks(C, h.device.type == "cpu" or _interpreting())
        _launch(_post_mix_fwd_kernel, (triton.cdiv(M, BLOCK_M),), h.device,
                hr, y.contiguous(), H_res.contiguous(), H_post.contiguous(), out, M, C, *hr.stride(),
                N=n, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return out


@post_mix.register_fake
def _(h, y, H_res, H_post):
    return _empty(h)


@torch.library.custom_op("hcgpt::post_mix_backward", mutates_args=())
def post_mix_backward(grad_out: torch.Tensor, h: torch.Tensor, y: torch.Tensor, H_res: torch.Tensor,
                      H_post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    *lead, n, C = h.shape
    hr = _rows(h, n, C)
    M = hr.shape[0]
    grad_h, grad_y = _empty(h), _empty(y)
    grad_res, grad_post = _empty(H_res, torch.float32), _empty(H_post, torch.float32)
    if M > 0:
        BLOCK_M, BLOCK_C = _post_blocks(C, h.device.type == "cpu" or _interpreting())
        _launch(_post_mix_bwd_kernel, (triton.cdiv(M, BLOCK_M),), h.device,
                grad_out.contiguous(), hr, y.contiguous(), H_res.contiguous(), H_post.contiguous(),
                grad_h, grad_y, grad_res, grad_post, M, C, *hr.stride(),
                N=n, NN_PAD=_pow2(n * n), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return grad_h, grad_y, grad_res.to(H_res.dtype), grad_post.to(H_post.dtype)


@post_mix_backward.register_fake
def _(grad_out, h, y, H_res, H_post):
    return _empty(h), _empty(y), _empty(H_res), _empty(H_post)


def _post_mix_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_mix_grad(ctx, grad_out):
    return post_mix_backward(grad_out, *ctx.saved_tensors)


post_mix.register_autograd(_post_mix_grad, setup_context=_post_mix_setup)


def _sinkhorn_block(n):
    return max(1, 1024 // (_pow2(n) ** 2))


@torch.library.custom_op("hcgpt::sinkhorn", mutates_args=())
def sinkhorn_op(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(c): doubly stochastic (..., n, n) from fp32 logits; the iteration of hc.SinkhornLog."""
    n = logits.shape[-1]
    z = _rows(logits, n, n).contiguous()
    out = _empty(logits)
    if z.shape[0] > 0:
        B = _sinkhorn_block(n)
        _launch(_sinkhorn_fwd_kernel, (triton.cdiv(z.shape[0], B),), z.device, z, out, z.shape[0], iters,
                N=n, N_PAD=_pow2(n), BLOCK_M=B)
    return out


@sinkhorn_op.register_fake
def _(logits, iters):
    return _empty(logits)


@torch.library.custom_op("hcgpt::sinkhorn_backward", mutates_args=())
def sinkhorn_backward(logits: torch.Tensor, grad_out: torch.Tensor, iters: int) -> torch.Tensor:
    n = logits.shape[-1]
    z = _rows(logits, n, n).contiguous()
    grad = _empty(logits)
    M = z.shape[0]
    if M > 0:
        B = _sinkhorn_block(n)
        lse = torch.empty((triton.cdiv(M, B) * B, 2 * iters, _pow2(n)), dtype=torch.float32, device=z.device)
        _launch(_sinkhorn_bwd_kernel, (triton.cdiv(M, B),), z.device, z, grad_out.contiguous(), grad, lse, M, iters,
                N=n, N_PAD=_pow2(n), BLOCK_M=B)
    return grad


@sinkhorn_backward.register_fake
def _(logits, grad_out, iters):
    return _empty(logits)


def _sinkhorn_setup(ctx, inputs, output):
    logits, iters = inputs
    ctx.save_for_backward(logits)   # the iterates are recomputed
    ctx.iters = iters


def _sinkhorn_grad(ctx, grad_out):
    (logits,) = ctx.saved_tensors
    return sinkhorn_backward(logits, grad_out, ctx.iters), None


sinkhorn_op.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


# ----------------------------------------------------------------------------------------
# what hc.py calls

def projection_columns(conn):
    """Columns of the coefficient projection: n + 2 per stream (HC), r + 2n per token (mHC family)."""
    return conn.n + 2 if hasattr(conn, "W_m") else conn.r + 2 * conn.n


def unsupported(conn, h):
    """Why the fused kernels cannot run ``conn`` on streams ``h``, or None when they can."""
    if TRITON_ERROR is not None:
        return f"Triton is not importable ({TRITON_ERROR})"
    if not (hasattr(conn, "W_m") or hasattr(conn, "phi")):
        return f"there is no fused kernel for {type(conn).__name__}"
    if conn.identity_res:
        return "identity_res=True (the kernels mix the streams by a learned H_res; the Identity-HC ablation runs the " \
               "torch path)"
    if getattr(conn, "coeff_norm", "flat") != "flat":
        return f"coeff_norm={conn.coeff_norm!r} (the kernels norm the token's n C values together: 'flat')"
    reason = _device_unsupported(h)
    if reason:
        return reason
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"streams of dtype {h.dtype} (fused: float32, bfloat16, float16)"
    if conn.n > MAX_STREAMS:
        return f"n_streams={conn.n} > {MAX_STREAMS}"
    cols = projection_columns(conn)
    if _pow2(cols) > MAX_COLUMNS:
        return (f"{type(conn).__name__} at n_streams={conn.n} projects to {cols} coefficients per token, "
                f"more than the kernel holds on chip ({MAX_COLUMNS})")
    return None


def sinkhorn_unsupported(logits):
    if TRITON_ERROR is not None:
        return f"Triton is not importable ({TRITON_ERROR})"
    reason = _device_unsupported(logits)
    if reason:
        return reason
    if logits.dtype != torch.float32:
        return f"Sinkhorn logits of dtype {logits.dtype} (fused: float32)"
    if logits.shape[-1] > MAX_STREAMS:
        return f"n_streams={logits.shape[-1]} > {MAX_STREAMS}"
    return None


def _device_unsupported(t):
    if t.device.type == "cpu" and _interpreting() and not INTERPRETER_READY:
        return "TRITON_INTERPRET=1 was set after Triton was imported; set it before the first import"
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return None
    if t.device.type == "cpu":
        return "tensors are on the CPU: the kernels need CUDA, or TRITON_INTERPRET=1 for Triton's interpreter"
    return f"tensors on {t.device.type} (fused: cuda)"


_WARNED = set()   # what was said once: (op, reason) of use_fused, kind keys of verified and hc_verify


def use_fused(t, conn, mode):
    """Whether the fused path runs, following a connection's fused = mode; conn None asks about Sinkhorn."""
    if mode not in ("auto", "on"):
        raise ValueError(f"fused must be 'auto', 'on' or 'off', got {mode!r}")
    reason = sinkhorn_unsupported(t) if conn is None else unsupported(conn, t)
    if reason is None:
        return True
    what = "Sinkhorn" if conn is None else type(conn).__name__
    if mode == "on":
        raise FusedCheckError(f"fused='on' but the fused {what} kernels cannot run: {reason}. "
                           f"Set fused='auto' or 'off' for the torch reference path.")
    if (what, reason) not in _WARNED:  # 'auto': the torch path, said once
        _WARNED.add((what, reason))
        warnings.warn(f"hc: the torch reference path runs {what}: {reason}", stacklevel=3)
    return False


# ----------------------------------------------------------------------------------------
# verdicts: what hc_verify.verify_fused found on this process's device

VERDICTS = {}   # kind_key -> (ok, reason), written by hc_verify.verify_fused; read by hc.py's dispatch


def kind_key(conn, h):
    """What the kernels specialise on: the connection's kind, n, C, projection width, stream dtype."""
    extra = (conn.sinkhorn_iters,) if hasattr(conn, "sinkhorn_iters") else ()   # mHC: the Sinkhorn it runs
    return (type(conn).__name__, conn.n, conn.dim, projection_columns(conn), str(h.dtype), *extra)


def kind_name(k):
    if k[0] == "Sinkhorn":
        return f"Sinkhorn n={k[1]}"
    return f"{k[0]} n={k[1]} C={k[2]} ({k[3]} coefficients, {k[4].replace('torch.', '')} streams)"


def verified(t, conn):
    """Whether fused = 'auto' may run the kernels for conn on t (conn None: Sinkhorn logits t): only
    where hc_verify.verify_fused checked them on this device and they passed."""
    k = ("Sinkhorn", t.shape[-1]) if conn is None else kind_key(conn, t)
    verdict = VERDICTS.get(k)
    if verdict is None:
        if k not in _WARNED:
            _WARNED.add(k)
            warnings.warn(f"hc: the fused kernels for {kind_name(k)} were not verified on this device, so the torch "
                          f"path runs them; call hc_verify.verify_fused(model) once before training (train.py and "
                          f"scripts/bench.py do)", stacklevel=4)
        return False
    return verdict[0]


@torch.compiler.assume_constant_result   # read once when torch.compile traces: dynamo cannot call the getter
def tf32_enabled():
    """Whether fp32 matmuls on CUDA may use TF32. torch >= 2.9 resolves both of its APIs in
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" also after ``allow_tf32 = True`` or
    ``torch.backends.fp32_precision = "tf32"``), while reading the legacy ``allow_tf32`` raises
    once the new API was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


class _PreMix(torch.autograd.Function):
    """(a) for a connection. Its third output ``link`` is h - stopgrad(h): zero, with the identity as
    its Jacobian, so (b) reads h as stopgrad(h) + link and its h-gradient arrives here as link's
    gradient, where (a)'s backward kernel adds it while it writes h's gradient: one pass, no sum of
    the two in autograd."""

    @staticmethod
    def forward(ctx, h, weight, gain, gate_scale, gate_bias, per_stream, tf32):
        m, rstd, x_in = pre_mix(h, weight, gain, gate_scale, gate_bias, per_stream, tf32)
        ctx.save_for_backward(h, weight, gain, gate_scale, gate_bias, m, rstd)
        ctx.per_stream, ctx.tf32 = per_stream, tf32
        return m, x_in, h.new_zeros(()).expand(h.shape)

    @staticmethod
    def backward(ctx, grad_m, grad_x, grad_link):
        return _pre_mix_grad(ctx, grad_m, None, grad_x, grad_link)


class _PostMix(torch.autograd.Function):
    """(b) on h = stopgrad(h) + link: its h-gradient goes to ``link`` (see _PreMix)."""

    @staticmethod
    def forward(ctx, h, link, y, H_res, H_post):
        ctx.save_for_backward(h, y, H_res, H_post)
        return post_mix(h, y, H_res, H_post)

    @staticmethod
    def backward(ctx, grad_out):
        return None, *post_mix_backward(grad_out, *ctx.saved_tensors)


class _PostPreMix(torch.autograd.Function):
    """(b) of one connection and (a) of the next, one kernel each way. h is read as stopgrad(h) + link
    (its gradient goes to the previous (a), as in _PostMix); the new streams' own ``link`` takes the next
    (b)'s h-gradient, which this backward kernel adds to (a)'s share on chip before going through (b)."""

    @staticmethod
    def forward(ctx, h, link, y, H_res, H_post, weight, gain, gate_scale, gate_bias, per_stream, tf32):
        h_new, m, rstd, x_in = post_pre_mix(h, y, H_res, H_post, weight, gain, gate_scale, gate_bias, per_stream, tf32)
        ctx.save_for_backward(h, y, H_res, H_post, h_new, weight, gain, gate_scale, gate_bias, m, rstd)
        ctx.per_stream, ctx.tf32 = per_stream, tf32
        ctx.set_materialize_grads(False)   # no pass of zeros for a gradient that is absent
        return h_new, m, x_in, h_new.new_zeros(()).expand(h_new.shape)

    @staticmethod
    def backward(ctx, grad_h_new, grad_m, grad_x, grad_link):
        return None, *_post_pre_mix_grad(ctx, grad_h_new, grad_m, None, grad_x, grad_link)


def _projection(conn):
    """(a)'s weight, gain, gate scale, gate bias and per_stream flag for ``conn``."""
    if hasattr(conn, "W_m"):   # HC: per-stream norm, W = [W_m | W_r | W_β]
        return torch.cat([conn.W_m, conn.W_r, conn.W_beta], dim=1), conn.norm_gain, conn.s_alpha, conn.A_m, True
    return conn.phi, conn.gamma, conn.alpha_pre, conn.b_pre, False   # mHC family: one norm over the n C values


def _gates(conn, m):
    """H_post, H_res from (a)'s projection m, as conn.coefficients forms them."""
    if hasattr(conn, "W_m"):
        _, H_post, H_res = conn.gates(*m.split([1, conn.n, 1], dim=-1))
    else:
        _, H_post, H_res = conn.gates(m)
    return H_post.contiguous(), H_res.contiguous()


def chain_forward(conns, h, branches):
    """conns[-1](... conns[0](h, branches[0]) ..., branches[-1]), the equations of hc.Connection.forward,
    through (a) of the first connection, one kernel per boundary ((b) of one connection with (a) of the
    next: post_pre_mix) and (b) of the last."""
    tf32 = tf32_enabled()   # as the torch path's matmul would on CUDA (the interpreter reads it too)
    with torch.autocast(h.device.type, enabled=False):
        m, x_in, link = _PreMix.apply(h, *_projection(conns[0]), tf32)
        H_post, H_res = _gates(conns[0], m)
    for branch, nxt in zip(branches, [*conns[1:], None]):
        y = branch(x_in)
        if nxt is None:
            return _PostMix.apply(h, link, y, H_res, H_post)
        with torch.autocast(h.device.type, enabled=False):
            h, m, x_in, link = _PostPreMix.apply(h, link, y, H_res, H_post, *_projection(nxt), tf32)
            H_post, H_res = _gates(nxt, m)


def connection_forward(conn, h, branch):
    """conn(h, branch) through (a) and (b): the equations of hc.Connection.forward."""
    return chain_forward([conn], h, [branch])


def sinkhorn(logits, iters):
    """(c) on (..., n, n) fp32 logits."""
    return sinkhorn_op(logits, int(iters))
