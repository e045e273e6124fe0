"""train.py on CPU with tiny models on a tiny pydocs dataset: every scheme learns and logs, BPB,
wandb offline, configs, sweeps, and every bad-config error (resume: test_train_resume.py)."""

import math
import os
from dataclasses import replace
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import configurator
import evals.val
import hc
import model as model_module
import train
from errors import ConfigError
from conftest import read_log, tiny_args
import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("scheme", hc.SCHEMES)
def test_every_scheme_learns_and_logs(scheme, data_dir, tmp_path):
    out = tmp_path / scheme
    result = train.main(tiny_args(data_dir, out, f"--scheme={scheme}"))
    log = read_log(out)
    assert log[0]["type"] == "config" and log[0]["scheme"] == scheme
    assert log[0]["n_streams"] == (1 if scheme == "plain" else 4)
    evals = [r for r in log if r["type"] == "eval"]
    trains = [r for r in log if r["type"] == "train"]
    assert [e["step"] for e in evals] == [0, 5, 10]
    assert [t["step"] for t in trains] == list(range(1, 11))
    assert [t["tokens"] for t in trains] == [128 * s for s in range(1, 11)]
    for t in trains:
        assert set(t) == {"type", "step", "tokens", "loss", "loss_ema", "lr", "grad_norm", "tok_per_s", "mfu", "ms"}
        assert math.isfinite(t["loss"]) and t["mfu"] is None  # no MFU on CPU
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert trains[-1]["loss"] < trains[0]["loss"] - 1.0
    assert result["val_loss"] == evals[-1]["val_loss"] and result["step"] == 10
    if scheme == "plain":
        assert "diag" not in evals[-1] and "hres" not in evals[-1]
    else:
        e = evals[-1]
        assert len(e["hres"]) == 4 and list(e["hres"])[0] == "L00.attn"
        assert all(len(m) == 4 and len(m[0]) == 4 for m in e["hres"].values())
        assert len(e["hres_composite"]) == 4
        assert "composite/amax_fwd" in e["diag"] and "L01.mlp/ds_col_err" in e["diag"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert {"model", "model_config", "optimizer", "step", "config", "rng", "loader"} <= set(ckpt)
    assert ckpt["step"] == 10 and ckpt["loader"]["consumed_windows"] == 4 * 10
    assert ckpt["config"]["scheme"] == scheme
    m = model_module.GPT(model_module.GPTConfig(**ckpt["model_config"]))
    m.load_state_dict(ckpt["model"])  # the uncompiled model's state dict
    assert not os.path.exists(out / "ckpt.pt.tmp")


class UniformModel(nn.Module):
    """Predicts the uniform distribution over V tokens: every target costs ln V nats."""

    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, idx, targets, reduction="mean"):
        logits = torch.zeros(*idx.shape, self.V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return logits, loss.view(targets.shape)


@pytest.mark.numerics
def test_bpb_hand_built():
    V = 8
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 4, 2])  # token 0 is a special token: 0 bytes
    x = torch.zeros(2, 3, dtype=torch.long)
    y = torch.tensor([[0, 1, 2], [3, 6, 7]])
    loss, bpb = evals.val.val_loss_bpb(UniformModel(V), [(x, y)], token_bytes, torch.autocast("cpu", enabled=False), "cpu")
    # every token's loss is fp32's log 8 (within 1 ulp: 2 u = 1.2e-7 relative), summed in float64 (loss and BPB, here
    # and below): approx's default 1e-6 leaves 8x, and a wrong count or byte total is off by a tenth or more
    assert loss == pytest.approx(math.log(8))  # all 6 targets, the special one included
    # 5 text targets x ln 8 nats over ln 2 x (1 + 2 + 3 + 4 + 2) = 12 bytes: 15 / 12 bits per byte
    assert bpb == pytest.approx(5 * 3 / 12)
    # split over two batches, with an ignored (-1) target: sums, not means of means
    y2 = torch.tensor([[1, -1, 2]])
    loss, bpb = evals.val.val_loss_bpb(UniformModel(V), [(x[:1], y[:1]), (x[:1], y2)], token_bytes,
                               torch.autocast("cpu", enabled=False), "cpu")
    assert loss == pytest.approx(math.log(8))
    assert bpb == pytest.approx((2 + 2) * 3 / (3 + 3))


def test_wandb_offline_writes_a_run(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--scheme=kromhc", "--max_iters=5", "--wandb_log=True",
                         "--wandb_mode=offline", "--wandb_run_name=wb-test"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 0
    data = files[0].read_bytes()
    for key in (b"val/bpb", b"train/loss", b"diag/composite/amax_fwd", b"wb-test", b"kromhc"):
        assert key in data, key
    assert torch.load(out / "ckpt.pt", weights_only=False)["wandb_id"]


def test_lr_schedule():
    oc = optim.OptimConfig(learning_rate=1.0, warmup_iters=10, max_iters=110, lr_decay_iters=0, min_lr_ratio=0.1)
    lrs = [optim.lr_at(s, oc, 1.0) for s in range(120)]
    # float64, a few operations (1e-16 relative): approx's default 1e-6 is far above them and below any schedule bug
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way through the cosine
    assert lrs[110] == lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    oc = replace(oc, lr_schedule="linear", warmdown_frac=0.5)
    lrs = [optim.lr_at(s, oc, 1.0) for s in range(120)]
    assert lrs[10] == lrs[54] == 1.0
    assert lrs[55] == pytest.approx(1.0) and lrs[82] == pytest.approx(1.0 - 0.9 * 27 / 55)
    assert lrs[110] == pytest.approx(0.1)


def test_config_files_load():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        cfg = configurator.load(config.KEYS, [os.path.join(REPO, "configs", name)])
        config.build(cfg)
    grid = {"s": (6, 512, 1e-3), "m": (12, 768, 6e-4), "l": (24, 1024, 3e-4)}
    for ds, short in (("openwebtext", "owt"), ("fineweb_edu", "fwe")):
        for size, (L, C, lr) in grid.items():
            cfg = configurator.load(config.KEYS, [os.path.join(REPO, "configs", f"{short}_{size}.py")])
            assert (cfg["dataset"], cfg["n_layer"], cfg["n_embd"], cfg["learning_rate"]) == (ds, L, C, lr)
            assert (cfg["max_iters"], cfg["total_batch_tokens"], cfg["block_size"]) == (10_000, 131_072, 1024)
            assert (cfg["beta1"], cfg["beta2"], cfg["weight_decay"], cfg["warmup_iters"]) == (0.9, 0.95, 0.1, 200)
            assert (cfg["lr_schedule"], cfg["min_lr_ratio"], cfg["n_streams"]) == ("cosine", 0.1, 0)
            for gpus in (1, 2, 4, 8):
                assert cfg["total_batch_tokens"] % (cfg["batch_size"] * cfg["block_size"] * gpus) == 0
    q = configurator.load(config.KEYS, [os.path.join(REPO, "configs", "quickstart.py")])
    assert (q["dataset"], q["scheme"], q["n_streams"], q["device"]) == ("pydocs", "kromhc", 4, "cpu")


def test_overrides_apply_in_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\n_helper = 3\nn_layer = _helper * 2\nlearning_rate = 1\nkron_factors = [2, 3]\n")
    cfg = configurator.load(config.KEYS, [str(f), "--n_layer=4", "--scheme=kromhc", "--resume", "--dropout=0"])
    assert cfg["n_layer"] == 4 and cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["kron_factors"] == (2, 3) and cfg["scheme"] == "kromhc" and cfg["resume"] is True
    assert cfg["dropout"] == 0.0


BAD_CONFIGS = [
    (["--foo=1"], "unknown config key 'foo'"),
    (["--n_layr=2"], "did you mean 'n_layer'"),
    (["--n_layer=2.5"], "'n_layer' must be int"),
    (["--learning_rate=fast"], "'learning_rate' must be float"),
    (["--wandb_log=yes"], "'wandb_log' must be bool"),
    (["--max_iters"], "expected --max_iters=VALUE"),
    (["--kron_factors=3"], "'kron_factors' must be tuple or None"),
    (["--scheme=resnet"], "'scheme' must be one of"),
    (["--compile=maybe"], "'compile' must be one of"),
    (["--wandb_mode=cloud"], "'wandb_mode' must be one of"),
    (["--lr_schedule=step"], "'lr_schedule' must be one of"),
    (["--stream_dtype=float16"], "'stream_dtype' must be one of"),
    (["--batch_size=0"], "'batch_size' must be > 0"),
    (["--warmup_iters=-1"], "'warmup_iters' must be >= 0"),
    (["--dropout=1.5"], "'dropout' must be in"),
    (["--n_embd=30", "--n_head=4"], "'n_embd' \\(30\\) must be divisible by 'n_head' \\(4\\)"),
    (["--total_batch_tokens=1000"], "'total_batch_tokens' \\(1000\\) must be divisible by batch_size x block_size "
                                    "x world_size = 4 x 32 x 1 = 128"),
    (["--scheme=plain", "--n_streams=4"], "'n_streams' is 4, but scheme 'plain'"),
    (["--scheme=kromhc", "--n_streams=4", "--kron_factors=(3, 2)"], "kron_factors"),
    (["--scheme=mhc_lite", "--n_streams=8"], "mhc_lite"),
    (["--eval_tokens=100000000"], "data .*val tokens"),
    (["--vocab_size=1000"], "'vocab_size' \\(1000\\) is smaller"),
]


@pytest.mark.parametrize("extra,message", BAD_CONFIGS)
def test_bad_config_errors(extra, message, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train.main(tiny_args(data_dir, tmp_path / "bad", *extra))


def test_bad_config_files_and_data(data_dir, tmp_path):
    f = tmp_path / "typo.py"
    f.write_text("n_layer = 2\nlearnig_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=f"config file '{f}': unknown config key 'learnig_rate'"):
        train.main([str(f)])
    with pytest.raises(ConfigError, match="config file 'nope.py' not found"):
        train.main(["nope.py"])
    with pytest.raises(ConfigError, match="has no meta.json.*python data/prepare.py pydocs"):
        train.main(tiny_args(str(tmp_path / "missing"), tmp_path / "o"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="'device' is 'cuda' but CUDA is not available"):
        train.main(tiny_args(data_dir, tmp_path / "o", "--device=cuda"))


def test_cli_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "configs/quickstart.py", "--n_layr=3"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip() == "error: override '--n_layr=3': unknown config key 'n_layr'; did you mean 'n_layer'?"


def test_sweep_prints_distinct_runs(capsys):
    import shlex
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import sweep
    assert sweep.main(["--configs", "configs/owt_s.py", "configs/fwe_s.py", "--schemes", "plain", "mhc", "kromhc",
                       "--n", "4", "6", "--seeds", "0", "1", "--nproc", "8", "--", "--max_iters=100"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert all(line.endswith("  # start") for line in printed)  # what each command does (no runs there)
    lines = [line[:-len("  # start")] for line in printed]
    assert len(lines) == 2 * 2 * (1 + 2 + 2)  # configs x seeds x (plain once + mhc and kromhc at n = 4, 6)
    names = [next(a for a in line.split() if a.startswith("--wandb_run_name=")) for line in lines]
    outs = [next(a for a in line.split() if a.startswith("--out_dir=")) for line in lines]
    assert len(set(names)) == len(set(outs)) == len(lines)
    # this Python's torchrun: a job script need not activate the venv
    torchrun = f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone --nproc_per_node=8 train.py "
    assert all(line.startswith(torchrun) for line in lines)
    assert all(line.endswith("--max_iters=100") for line in lines)
    # the seeds share the first seed's data order, and every run's name says so alike (-d0 also on seed 0);
    # the override of a setting key is in the names (max_iters: another sweep with another one gets others)
    assert ("configs/fwe_s.py --scheme=plain --n_streams=1 --seed=1 --data_seed=0 "
            "--wandb_run_name=fwe_s-plain-n1-max_iters=100-s1-d0" in "\n".join(lines))
    assert sorted({n.rpartition("-s")[2] for n in names}) == ["0-d0", "1-d0"]
    for line in lines:  # every printed command is a valid config
        args = line.split("train.py ", 1)[1].split()
        configurator.load(config.KEYS, [os.path.join(REPO, args[0])] + args[1:])


def test_sweep_names_progress_and_next_commands(capsys, monkeypatch):
    """Overrides of the model or data are in the run names (a second sweep on other data gets other names),
    bookkeeping ones are not; --vary-data names every run -s<seed>; --run says run k/N and ends with the
    compare and plot commands of its out root (printed commands keep stdout to themselves)."""
    import shlex
    from scripts import sweep

    def names(*extra):
        capsys.readouterr()
        assert sweep.main(["--configs", "configs/quickstart.py", "--schemes", "plain", "--seeds", "2",
                           "--out_root", "out/x", *extra]) == 0
        return [line.split("--wandb_run_name=")[1].split()[0] for line in capsys.readouterr().out.splitlines()]

    assert names() == ["quickstart-plain-n1-s0-d0", "quickstart-plain-n1-s1-d0"]
    assert names("--vary-data") == ["quickstart-plain-n1-s0", "quickstart-plain-n1-s1"]
    first = names("--", "--dataset=pydocs", "--n_layer=2", "--eval_interval=5", "--wandb_log=False")
    assert first == [f"quickstart-plain-n1-dataset=pydocs-n_layer=2-s{s}-d0" for s in (0, 1)]
    other = names("--", "--dataset=tinystories", "--n_layer=2", "--data_dir=/scratch/ts/", "--bias")
    assert other[0] == "quickstart-plain-n1-dataset=tinystories-n_layer=2-data_dir=ts-bias=True-s0-d0"
    ran = []
    monkeypatch.setattr(sweep, "launch", lambda cmd: ran.append(cmd) or (0, False))
    assert sweep.main(["--configs", "configs/quickstart.py", "--schemes", "plain", "kromhc", "--seeds", "2",
                       "--out_root", "out/x", "--run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(ran) == 4
    python = shlex.quote(sys.executable)
    assert [line.split(f": {python}")[0] for line in out[:4]] == [f"sweep: run {k}/4: start" for k in range(1, 5)]
    assert out[4:] == ["sweep: 4 run(s) under out/x:", *(f"  started  out/x/quickstart-{s}-s{seed}-d0"
                                                          for seed in (0, 1) for s in ("plain-n1", "kromhc-n4")),
                       "sweep: every run finished; compare and plot them:",
                       f"  {python} scripts/compare.py out/x/* --baseline scheme=plain",
                       f"  {python} scripts/plot_runs.py out/x/* --groups --out-dir plots/x"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["plain", "kromhc"])
def test_cuda_bf16_compile_trains(scheme, data_dir, tmp_path):
    out = tmp_path / scheme
    train.main(tiny_args(data_dir, out, "--device=cuda", f"--scheme={scheme}", "--compile=True", "--dtype=bfloat16"))
    log = read_log(out)
    assert log[0]["compile"] is True and log[0]["dtype"] == "bfloat16"
    evals = [r for r in log if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
