"""The fused path's safety net: check the Triton kernels against the torch path on this device.

The kernels of hc_kernels.py are tested in Triton's interpreter and compiled offline, but a
user's GPU is where they first run for real. So before a run uses them (and before
torch.compile traces the model or CUDA graphs capture it), ``verify_fused(model)`` runs one
connection of every distinct kind (scheme, n, C, projection width, stream dtype), alone and two
in a chain (the joined boundary kernel of a block), both ways on a real-sized input, thousands of tokens with random non-trivial parameters, and compares the
output and every gradient (the streams', each parameter's, the stand-in branch's) with an fp64
run of the torch equations:

    err(path) = max |path - fp64| / max |fp64|          per tensor
    pass      : err(fused) <= FACTOR x err(torch) + floor, and everything finite

(floor: 2^-5 where bf16 is involved, the scalar gates' gradients being sums with heavy
cancellation in both paths; 1e-3 in fp32, which covers TF32 matmuls). Under DDP every rank
checks its own GPU and the verdicts are all-reduced: the kernels run only if every rank passed.

fused = "auto": a failed or raising check warns once, naming the reason, and that kind of
connection runs on the torch path; a kind never checked also runs on the torch path (the
dispatch in hc._kernels asks ``verified``). "on": a failed check raises FusedCheckError; the
dispatch runs the kernels whether checked or not. "off": nothing is checked.
"""

import contextlib
import copy
import math
import warnings

import torch
import torch.nn as nn

import hc
from errors import FusedCheckError

FACTOR = 4.0
FLOOR_FP32, FLOOR_BF16 = 1e-3, 2.0 ** -5


# ----------------------------------------------------------------------------------------
# before anything is built: the one-line refusals train.py and scripts/bench.py share

def setup_error(sc, dim, device_type, stream_dtype=torch.float32):
    """Why fused='on' cannot run the connections of SchemeConfig sc (a model's GPTConfig) of width dim on
    device_type, as one line naming the setting to change, or None."""
    conn = hc.connection(sc, dim, 0)
    if conn.fused != "on" or isinstance(conn, hc.Plain):
        return None
    import hc_kernels
    probe = torch.empty(1, 1, sc.n_streams, dim, device=device_type, dtype=stream_dtype)
    why = hc_kernels.unsupported(conn, probe)
    return None if why is None else (
        f"config key 'fused' is 'on' but the fused kernels cannot run {sc.scheme} at n_streams={sc.n_streams} "
        f"here: {why}; use fused='auto' (the kernels where they pass their check, else the torch path) or 'off'")


# ----------------------------------------------------------------------------------------
# one check

def perturb(conn, seed=0):
    """A copy of conn with random non-trivial parameters: gates open, logits of std ~ 2, off-identity
    H_res, so that no check passes just because the connection is at its init."""
    conn = copy.deepcopy(conn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in conn.named_parameters():
            r = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            if p.dim() == 0:                                        # gates s_α, s_β, α_pre, α_post, α_res
                p.fill_(0.5 + torch.rand((), generator=g).item())
            elif name in ("phi", "W_m", "W_r", "W_beta"):          # projections: logits of std ~ 2
                p.copy_(r * 2.0 / math.sqrt(p.shape[0]))
            elif name in ("gamma", "norm_gain"):
                p.copy_(1.0 + 0.5 * r)
            else:                                                   # static coefficients and biases
                p.add_(r)
    return conn


class _Branch(nn.Module):
    """A stand-in sublayer (pre-norm + linear), as attention or the MLP sits in a block."""

    def __init__(self, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ln, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(dim, dim, generator=g) / math.sqrt(dim))
            self.fc.bias.copy_(0.1 * torch.randn(dim, generator=g))

    def forward(self, x):
        return self.fc(self.ln(x.to(self.fc.weight.dtype)))


def _run(conns, branches, h, w, mode, autocast_dtype, prefix=""):
    """Output of h through the connections (hc.run_connections: one connection, or a chain whose
    fused path joins each boundary in one kernel) and the gradients of <out, w> w.r.t. h and every
    parameter (the connections' and the branches'), with every connection's fused = mode."""
    saved = [c.fused for c in conns]
    for c in conns:
        c.fused = mode
    try:
        for m in (*conns, *branches):
            m.zero_grad(set_to_none=True)
        h = h.detach().clone().requires_grad_()
        autocast = (torch.autocast(h.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.enable_grad(), autocast:
            out = hc.run_connections(conns, branches, h)
            (out.double() * w).sum().backward()
    finally:
        for c, f in zip(conns, saved):
            c.fused = f
    result = {f"{prefix}out": out.detach(), f"{prefix}grad h": h.grad}
    for i, (conn, branch) in enumerate(zip(conns, branches)):
        at = f"{i}." if len(conns) > 1 else ""
        result.update({f"{prefix}grad {at}{k}": p.grad for k, p in conn.named_parameters()})
        result.update({f"{prefix}grad {at}branch.{k}": p.grad for k, p in branch.named_parameters()})  # via y's gradient
    return result


def rel_err(a, ref):
    if a is None or ref is None:
        return 0.0 if a is None and ref is None else math.inf
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_connection(conn, tokens=4096, stream_dtype=torch.float32, autocast_dtype=None, seed=0):
    """Run perturbed copies of conn fused, on the torch path and in fp64 on ``tokens`` random tokens:
    one connection alone, and two in a chain (a block's attention and MLP: the joined boundary kernel).
    Returns {"ok", "reason", "errors": {tensor: (fused err, torch err)}}; never raises for the kernels."""
    device = next(conn.parameters()).device
    g = torch.Generator().manual_seed(seed + 2)
    B = 4 if tokens % 4 == 0 else 1
    shape = (B, tokens // B, conn.n, conn.dim)
    h = torch.randn(shape, generator=g).to(device, stream_dtype)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    bf16 = torch.bfloat16 in (stream_dtype, autocast_dtype)
    floor = FLOOR_BF16 if bf16 else FLOOR_FP32
    errors, bad = {}, []
    for prefix, k in (("", 1), ("chain: ", 2)):
        conns = [perturb(conn, seed + 10 * i) for i in range(k)]
        branches = [_Branch(conn.dim, seed + 10 * i + 1).to(device) for i in range(k)]
        try:
            fused = _run(conns, branches, h, w, "on", autocast_dtype, prefix)
        except Exception as e:   # a launch or compile error on this device: report it, do not crash the run
            return {"ok": False, "reason": f"the fused kernels raised {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:300]}", "errors": errors}
        ref_path = _run(conns, branches, h, w, "off", autocast_dtype, prefix)
        ref64 = _run([copy.deepcopy(c).double() for c in conns], [copy.deepcopy(b).double() for b in branches],
                     h.double(), w, "off", None, prefix)
        for name, ref in ref64.items():
            ef, et = rel_err(fused[name], ref), rel_err(ref_path[name], ref)
            errors[name] = (ef, et)
            if not ef <= FACTOR * et + floor:      # also catches NaN
                bad.append(f"{name}: error {ef:.2e} vs the torch path's {et:.2e}")
    reason = None if not bad else "mismatch against fp64 (allowed: %g x the torch path's error + %g): %s" % (
        FACTOR, floor, "; ".join(bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return {"ok": not bad, "reason": reason, "errors": errors}


# ----------------------------------------------------------------------------------------
# every kind of connection of a model, all ranks agreeing

def verify_fused(model_or_connections, tokens=4096, stream_dtype=None, autocast_dtype=None, seed=0):
    """Check the fused kernels for every kind of connection of a model (or a list of connections)
    on their device, following their `fused`; record the verdicts that hc._kernels consults.

    stream_dtype: the residual streams' dtype (default: model.config.stream_dtype, else float32);
    autocast_dtype: the run's autocast dtype (None: no autocast). Under torch.distributed every
    rank must call it. Returns {"path": "fused" | "torch" | "mixed" | "-", "reason": str | None,
    "checks": [{"kind", "ok", "reason", "max_err_fused", "max_err_torch"}]}.
    Raises FusedCheckError when fused = "on" and a check fails.
    """
    conns = model_or_connections
    if hasattr(conns, "connections"):
        conns = conns.connections()
    elif isinstance(conns, hc.Connection):
        conns = [conns]
    conns = [c for c in conns if not isinstance(c, hc.Plain)]
    if stream_dtype is None:  # a GPT knows its streams' torch dtype (stream_dtype="bfloat16_hc" is bf16 or fp32 by n)
        stream_dtype = getattr(model_or_connections, "stream_dtype", torch.float32)
    if not conns:
        return {"path": "-", "reason": "no n-stream connections", "checks": []}
    device = next(conns[0].parameters()).device
    mode = conns[0].fused   # a model's connections share one (GPTConfig.fused)
    if mode == "off":
        return {"path": "torch", "reason": "fused='off'", "checks": []}
    if mode == "auto" and device.type not in hc.AUTO_DEVICES:
        return {"path": "torch", "reason": f"fused='auto' runs the kernels on CUDA only (device: {device.type})",
                "checks": []}
    import hc_kernels
    kinds, reasons = {}, []
    for c in conns:
        probe = torch.empty(1, 1, c.n, c.dim, device=device, dtype=stream_dtype)
        k = hc_kernels.kind_key(c, probe)
        if k in kinds:
            continue
        why = hc_kernels.unsupported(c, probe)
        if why is not None:             # the dispatch already keeps these on the torch path (or raises, 'on')
            hc_kernels.use_fused(probe, c, mode)
            reasons.append(f"{hc_kernels.kind_name(k)}: {why}")
            continue
        kinds[k] = c
    results = {k: check_connection(c, tokens, stream_dtype, autocast_dtype, seed) for k, c in kinds.items()}
    # every rank checked its own device; the kernels run only where all passed
    flags = torch.tensor([float(r["ok"]) for r in results.values()] or [1.0], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    checks = []
    for (k, r), flag in zip(results.items(), flags.tolist()):
        ok = flag > 0
        reason = r["reason"] if not r["ok"] else (None if ok else "the check failed on another rank")
        hc_kernels.VERDICTS[k] = (ok, reason)
        if isinstance(kinds[k], hc.MHC):    # its Sinkhorn ran fused inside the connection's check
            sk = ("Sinkhorn", k[1])
            hc_kernels.VERDICTS[sk] = (ok and hc_kernels.VERDICTS.get(sk, (True,))[0], reason)
        errs = list(r["errors"].values())
        checks.append({"kind": hc_kernels.kind_name(k), "ok": ok, "reason": reason,
                       "max_err_fused": max((e[0] for e in errs), default=None),
                       "max_err_torch": max((e[1] for e in errs), default=None)})
        if not ok:
            msg = f"the fused kernels failed their check for {hc_kernels.kind_name(k)} on {device}: {reason}"
            if mode == "on":
                raise FusedCheckError(msg + ". Set fused='auto' to fall back to the torch path, or 'off'.")
            if k not in hc_kernels._WARNED:
                hc_kernels._WARNED.add(k)
                warnings.warn(f"hc: {msg}; the torch path runs these connections instead", stacklevel=2)
            reasons.append(f"{hc_kernels.kind_name(k)}: {reason}")
    n_ok = sum(c["ok"] for c in checks)
    path = "fused" if n_ok == len(checks) > 0 and not reasons else "torch" if n_ok == 0 else "mixed"
    reason = f"verified on {device} ({', '.join(c['kind'] for c in checks)})" if path == "fused" else "; ".join(reasons)
    return {"path": path, "reason": reason, "checks": checks}
