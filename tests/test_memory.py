"""scripts/bench.py --memory: the count of what backward keeps, on cases whose bytes are known by construction,
and the report's rows on a tiny model (every scheme, every recompute choice of model.RECOMPUTE)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench  # noqa: E402
import hc  # noqa: E402
from model import RECOMPUTE  # noqa: E402

N, WIDTHS = 8, (3, 5, 7, 11)   # tokens; a chain's widths, all different so that no two sizes coincide


def chain():
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(WIDTHS, WIDTHS[1:])))


def count(forward, model):
    kept, packed, _ = bench.kept_for_backward(forward, list(model.parameters()))
    return kept, packed


def test_linear_chain_keeps_its_inputs_but_not_the_first():
    """Linear without bias saves its input for the weight's gradient: h1 and h2 (fp32), not the model's input
    x (nor a view of it: the same storage), not the weights, not the output h3 (the sum's backward needs no
    input)."""
    m, x = chain(), torch.randn(N, WIDTHS[0])
    want = 4 * N * (WIDTHS[1] + WIDTHS[2])
    assert count(lambda: m(x.view(N, -1)).sum(), m) == (want, want)


def test_bf16_weight_copies_are_parameters():
    """Under bf16 autocast each mm saves the bf16 copy of its input (x's copy too: made from an input, not from
    parameters alone); autocast's bf16 copies of the weights are not counted."""
    m, x = chain(), torch.randn(N, WIDTHS[0])

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().sum()

    want = 2 * N * (WIDTHS[0] + WIDTHS[1] + WIDTHS[2])
    assert count(forward, m) == (want, want)


def test_checkpoint_keeps_its_input_and_a_selective_cache_its_saved_outputs():
    """checkpoint of layers 2-3 keeps only their input h1. Selective checkpointing that saves every mm also
    keeps the cached h2 and h3, which autograd's pack hook never sees (the saved_tensors_hooks column)."""
    m, x = chain(), torch.randn(N, WIDTHS[0])
    rest = lambda h: m[2](m[1](h))  # noqa: E731
    h1_bytes = 4 * N * WIDTHS[1]
    assert count(lambda: checkpoint(rest, m[0](x), use_reentrant=False).sum(), m) == (h1_bytes, h1_bytes)

    policy = lambda ctx, op, *a, **k: (CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default  # noqa: E731
                                       else CheckpointPolicy.PREFER_RECOMPUTE)
    sac = partial(create_selective_checkpoint_contexts, policy)
    kept, packed = count(lambda: checkpoint(rest, m[0](x), use_reentrant=False, context_fn=sac).sum(), m)
    assert (kept, packed) == (4 * N * sum(WIDTHS[1:]), h1_bytes)


def test_freed_storages_are_not_counted():
    """What the forward frees before it ends (a temporary) is not kept for backward."""
    m, x = chain(), torch.randn(N, WIDTHS[0])
    kept, _ = count(lambda: (m(x) * 1.0).exp().sum(), m)   # exp saves its output: h3 * 1 is freed, exp(.) kept
    assert kept == 4 * N * (WIDTHS[1] + WIDTHS[2] + WIDTHS[3])


# ----------------------------------------------------------------------------------------
# the CLI on a tiny model: every scheme, every recompute choice

SCHEMES = [s for s in hc.SCHEMES if s != "plain"]
TINY = ["--memory", "--device", "cpu", "--model", "tiny", "--seq-len", "16", "--batch-size", "1", "--n-streams", "2"]


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main([*TINY, "--schemes", *SCHEMES, "--json"])["rows"]
    return json.loads(out.getvalue())


def test_rows_every_scheme_and_choice(report):
    c = report["config"]
    assert (c["n_embd"], c["batch_size"], c["seq_len"], c["dtype"], c["stream_dtype"]) == \
        (64, 1, 16, "bfloat16", "float32")
    assert c["recompute"] == list(RECOMPUTE)   # the default: every choice, none first
    assert [(r["scheme"], r["recompute"]) for r in report["rows"]] == \
        [(s, m) for s in ["plain", *SCHEMES] for m in RECOMPUTE]
    assert all(r["peak_mib"] is None for r in report["rows"])   # CUDA only


def test_ratios_and_the_recompute_order(report):
    rows = {(r["scheme"], r["recompute"]): r for r in report["rows"]}
    base = rows["plain", "none"]
    assert base["x_plain"] == 1.0 and base["extra_flops"] == 0.0
    for r in report["rows"]:
        assert r["x_plain"] == r["kib_per_token_layer"] / base["kib_per_token_layer"]
        assert 0 < r["kib_per_token_layer"] and 0 <= r["hooks_kib_per_token_layer"] <= r["kib_per_token_layer"]
    for s in ["plain", *SCHEMES]:
        none = rows[s, "none"]
        assert none["extra_flops"] == 0.0
        # without checkpoints autograd holds all that is kept: the two counts agree
        assert none["hooks_kib_per_token_layer"] == none["kib_per_token_layer"], s
        assert rows[s, "blocks"]["kib_per_token_layer"] < none["kib_per_token_layer"], s
        assert rows[s, "connections"]["kib_per_token_layer"] <= none["kib_per_token_layer"], s
        assert rows[s, "blocks"]["extra_flops"] > 0, s   # a block's forward again
        if s != "plain":
            assert rows[s, "connections"]["kib_per_token_layer"] < none["kib_per_token_layer"], s


def test_blocks_keep_each_block_input_exactly(report):
    """recompute=blocks keeps each block's input streams: n x C fp32 per token and layer, nothing else
    (plain: n = 1). Exact: the count is of bytes."""
    for r in report["rows"]:
        if r["recompute"] == "blocks":
            assert r["kib_per_token_layer"] * 2**10 == r["n_streams"] * 64 * 4, r["scheme"]
            assert r["layers"] == [4, 2] and r["group"] is None


def test_flops_per_layer_by_construction(report):
    """plain's layer per token: matmuls 2 x 12 C^2 forward, twice that backward (input and weight gradients);
    attention (FlopCounterMode's formula, causal or not) 4 T C forward, 10 T C backward, the CPU's kernel
    counted like a GPU's. Biases, norms and activations are not counted."""
    C, T = 64, 16
    assert report["rows"][0]["flops_per_layer"] == T * (3 * 24 * C**2 + 14 * T * C)


def test_table_says_what_it_measured(report):
    text = bench.memory_table(report)
    assert "B 1, T 16, bfloat16 compute, float32 streams, eager, fused=auto" in text
    assert "| scheme | recompute | path | KiB/token/layer | x plain | extra FLOPs | peak MiB | saved_tensors_hooks KiB |" \
        in text
    plain = report["rows"][0]
    assert f"| plain | none | - | {plain['kib_per_token_layer']:.1f} | 1.00 | +0.0% | n/a |" in text


def test_refuses_what_does_not_apply(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([*TINY, "--steps", "3"])
    assert e.value.code == 2
    assert "--memory counts one eager forward and backward" in capsys.readouterr().err


def test_grouped_recompute_counts_whole_groups(monkeypatch, capsys):
    """Where recompute groups blocks (the choices GPTConfig's recompute_group applies to), both models hold
    whole groups of the size model.py chooses at --model's depth: 20 layers at n = 2 give groups of
    round(sqrt(2 x 20 / 4)) = 3, so 6 and 3 layers. What autograd's pack hook sees there is each group's input
    streams only (the rest sits in the selective checkpoint's cache): n C fp32 per token, once per 3 layers."""
    group_key = bench.declared(bench.GPTConfig)["recompute_group"]
    grouped = [m for m in RECOMPUTE if group_key.applies_to({"recompute": m})]
    assert grouped
    monkeypatch.setitem(bench.MODELS, "tiny", dict(bench.MODELS["tiny"], n_layer=20))
    assert bench.main([*TINY, "--schemes", "hc", "--recompute", *grouped, "--json"])["rows"]
    rows = {r["recompute"]: r for r in json.loads(capsys.readouterr().out)["rows"] if r["scheme"] == "hc"}
    assert list(rows) == ["none", *grouped]
    for m in grouped:
        r = rows[m]
        assert (r["group"], r["layers"]) == (3, [6, 3])
        assert r["hooks_kib_per_token_layer"] * 2**10 * 3 == 2 * 64 * 4
        assert r["hooks_kib_per_token_layer"] < r["kib_per_token_layer"] < rows["none"]["kib_per_token_layer"]


def test_fused_path_in_the_interpreter(report):
    """--fused on runs the kernels (Triton's interpreter on a CPU; bench.py sets TRITON_INTERPRET=1 itself, so a
    process of its own): the rows say so, blocks keep the same block inputs, and without recompute the kernels
    keep less than the torch path (they save h and recompute the rest, docs/speed.md)."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), *TINY, "--schemes", "hc", "--recompute", "none",
           "blocks", "--fused", "on", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["scheme"], r["recompute"]): r for r in json.loads(proc.stdout)["rows"]}
    torch_path = {(r["scheme"], r["recompute"]): r for r in report["rows"]}
    assert [r["path"] for k, r in rows.items() if k[0] == "hc"] == ["fused", "fused"]
    assert torch_path["hc", "none"]["path"] == "torch"
    assert rows["hc", "blocks"]["kib_per_token_layer"] * 2**10 == 2 * 64 * 4
    assert rows["hc", "none"]["kib_per_token_layer"] < torch_path["hc", "none"]["kib_per_token_layer"]
    assert rows["plain", "none"]["kib_per_token_layer"] == torch_path["plain", "none"]["kib_per_token_layer"]
