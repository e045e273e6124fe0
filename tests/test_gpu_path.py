"""The GPU path on CPU: the fused kernels' safety net (hc_verify.py), recomputation of activations,
the training step without a per-step host sync, and scripts/gpu_check.py --interpret.

The kernels run in Triton's interpreter here (TRITON_INTERPRET=1, set before Triton's first
import), at small shapes; the CUDA cases run only where a GPU is present.
"""

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

import common  # noqa: E402
import hc  # noqa: E402
import hc_kernels  # noqa: E402
import hc_verify  # noqa: E402
import numerics  # noqa: E402
from errors import ConfigError, Diverged, FusedCheckError  # noqa: E402

C, N, TOKENS = 40, 4, 24   # two channel tiles of 32 in the interpreter; 24 tokens: two programs of 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.fixture
def kernels(monkeypatch):
    """The fused path on CPU in Triton's interpreter, with 'auto' allowed there; fresh verdicts."""
    pytest.importorskip("triton")
    import hc_kernels
    if not hc_kernels.INTERPRETER_READY:   # a CUDA machine imported Triton compiled; the CUDA cases cover it
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: the interpreter cases run on CPU-only machines")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(hc, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(hc_kernels, "VERDICTS", {})
    monkeypatch.setattr(hc_kernels, "_WARNED", set())
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

@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_correct_kernels_pass_and_auto_then_uses_them(mode, kernels, monkeypatch):
    # one kind: checked once
    conns = [hc.make_connection("mhc", C, N, i, sinkhorn_iters=5, fused=mode) for i in range(3)]
    report = hc_verify.verify_fused(conns, tokens=TOKENS)
    assert report["path"] == "fused", report
    assert len(report["checks"]) == 1 and report["checks"][0]["ok"]
    assert report["checks"][0]["kind"] == "MHC n=4 C=40 (24 coefficients, float32 streams)"
    # a real comparison happened: the fused path differs from fp64 by roundoff, not by nothing (the check's errors
    # are relative to each tensor's largest entry, as numerics'; one connection, and two in a chain, on 24 tokens)
    rel = numerics.connection_path("mhc", N, C, TOKENS, sinkhorn_iters=5, depth=2)
    assert 0 < report["checks"][0]["max_err_fused"] <= rel
    assert hc_kernels.VERDICTS[("Sinkhorn", N)][0]   # mHC's Sinkhorn ran fused inside the check
    calls = count_fused_calls(monkeypatch, kernels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no "not verified" warning
        run_conn(conns[0])
    assert calls == [1]


@pytest.mark.numerics
def test_auto_after_the_check_compiles_in_one_graph_with_the_kernels(kernels, monkeypatch):
    """train.py checks, then compiles: 'auto' with a verdict traces in one graph through the custom ops."""
    conn = hc.make_connection("mhc", C, N, 0, sinkhorn_iters=3, fused="auto")
    assert hc_verify.verify_fused([conn], tokens=TOKENS)["path"] == "fused"
    torch._dynamo.reset()
    graphs, branch = [], nn.Linear(C, C)

    def backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))   # with the autograd.Function bodies
        return gm.forward
    h = torch.randn(2, 5, N, C)
    out = torch.compile(lambda h: conn(h, branch), fullgraph=True, backend=backend)(h)
    assert len(graphs) == 1 and "hcgpt.pre_mix" in graphs[0] and "hcgpt.post_mix" in graphs[0]
    assert "hcgpt.sinkhorn" in graphs[0]
    hc.set_fused(conn, "off")
    # the compiled kernels against the torch path: the connection's forward in two fp32 orders
    rel = numerics.connection_path("mhc", N, C, 10, sinkhorn_iters=3, backward=False)
    numerics.assert_close(out, conn(h, branch), rel, "output")


@pytest.mark.numerics
def test_every_scheme_passes_with_bf16_streams_and_autocast(kernels, monkeypatch):
    """The tolerance is judged against fp64: bf16 roundoff in both paths must not fail a right kernel."""
    conns = [hc.make_connection(s, C, N, 1, sinkhorn_iters=5, fused="on") for s in ("hc", "mhc", "mhc_lite", "kromhc")]
    report = hc_verify.verify_fused(conns, tokens=TOKENS, stream_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16)
    assert report["path"] == "fused" and len(report["checks"]) == 4, report
    # bf16 roundoff was present: more error than fp32's rounding alone could give these connections
    for c, scheme in zip(report["checks"], ("hc", "mhc", "mhc_lite", "kromhc")):
        assert c["max_err_torch"] > numerics.connection_path(scheme, N, C, TOKENS, sinkhorn_iters=5, depth=2), c


def off_by(factor, op):
    """A kernel op whose first output is off by ``factor``: a wrong result, not a crash."""
    def broken(*args):
        out = op(*args)
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
    return broken


def test_wrong_joined_boundary_kernel_is_caught(kernels, monkeypatch):
    """A block's attention and MLP connections run through one joined kernel (post_pre_mix): the check
    runs a two-connection chain too, so a wrong joined kernel fails it even where single connections pass."""
    monkeypatch.setattr(kernels, "post_pre_mix", off_by(1.01, kernels.post_pre_mix))
    with pytest.raises(FusedCheckError, match="chain: out: error"):
        hc_verify.verify_fused([hc.make_connection("mhc_lite", C, N, 0, fused="on")], tokens=TOKENS)


def test_wrong_forward_auto_falls_back_and_on_raises(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "post_mix", off_by(1.01, kernels.post_mix))   # 1 % off: above any roundoff
    conn = hc.make_connection("kromhc", C, N, 0, fused="auto")
    with pytest.warns(UserWarning, match="failed their check for KromHC n=4 C=40.*out: error"):
        report = hc_verify.verify_fused([conn], tokens=TOKENS)
    assert report["path"] == "torch" and "mismatch against fp64" in report["reason"]
    assert not report["checks"][0]["ok"]
    calls = count_fused_calls(monkeypatch, kernels)
    out = run_conn(conn)                      # the torch path, silently now: warned once above
    assert calls == [] and out.shape == (2, 3, N, C)
    hc.set_fused(conn, "on")
    with pytest.raises(FusedCheckError, match="KromHC.*Set fused='auto'"):
        hc_verify.verify_fused([conn], tokens=TOKENS)


class WrongGrad(torch.autograd.Function):
    """Identity forward; the gradient 5 % too large in backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.05


def test_wrong_gradient_is_named(kernels, monkeypatch):
    """Only the streams' gradient is wrong (the forward and the parameters' gradients agree)."""
    real = kernels.connection_forward
    monkeypatch.setattr(kernels, "connection_forward", lambda conn, h, branch: WrongGrad.apply(real(conn, h, branch)))
    with pytest.warns(UserWarning):
        report = hc_verify.verify_fused([hc.make_connection("mhc_lite", C, N, 0, fused="auto")], tokens=TOKENS)
    reason = report["checks"][0]["reason"]
    assert "grad h: error" in reason and "grad phi" in reason     # everything upstream of the output
    assert "out:" not in reason
    monkeypatch.setattr(kernels, "connection_forward", lambda conn, h, branch: real(conn, WrongGrad.apply(h), branch))
    with pytest.warns(UserWarning):
        report = hc_verify.verify_fused([hc.make_connection("kromhc", C, N, 0, fused="auto")], tokens=TOKENS)
    reason = report["checks"][0]["reason"]
    assert "grad h: error" in reason and "grad phi" not in reason and "out:" not in reason


def test_raising_kernel_auto_falls_back_with_the_reason(kernels, monkeypatch):
    def boom(*args):
        raise RuntimeError("out of resources: shared memory")
    monkeypatch.setattr(kernels, "pre_mix", boom)
    with pytest.warns(UserWarning, match="raised RuntimeError: out of resources"):
        report = hc_verify.verify_fused([hc.make_connection("hc", C, N, 0, fused="auto")], tokens=TOKENS)
    assert report["path"] == "torch" and "out of resources" in report["reason"]
    with pytest.raises(FusedCheckError, match="out of resources"):
        hc_verify.verify_fused([hc.make_connection("hc", C, N, 0, fused="on")], tokens=TOKENS)


def test_unverified_kind_runs_the_torch_path_under_auto(kernels, monkeypatch):
    calls = count_fused_calls(monkeypatch, kernels)
    with pytest.warns(UserWarning, match="not verified on this device"):
        run_conn(hc.make_connection("kromhc", C, N, 0, fused="auto"))
    assert calls == []
    # 'on' runs them unchecked: the user asked for them
    run_conn(hc.make_connection("kromhc", C, N, 0, fused="on"))
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
    with pytest.warns(UserWarning, match="another rank"):
        report = hc_verify.verify_fused([hc.make_connection("kromhc", C, N, 0, fused="auto")], tokens=TOKENS)
    assert reduced == [dist.ReduceOp.MIN]
    assert report["path"] == "torch" and report["checks"][0]["reason"] == "the check failed on another rank"


def test_nothing_to_check():
    assert hc_verify.verify_fused([hc.make_connection("plain", C, 1, 0)])["path"] == "-"
    assert hc_verify.verify_fused([hc.make_connection("mhc", C, N, 0, fused="off")]) == {
        "path": "torch", "reason": "fused='off'", "checks": []}
    # auto on a CPU: the torch path, nothing to check
    r = hc_verify.verify_fused([hc.make_connection("mhc", C, N, 0, fused="auto")])
    assert r["path"] == "torch" and "CUDA only" in r["reason"]


@cuda_only
@pytest.mark.parametrize("scheme", ["hc", "mhc", "mhc_lite", "kromhc"])
def test_cuda_verify_gpt2_small_shapes(scheme, monkeypatch):
    monkeypatch.setattr(hc_kernels, "VERDICTS", {})
    torch.backends.cuda.matmul.allow_tf32 = True
    conn = hc.make_connection(scheme, 768, 4, 0, fused="on").cuda()
    for stream_dtype in (torch.float32, torch.bfloat16):
        report = hc_verify.verify_fused([conn], tokens=4096, stream_dtype=stream_dtype, autocast_dtype=torch.bfloat16)
        assert report["path"] == "fused", report


# ---------------------------------------------------------------------------------------
# recomputation: the same numbers, fewer saved bytes

def tiny_gpt(scheme, recompute, dropout=0.0, seed=0):
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, scheme=scheme, dropout=dropout,
                    n_streams=1 if scheme == "plain" else 4, gate_init=0.5, res_logit_init=-1.0, recompute=recompute)
    return GPT(cfg)


def saved_bytes(fn):
    """fn() and the bytes autograd saved for backward outside checkpointed regions (storages counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def loss_and_grads(model, dropout=False):
    torch.manual_seed(7)   # the same dropout masks for every model
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 64, (3, 16), generator=g) for _ in range(2))
    (_, loss), nbytes = saved_bytes(lambda: model(x, y))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}, nbytes


@pytest.mark.parametrize("scheme", hc.SCHEMES)
def test_recompute_gives_the_same_loss_and_gradients(scheme):
    loss0, grads0, bytes0 = loss_and_grads(tiny_gpt(scheme, "none"))
    saved = {}
    for mode in ("connections", "blocks"):
        loss, grads, saved[mode] = loss_and_grads(tiny_gpt(scheme, mode))
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)        # the forward is the same code
        assert grads.keys() == grads0.keys()
        for k in grads0:   # exact too: see test_recompute_blocks_replays_dropout
            assert torch.equal(grads[k], grads0[k]), f"{mode}: {k}"
    if scheme == "plain":   # no coefficients to recompute
        assert saved["connections"] == bytes0
    else:                   # the normalised streams / fp32 copies (n x C per sublayer) are no longer saved
        assert saved["connections"] < 0.8 * bytes0
    assert saved["blocks"] < 0.3 * bytes0   # only the embeddings, the head and the loss remain outside


def test_recompute_blocks_replays_dropout():
    loss0, grads0, _ = loss_and_grads(tiny_gpt("kromhc", "none", dropout=0.2))
    loss1, grads1, _ = loss_and_grads(tiny_gpt("kromhc", "blocks", dropout=0.2))
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    # exact: the recomputed forward repeats the same ops on the same values (and dropout masks), and the
    # backward computes the same contributions to each gradient; a parameter used twice (the tied embedding)
    # adds its two in either order, which is exact
    for k in grads0:
        assert torch.equal(grads1[k], grads0[k]), k


def test_recompute_rejects_unknown_values(data_dir, tmp_path):
    from model import GPT, GPTConfig
    import train
    from conftest import tiny_args
    with pytest.raises(ValueError, match="'recompute' must be one of"):
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=8, recompute="all"))
    with pytest.raises(ConfigError, match="'recompute' must be one of"):
        train.main(tiny_args(data_dir, tmp_path / "r", "--recompute=all"))


# ---------------------------------------------------------------------------------------
# the training step: the NaN check without a host sync per step

def poison_step(monkeypatch, bad_step):
    """The training loss of optimizer step ``bad_step`` (1-based; one micro-step each) becomes NaN."""
    import model as model_module
    real, calls = model_module.GPT.forward, []

    def forward(self, idx, targets=None, reduction="mean"):
        logits, loss = real(self, idx, targets, reduction)
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == bad_step:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(model_module.GPT, "forward", forward)


@pytest.mark.parametrize("log_interval,stop", [(1, 3), (4, 4), (100, 5)])
def test_nonfinite_step_stops_the_run_at_the_next_check(log_interval, stop, data_dir, tmp_path, monkeypatch):
    """Step 3 is NaN. The host looks at log steps and before the eval + checkpoint of step 5, so the
    run stops there at the latest, names step 3, and writes no checkpoint after it."""
    import train
    from conftest import read_log, tiny_args
    poison_step(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(Diverged) as e:
        train.main(tiny_args(data_dir, out, f"--log_interval={log_interval}"))
    msg = str(e.value)
    assert msg.startswith("step 3: training loss is nan") and f"stopping at step {stop}," in msg
    assert "no checkpoint had been written" in msg
    log = read_log(out)
    assert log[-1]["type"] == "error" and log[-1]["step"] == 3 and log[-1]["message"] == msg
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(log_interval, 3, log_interval))
    assert all(math.isfinite(r["loss"]) for r in log if r["type"] == "train")
    assert not os.path.exists(out / "ckpt.pt")       # the eval at step 5 never ran


def test_cli_reports_divergence_in_one_line(data_dir, tmp_path):
    """A learning rate that overflows: the one-line error, exit 1, no traceback."""
    from conftest import tiny_args
    args = tiny_args(data_dir, tmp_path / "run", "--learning_rate=1e30", "--grad_clip=0", "--log_interval=3",
                     "--max_iters=4")
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.startswith("error: step ") and "training loss is nan" in p.stderr


def test_flagged_step_leaves_fused_adamw_untouched():
    """A non-finite step flagged on the device is skipped by fused AdamW: the weights, the moments
    and the step count are as before it, and the next steps equal a run that never saw it."""

    def run(steps):
        torch.manual_seed(0)
        lin = nn.Linear(8, 4)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1, fused=True)
        assert common.skips_on_device(opt)
        nonfinite = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
        for i, poisoned in enumerate(steps, 1):
            x = torch.full((2, 8), float("nan")) if poisoned else torch.randn(2, 8, generator=torch.Generator().manual_seed(i))
            loss = lin(x).pow(2).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
            nonfinite = common.flag_nonfinite(nonfinite, i, loss.detach(), norm, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return lin, opt, nonfinite

    lin_a, opt_a, nf_a = run([False, False, True, False])    # step 3 poisoned
    assert nf_a[0].item() == 3 and math.isnan(nf_a[1].item()) and run([False] * 4)[2][0].item() == -1
    # the reference: batches 1, 2, 4 only
    torch.manual_seed(0)
    lin_c = nn.Linear(8, 4)
    opt_c = torch.optim.AdamW(lin_c.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    for i in (1, 2, 4):
        lin_c(torch.randn(2, 8, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(lin_c.parameters(), 1.0)
        opt_c.found_inf = torch.zeros(())
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
    for p_a, p_c in zip(lin_a.parameters(), lin_c.parameters()):
        torch.testing.assert_close(p_a, p_c, rtol=0, atol=0)
        s_a, s_c = opt_a.state[p_a], opt_c.state[p_c]
        assert s_a["step"].item() == s_c["step"].item() == 3
        torch.testing.assert_close(s_a["exp_avg"], s_c["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(s_a["exp_avg_sq"], s_c["exp_avg_sq"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# train.py's `fused` key: the choice and its reason in the log header and on the console

def test_train_records_the_residual_path(data_dir, tmp_path, monkeypatch, capsys):
    import train
    from conftest import read_log, tiny_args
    modes = []   # the fused mode of every connection of the model the run checks (and trains)
    verify = train.hc_verify.verify_fused
    monkeypatch.setattr(train.hc_verify, "verify_fused", lambda model, **kw: (
        modes.append({c.fused for c in model.connections()}), verify(model, **kw))[1])
    for scheme, fused, path, reason in [("kromhc", "auto", "torch", "CUDA only"), ("mhc", "off", "torch", "fused='off'"),
                                        ("plain", "on", "-", "no n-stream connections")]:
        out = tmp_path / f"{scheme}-{fused}"
        train.main(tiny_args(data_dir, out, f"--scheme={scheme}", f"--fused={fused}", "--max_iters=1"))
        header = read_log(out)[0]
        assert header["fused"] == fused and modes.pop() == {fused}
        assert header["fused_path"] == path and reason in header["fused_reason"]
        assert f"residual path: {path} (fused={fused}: " in capsys.readouterr().out
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # 'on' on a CPU without the interpreter
    with pytest.raises(ConfigError, match="config key 'fused' is 'on' but the fused kernels cannot run kromhc "
                                          "at n_streams=4 here: tensors are on the CPU"):
        train.main(tiny_args(data_dir, tmp_path / "on", "--scheme=kromhc", "--fused=on"))
    with pytest.raises(ConfigError, match="'fused' must be one of"):
        train.main(tiny_args(data_dir, tmp_path / "x", "--fused=yes"))


def test_bench_recompute_rows_and_sync_column(capsys):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import bench
    report = bench.main(["--device", "cpu", "--schemes", "kromhc", "--n-streams", "2", "--recompute", "none", "blocks",
                         "--sync-compare", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0"])
    rows = [(r["scheme"], r["recompute"], r["path"]) for r in report["results"]]
    assert rows == [("plain", "none", "-"), ("kromhc", "none", "torch"), ("kromhc", "blocks", "torch")]
    assert all(r["ms_per_step_sync"] > 0 for r in report["results"])
    # the same weights and batch: recomputation does not change the loss (the first step's, the same forward: exact)
    assert report["results"][1]["loss"] == report["results"][2]["loss"]
    text = capsys.readouterr().out
    assert "| kromhc +blocks | 2 | torch |" in text and "mem x plain | ms +sync |" in text
    assert "torch path: fused='auto' runs the kernels on CUDA only (device: cpu)" in text


# ---------------------------------------------------------------------------------------
# scripts/gpu_check.py

GPU_CHECK = os.path.join(REPO, "scripts", "gpu_check.py")


def test_gpu_check_script_interpret(tmp_path):
    """The whole script at small shapes in Triton's interpreter: every part runs and passes."""
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, GPU_CHECK, "--interpret", "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == f"gpu_check: PASS (tests, compare, training, bench); report {out}"
    import json
    report = json.loads(out.read_text())
    assert report["verdict"] == "PASS" and report["interpret"] and report["failed"] == []
    parts = report["parts"]
    assert all(parts[k]["ok"] for k in ("tests", "compare", "training", "bench"))
    assert "skipped" in parts["tests"]["summary"]            # the CUDA cases exist and skip on a CPU
    cases = parts["compare"]["cases"]
    assert {(c["scheme"], c["stream_dtype"]) for c in cases} == \
        {(s, d) for s in ("hc", "mhc", "mhc_lite", "kromhc") for d in ("float32", "bfloat16")}
    # the chain's scalar-gate gradients under bf16 autocast cancel heavily (large relative errors on both
    # paths): the fused error stays within twice the torch path's, or below 0.05 where that is tiny
    assert all(0 < c["max_err_fused"] <= 2 * max(c["max_err_torch"], 0.05) for c in cases)
    run = parts["training"]["runs"][0]
    assert len(run["curves"]["fused"]) == len(run["curves"]["torch"]) == 6
    assert run["curves"]["fused"] != run["curves"]["torch_perturbed"]     # the noise run is a different run
    rows = parts["bench"]["reports"]["schemes"]["results"]
    assert [(r["scheme"], r["recompute"]) for r in rows] == \
        [("plain", "none"), ("kromhc", "none"), ("kromhc", "connections"), ("kromhc", "blocks")]
    peer_rows = parts["bench"]["peers"]["rows"]   # bench.py --peers --tiny: every row ran, its table printed
    assert [(r["name"], r.get("path")) for r in peer_rows] == \
        [("plain", "-"), ("hcgpt kromhc torch", "torch"), ("hcgpt kromhc fused", "fused"), ("liger mHC", "peer"),
         ("lucidrains HC", "peer"), ("lucidrains mHC", "peer")]
    assert "| row | path | ms/step | x plain | fwd ms | bwd ms | peak GiB | mem x plain |" in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_says_so(tmp_path):
    p = subprocess.run([sys.executable, GPU_CHECK, "--out", str(tmp_path / "r.json")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("gpu_check: no CUDA device here") and "--interpret" in p.stderr
    assert not (tmp_path / "r.json").exists()


def test_gpu_check_verdict_names_failing_parts(tmp_path, capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # main() sets it: restored after the test
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import gpu_check
    out = tmp_path / "r.json"
    assert gpu_check.main(["--interpret", "--out", str(out), "--skip", "tests", "compare", "training", "bench"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"gpu_check: FAIL (tests, compare, training, bench failed); report {out}"


def test_gpu_check_loss_curve_rule():
    """The training part's rule: within 3x the bf16 noise (or 0.01 nats) and the model must learn."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import gpu_check
    torch_curve = [4.0 - 0.01 * i for i in range(40)]
    noisy = [v + (0.01 if i % 2 else -0.01) for i, v in enumerate(torch_curve)]
    ok, reason, numbers = gpu_check.compare_curves([v + 0.008 for v in torch_curve], torch_curve, noisy, 20)
    # two float64 means of 20 losses near 4, each within gamma(20) x 4 = 9e-15 of exact: 1e-12 leaves 50x
    assert ok and reason is None and numbers["allowed"] == 0.01 and numbers["gap"] == pytest.approx(0.008, abs=1e-12)
    drift = [v + 0.002 * i for i, v in enumerate(torch_curve)]      # a fused path that slowly walks away
    ok, reason, _ = gpu_check.compare_curves(drift, torch_curve, noisy, 20)
    assert not ok and "window means differ" in reason
    ok, reason, _ = gpu_check.compare_curves([4.0] * 40, [4.0] * 40, [4.0] * 40, 20)
    assert not ok and "did not learn" in reason
    ok, reason, _ = gpu_check.compare_curves([4.5] + torch_curve[1:], torch_curve, noisy, 20)
    assert not ok and "first losses differ" in reason


def test_gpu_check_targets():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import gpu_check
    row = lambda scheme, x, mem, recompute="none": dict(scheme=scheme, recompute=recompute, x_plain=x,  # noqa: E731
                                                      mem_x_plain=mem)
    reports = {"schemes": {"results": [row("plain", 1.0, 1.0), row("hc", 1.15, 1.5), row("mhc", 1.31, 1.3),
                                       dict(scheme="kromhc", recompute="none", error="out of memory")]},
               "recompute": {"results": [row("plain", 1.0, 1.0), row("kromhc", 1.4, 0.8, "blocks")]},
               "d2048": {"results": [row("plain", 1.0, 1.0), row("kromhc", 1.08, 1.2)]}}
    got = {t["what"]: (t["value"], t["met"]) for t in gpu_check.targets(reports)}
    assert got == {"hc step time x plain": (1.15, True), "mhc step time x plain": (1.31, False),
                   "hc (none) peak memory x plain": (1.5, False), "mhc (none) peak memory x plain": (1.3, True),
                   "kromhc (blocks) peak memory x plain": (0.8, True), "d2048 kromhc step time x plain": (1.08, True)}
