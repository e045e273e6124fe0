"""The GPU path on CPU: the fused kernels' safety net (hc_verify.py), recomputation of activations,
the training step without a per-step host sync, and scripts/gpu_check.py --interpret.

The kernels run in Triton's interpreter here (TRITON_INTERPRET=1, set before Triton's first
import), at small shapes; the CUDA cases run only where a GPU is present.
"""

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hc  # noqa: E402
import hc_verify  # noqa: E402

C, N, TOKENS = 40, 4, 24   # two channel tiles of 32 in the interpreter; 24 tokens: two programs of 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.fixture
def kernels(monkeypatch):
    """The fused path on CPU in Triton's interpreter, with 'auto' allowed there; fresh verdicts."""
    pytest.importorskip("triton")
    import hc_kernels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(hc, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(hc_verify, "VERDICTS", {})
    monkeypatch.setattr(hc_verify, "_WARNED", set())
    return hc_kernels


def count_fused_calls(monkeypatch, hc_kernels):
    calls = []
    real = hc_kernels.connection_forward
    monkeypatch.setattr(hc_kernels, "connection_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def run_conn(conn):
    branch = nn.Linear(C, C)
    return conn(torch.randn(2, 3, N, C), branch)


# ---------------------------------------------------------------------------------------
# the safety net

@pytest.mark.parametrize("mode", ["on", "auto"])
def test_correct_kernels_pass_and_auto_then_uses_them(mode, kernels, monkeypatch):
    monkeypatch.setattr(hc, "FUSED", mode)
    conns = [hc.make_connection("mhc", C, N, i, sinkhorn_iters=5) for i in range(3)]   # one kind: checked once
    report = hc.verify_fused(conns, tokens=TOKENS)
    assert report["path"] == "fused", report
    assert len(report["checks"]) == 1 and report["checks"][0]["ok"]
    assert report["checks"][0]["kind"] == "MHC n=4 C=40 (24 coefficients, float32 streams)"
    # a real comparison happened: the fused path differs from fp64 by roundoff, not by nothing
    assert 0 < report["checks"][0]["max_err_fused"] < 1e-4
    assert hc_verify.VERDICTS[("Sinkhorn", N)][0]   # mHC's Sinkhorn ran fused inside the check
    calls = count_fused_calls(monkeypatch, kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no "not verified" warning
        run_conn(conns[0])
    assert calls == [1]


def test_every_scheme_passes_with_bf16_streams_and_autocast(kernels, monkeypatch):
    """The tolerance is judged against fp64: bf16 roundoff in both paths must not fail a right kernel."""
    monkeypatch.setattr(hc, "FUSED", "on")
    conns = [hc.make_connection(s, C, N, 1, sinkhorn_iters=5) for s in ("hc", "mhc", "mhc_lite", "kromhc")]
    report = hc.verify_fused(conns, tokens=TOKENS, stream_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16)
    assert report["path"] == "fused" and len(report["checks"]) == 4, report
    assert all(c["max_err_torch"] > 1e-4 for c in report["checks"])   # bf16 roundoff was present


def off_by(factor, op):
    """A kernel op whose first output is off by ``factor``: a wrong result, not a crash."""
    def broken(*args):
        out = op(*args)
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
    return broken


def test_wrong_forward_auto_falls_back_and_on_raises(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "post_mix", off_by(1.01, kernels.post_mix))   # 1 % off: above any roundoff
    conn = hc.make_connection("kromhc", C, N, 0)
    monkeypatch.setattr(hc, "FUSED", "auto")
    with pytest.warns(UserWarning, match="failed their check for KromHC n=4 C=40.*out: error"):
        report = hc.verify_fused([conn], tokens=TOKENS)
    assert report["path"] == "torch" and "mismatch against fp64" in report["reason"]
    assert not report["checks"][0]["ok"]
    calls = count_fused_calls(monkeypatch, kernels)
    out = run_conn(conn)                      # the torch path, silently now: warned once above
    assert calls == [] and out.shape == (2, 3, N, C)
    monkeypatch.setattr(hc, "FUSED", "on")
    with pytest.raises(hc_verify.FusedCheckError, match="KromHC.*Set fused='auto'"):
        hc.verify_fused([conn], tokens=TOKENS)


def test_wrong_gradient_is_named(kernels, monkeypatch):
    """Only the projection's gradient is wrong: the forward and the stream gradient agree."""
    real = kernels.pre_mix_backward

    def broken(*args):
        grad_h, G, dH = real(*args)
        return grad_h, G * 1.05, dH
    monkeypatch.setattr(kernels, "pre_mix_backward", broken)
    monkeypatch.setattr(hc, "FUSED", "auto")
    with pytest.warns(UserWarning):
        report = hc.verify_fused([hc.make_connection("mhc_lite", C, N, 0)], tokens=TOKENS)
    reason = report["checks"][0]["reason"]
    assert "grad phi" in reason and "grad gamma" in reason
    assert "out:" not in reason and "grad h:" not in reason


def test_raising_kernel_auto_falls_back_with_the_reason(kernels, monkeypatch):
    def boom(*args):
        raise RuntimeError("out of resources: shared memory")
    monkeypatch.setattr(kernels, "pre_mix", boom)
    monkeypatch.setattr(hc, "FUSED", "auto")
    with pytest.warns(UserWarning, match="raised RuntimeError: out of resources"):
        report = hc.verify_fused([hc.make_connection("hc", C, N, 0)], tokens=TOKENS)
    assert report["path"] == "torch" and "out of resources" in report["reason"]
    monkeypatch.setattr(hc, "FUSED", "on")
    with pytest.raises(hc_verify.FusedCheckError, match="out of resources"):
        hc.verify_fused([hc.make_connection("hc", C, N, 0)], tokens=TOKENS)


def test_unverified_kind_runs_the_torch_path_under_auto(kernels, monkeypatch):
    monkeypatch.setattr(hc, "FUSED", "auto")
    calls = count_fused_calls(monkeypatch, kernels)
    with pytest.warns(UserWarning, match="not verified on this device"):
        run_conn(hc.make_connection("kromhc", C, N, 0))
    assert calls == []
    monkeypatch.setattr(hc, "FUSED", "on")     # 'on' runs them unchecked: the user asked for them
    run_conn(hc.make_connection("kromhc", C, N, 0))
    assert calls == [1]


def test_all_ranks_agree(kernels, monkeypatch):
    """A rank whose own check passed still takes the torch path when another rank's failed."""
    import torch.distributed as dist
    reduced = []

    def all_reduce(t, op=None):   # what the other rank contributes: a failed check
        reduced.append(op)
        t.fill_(0.0)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(hc, "FUSED", "auto")
    with pytest.warns(UserWarning, match="another rank"):
        report = hc.verify_fused([hc.make_connection("kromhc", C, N, 0)], tokens=TOKENS)
    assert reduced == [dist.ReduceOp.MIN]
    assert report["path"] == "torch" and report["checks"][0]["reason"] == "the check failed on another rank"


def test_nothing_to_check():
    assert hc.verify_fused([hc.make_connection("plain", C, 1, 0)])["path"] == "-"
    saved = hc.FUSED
    try:
        hc.FUSED = "off"
        assert hc.verify_fused([hc.make_connection("mhc", C, N, 0)]) == {"path": "torch", "reason": "fused='off'",
                                                                          "checks": []}
        hc.FUSED = "auto"   # auto on a CPU: the torch path, nothing to check
        r = hc.verify_fused([hc.make_connection("mhc", C, N, 0)])
        assert r["path"] == "torch" and "CUDA only" in r["reason"]
    finally:
        hc.FUSED = saved


@cuda_only
@pytest.mark.parametrize("scheme", ["hc", "mhc", "mhc_lite", "kromhc"])
def test_cuda_verify_gpt2_small_shapes(scheme, monkeypatch):
    monkeypatch.setattr(hc, "FUSED", "on")
    monkeypatch.setattr(hc_verify, "VERDICTS", {})
    torch.backends.cuda.matmul.allow_tf32 = True
    conn = hc.make_connection(scheme, 768, 4, 0).cuda()
    for stream_dtype in (torch.float32, torch.bfloat16):
        report = hc.verify_fused([conn], tokens=4096, stream_dtype=stream_dtype, autocast_dtype=torch.bfloat16)
        assert report["path"] == "fused", report
