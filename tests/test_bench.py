"""scripts/bench.py end to end on CPU: a tiny model, plain and two schemes, --json."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--device", "cpu", "--model", "tiny",
           "--schemes", "hc", "kromhc", "--n-streams", "2", "--batch-size", "2", "--seq-len", "32",
           "--steps", "2", "--warmup", "1", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_structure(report):
    c = report["config"]
    assert c["device"].startswith("cpu") and c["model"] == "tiny"
    assert (c["batch_size"], c["seq_len"], c["steps"], c["warmup"]) == (2, 32, 2, 1)
    assert c["dtype"] == c["stream_dtype"] == "float32" and c["compile"] is False and c["fused"] == "auto"
    assert c["peak_bf16_flops"] is None
    assert [(r["scheme"], r["n_streams"], r["path"]) for r in report["results"]] == \
        [("plain", 1, "-"), ("hc", 2, "torch"), ("kromhc", 2, "torch")]


def test_numbers_are_sane_and_ratios_from_this_run(report):
    results = report["results"]
    plain = results[0]
    for r in results:
        assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["ms_per_step"] / 1e3), rel=1e-9)
        assert r["x_plain"] == pytest.approx(r["ms_per_step"] / plain["ms_per_step"], rel=1e-9)
        assert r["mfu"] is None                                 # no bf16 peak known for a CPU
        assert r["peak_mem_gib"] is None and r["mem_x_plain"] is None   # not measured on CPU
        # ln(512) = 6.24 at init; the timed steps train on the one batch: the last loss is below it
        assert math.log(512) - 2 < r["loss"] < math.log(512) - 0.1
    assert plain["x_plain"] == 1.0
    # the n-stream models are larger by their connections' parameters
    assert results[1]["params"] > plain["params"] and results[2]["params"] > plain["params"]


def test_table_and_mfu(capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench
    report = {"config": dict(device="NVIDIA H100 80GB HBM3", torch="x", model="124M", n_layer=12, n_embd=768,
                             batch_size=16, seq_len=1024, dtype="bfloat16", stream_dtype="bfloat16", compile=True,
                             fused="auto", warmup=5, steps=20),
              "results": [dict(scheme="plain", n_streams=1, path="-", ms_per_step=34.1, x_plain=1.0,
                               tokens_per_s=480.5e3, mfu=0.42, peak_mem_gib=8.4, mem_x_plain=1.0),
                          dict(scheme="kromhc", n_streams=4, error="out of memory")]}
    text = bench.table(report)
    assert "| plain | 1 | - | 34.1 | 1.00 | 480.5k | 42.0% | 8.40 | 1.00 |" in text
    assert "| kromhc | 4 | | out of memory |" in text
    assert "do not predict" not in text  # a GPU's table stands alone; a CPU's says what its times are not
    cpu = dict(report, config=dict(report["config"], device="cpu (2 cores)"))
    assert bench.table(cpu).splitlines()[-1] == bench.CPU_NOTE
    assert "do not predict the ratios on a GPU" in bench.CPU_NOTE
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA L4", None)]:
        assert bench.bf16_peak(name) == peak, name
    assert bench.bf16_peak(bench.device_name(bench.torch.device("cpu"))) is None


# ----------------------------------------------------------------------------------------
# --peers: hcgpt's paths beside Liger-Kernel's and lucidrains' HC / mHC (docs/peers.md)

PEER_ROWS = ["plain"] + [f"hcgpt {s} {p}" for s in ("hc", "mhc", "mhc_lite", "kromhc") for p in ("torch", "fused")] \
    + ["liger mHC", "lucidrains HC", "lucidrains mHC"]


def test_peers_tiny_runs_every_row():
    """`bench.py --peers --tiny` on a CPU: every row ran (the fused kernels and Liger's in Triton's
    interpreter), on the path it names, and its ratios come from this run."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--peers", "--tiny", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # bench.py sets it itself
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    c = report["config"]
    assert (c["model"], c["batch_size"], c["seq_len"], c["sinkhorn_iters"], c["n_streams"]) == ("toy", 2, 16, 4, 4)
    assert c["versions"]["liger-kernel"] == "0.8.5" and c["versions"]["hyper-connections"] == "0.4.11"
    rows = report["rows"]
    assert [r["name"] for r in rows] == PEER_ROWS
    assert all("error" not in r and "note" not in r for r in rows), [r for r in rows if "ms" not in r]
    paths = {r["name"]: r["path"] for r in rows}
    assert paths["plain"] == "-" and paths["liger mHC"] == paths["lucidrains HC"] == "peer"
    assert all(paths[f"hcgpt {s} {p}"] == p for s in ("hc", "mhc", "mhc_lite", "kromhc") for p in ("torch", "fused"))
    for r in rows:
        assert r["ms"] > 0 and 0 < r["fwd_ms"] and 0 < r["bwd_ms"] and r["fwd_ms"] + r["bwd_ms"] < r["ms"]
        assert r["step_x"] == pytest.approx(r["ms"] / rows[0]["ms"], rel=1e-9)
        assert r["peak_gib"] is None and r["mem_x"] is None       # not measured on a CPU
        assert math.isfinite(r["loss"]) and abs(r["loss"] - math.log(256)) < 1.0   # one step from ln(vocab)
    # each peer replaced hcgpt's connections: their own parameter counts
    params = {r["name"]: r["params"] for r in rows}
    assert params["lucidrains HC"] == params["hcgpt hc torch"]            # HC: the same parameters
    assert params["liger mHC"] == params["hcgpt mhc torch"] - 2 * 4 * 32   # no γ: n C fewer in each of 2 connections


def test_peer_rows_assembly(monkeypatch):
    """run_peers: ratios to plain from the same run, a missing peer and a failing row as rows that say so."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench
    from scripts import peers   # the module bench.py uses
    monkeypatch.setitem(peers.PEERS, "absent peer", ("no_such_module_for_hcgpt", "mhc", "absent==1.0"))

    def fake(scheme, recompute, args, device, peer=None, fused=None):
        if peer == "lucidrains mHC":
            raise RuntimeError("it did not compile\nsecond line")
        ms = {"plain": 10.0, "hc": 12.0}.get(scheme, 15.0) + (1.0 if peer else 0.0)
        path = "peer" if peer else bench.model_config(scheme, args, recompute, fused).fused   # the row's fused
        return dict(path=path, ms_per_step=ms, fwd_ms=3.0, bwd_ms=6.0,
                    peak_mem_gib=2.0 * ms / 10, params=1, loss=1.0)

    monkeypatch.setattr(bench, "bench_one", fake)
    args = bench.argparse.Namespace(device="cpu", schemes=["hc"], n_streams=4, fused="auto", model="toy",
                                    batch_size=2, seq_len=16, dtype="float32", stream_dtype="float32",
                                    compile=False, warmup=0, steps=1, sinkhorn_iters=4)
    report = bench.run_peers(args)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["plain", "hcgpt hc torch", "hcgpt hc fused", "liger mHC", "lucidrains HC",
                          "lucidrains mHC", "absent peer"]
    assert (rows["hcgpt hc torch"]["path"], rows["hcgpt hc fused"]["path"]) == ("off", "on")   # fused per row
    assert rows["hcgpt hc fused"]["step_x"] == pytest.approx(1.2) and rows["liger mHC"]["mem_x"] == pytest.approx(1.6)
    assert rows["lucidrains mHC"]["error"] == "RuntimeError: it did not compile"
    assert rows["absent peer"]["note"] == "not installed (pip install absent==1.0)"
    assert args.fused == "auto"   # the run's own setting: the rows' modes do not leak into it
    text = bench.peer_table(dict(report, config=dict(report["config"], device="cpu", torch="x")))
    assert "| hcgpt hc fused | on | 12.0 | 1.20 | 3.0 | 6.0 | 2.40 | 1.20 |" in text
    assert "| absent peer | | not installed (pip install absent==1.0) |" in text
    assert "| lucidrains mHC | | RuntimeError: it did not compile |" in text
