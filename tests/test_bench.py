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
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA L4", None)]:
        assert bench.bf16_peak(name) == peak, name
    assert bench.bf16_peak(bench.device_name(bench.torch.device("cpu"))) is None
