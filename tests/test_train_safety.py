"""train.py never destroys or mixes runs, and every bad input a user can give is a one-line ConfigError
naming the key or file and the fix: an out_dir holding a run, a locked out_dir, a failed or killed
checkpoint write, a log cut by a crash, bad config files, checkpoints, data and wandb settings; --help;
sweep.py's process count."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import config
import rundir
import tracking
import train
from errors import ConfigError, WriteError
from conftest import read_log, snapshot, tiny_args
from data import shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """A finished 5-step run (checkpoint at step 5) that tests copy, never touch."""
    out = tmp_path_factory.mktemp("base") / "run"
    train.main(tiny_args(data_dir, out, "--max_iters=5"))
    return out


def data_copy(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


# ---- runs are never destroyed or mixed ----

def test_out_dir_holding_a_run_is_refused(data_dir, run_copy):
    before = snapshot(run_copy)
    assert {"ckpt.pt", "log.jsonl"} <= set(before)
    with pytest.raises(ConfigError) as e:
        train.main(tiny_args(data_dir, run_copy, "--max_iters=3"))
    msg = str(e.value)
    assert f"{run_copy} already holds a run that reached step 5" in msg
    assert "--resume" in msg and "another --out_dir" in msg and "--overwrite=True" in msg
    assert snapshot(run_copy) == before
    os.remove(run_copy / "ckpt.pt")  # a log alone (e.g. checkpoint=False) is a run too
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match="already holds a run that reached step 5"):
        train.main(tiny_args(data_dir, run_copy, "--max_iters=3"))
    assert snapshot(run_copy) == before


def test_overwrite_starts_afresh(data_dir, run_copy):
    (run_copy / "ckpt_5.pt").write_bytes((run_copy / "ckpt.pt").read_bytes())  # as keep_checkpoints leaves them
    with pytest.raises(ConfigError, match="'resume' and 'overwrite' contradict"):
        train.main(tiny_args(data_dir, run_copy, "--resume", "--overwrite=True"))
    train.main(tiny_args(data_dir, run_copy, "--max_iters=3", "--eval_interval=3", "--overwrite=True"))
    log = read_log(run_copy)
    assert [r["type"] for r in log].count("config") == 1 and log[0]["type"] == "config"
    assert max(r["step"] for r in log if "step" in r) == 3  # nothing of the old 5-step run is left
    assert not (run_copy / "ckpt_5.pt").exists()
    assert torch.load(run_copy / "ckpt.pt", weights_only=False)["step"] == 3


def test_locked_out_dir_is_refused(data_dir, run_copy):
    before = snapshot(run_copy)
    with shards.dir_lock(run_copy, ".train.lock", "train.py run"):  # a run in progress
        with pytest.raises(ConfigError, match=rf"'out_dir': another train.py run is using {run_copy}.*\.train\.lock"):
            train.main(tiny_args(data_dir, run_copy, "--resume", "--max_iters=6"))
    assert snapshot(run_copy) == before


def test_ddp_ranks_stop_together_on_rank0_refusal(data_dir, run_copy):
    """Rank 0 alone checks out_dir; the other rank must stop with it, not wait in a collective."""
    before = snapshot(run_copy)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *tiny_args(data_dir, run_copy, "--batch_size=2")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    assert p.stderr.count(f"error: config key 'out_dir': {run_copy} already holds a run") == 2, p.stderr[-2000:]
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),  # torch.save's own words for it:
                                   RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")])
def test_failed_checkpoint_write_keeps_the_previous_one(error, data_dir, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def disk_full(obj, f, *args, **kwargs):  # the second checkpoint (step 4) runs out of space half-way
        calls.append(obj["step"])
        if len(calls) == 2:
            f.write(b"PK\x03\x04" + bytes(4096))
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    with pytest.raises(WriteError) as e:
        train.main(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    msg = str(e.value)
    assert f"step-4 checkpoint {out / 'ckpt.pt'}" in msg and str(error) in msg
    assert f"the checkpoint {out / 'ckpt.pt'} (step 2) is kept" in msg and "--resume" in msg
    assert calls == [2, 4]
    assert not (out / "ckpt.pt.tmp").exists()
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


def test_keep_checkpoints_and_roll_back(data_dir, tmp_path):
    """keep_checkpoints=2 keeps ckpt_<step>.pt of the last two evals; resuming from the older one replays
    the same steps (bit for bit on CPU) and replaces the later one."""
    out = tmp_path / "run"
    common = ["--max_iters=6", "--eval_interval=2", "--keep_checkpoints=2", "--dropout=0.1"]
    train.main(tiny_args(data_dir, out, *common))
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt.pt", "ckpt_4.pt", "ckpt_6.pt"]
    assert torch.load(out / "ckpt_4.pt", weights_only=False)["step"] == 4
    assert (out / "ckpt.pt").read_bytes() == (out / "ckpt_6.pt").read_bytes()
    first = torch.load(out / "ckpt_6.pt", weights_only=False)["model"]
    evals = [r for r in read_log(out) if r["type"] == "eval"]
    train.main(tiny_args(data_dir, out, *common, "--resume_from=ckpt_4.pt"))
    again = torch.load(out / "ckpt_6.pt", weights_only=False)
    assert again["step"] == 6 and torch.load(out / "ckpt_4.pt", weights_only=False)["step"] == 4
    for k, v in first.items():
        assert torch.equal(v, again["model"][k]), k
    log = read_log(out)
    assert [r for r in log if r["type"] == "eval"] == evals  # the step-6 eval once, not twice
    assert log[-1]["type"] == "eval" and [r["type"] for r in log].count("resume") == 1


def test_resume_from_another_run(data_dir, base_run, tmp_path):
    """--resume_from=<a run's out_dir> forks it into a new out_dir, leaving the original untouched."""
    before = snapshot(base_run)
    fork = tmp_path / "fork"
    train.main(tiny_args(data_dir, fork, "--max_iters=6", f"--resume_from={base_run}"))
    assert [r["type"] for r in read_log(fork)][0] == "resume" and read_log(fork)[0]["step"] == 5
    assert torch.load(fork / "ckpt.pt", weights_only=False)["step"] == 6
    assert snapshot(base_run) == before


def test_resume_without_checkpoint(data_dir, run_copy, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint at .*new/ckpt.pt; drop --resume to start a new run"):
        train.main(tiny_args(data_dir, tmp_path / "new", "--resume"))
    assert not (tmp_path / "new").exists()  # nothing made
    with pytest.raises(ConfigError, match=r"no checkpoint at .*ckpt_9.pt \(.*run holds ckpt.pt; pick one with"):
        train.main(tiny_args(data_dir, run_copy, "--resume_from=ckpt_9.pt"))
    with pytest.raises(ConfigError, match="'resume_from' is set but .*gone.pt; drop --resume_from to start"):
        train.main(tiny_args(data_dir, tmp_path / "new", "--resume_from=gone.pt"))


def test_keep_checkpoints_needs_checkpoints(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="'keep_checkpoints' needs checkpoints"):
        train.main(tiny_args(data_dir, tmp_path / "o", "--keep_checkpoints=3", "--checkpoint=False"))


KILLER = """
import os, signal, sys
import torch
sys.path.insert(0, os.getcwd())
import train
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):  # SIGKILL half-way through writing the second checkpoint
    calls.append(1)
    if len(calls) == 2:
        f.write(b"PK\\x03\\x04" + bytes(4096))
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
train.main(sys.argv[1:])
"""


def test_killed_during_checkpoint_write_resumes_exactly(data_dir, tmp_path, capsys):
    common = ["--scheme=hc", "--dropout=0.1", "--max_iters=6", "--eval_interval=3"]
    full = tmp_path / "full"
    train.main(tiny_args(data_dir, full, *common))
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", KILLER, *tiny_args(data_dir, out, *common)], cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "ckpt.pt.tmp").stat().st_size == 4100  # the partial write, under its temporary name
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 3
    with open(out / "log.jsonl", "a") as f:  # and a log line cut by the kill
        f.write('{"type": "train", "step": 7, "lo')
    capsys.readouterr()
    train.main(tiny_args(data_dir, out, *common, "--resume"))  # the killed run's lock died with it
    printed = capsys.readouterr()
    assert "log.jsonl: dropping its last line, cut by a crash" in printed.err   # stderr: stdout stays the run's
    stdout = printed.out
    assert f"resumed from step 3 ({out / 'ckpt.pt'})" in stdout
    assert stdout.index("resumed from step 3") < stdout.index("step      4 |")
    assert not (out / "ckpt.pt.tmp").exists()

    def records(run):
        return [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(run)
                if r["type"] in ("train", "eval")]

    assert records(out) == records(full)
    a = torch.load(full / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(out / "ckpt.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_read_log_cut_and_corrupt_lines(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"type": "config"}\n{"type": "eval", "step": 5}\n{"type": "tr')
    assert rundir.read_log(str(path)) == [{"type": "config"}, {"type": "eval", "step": 5}]
    assert "dropping its last line" in capsys.readouterr().err
    path.write_text('{"type": "config"}\nnot json\n{"type": "eval", "step": 5}\n')
    with pytest.raises(ConfigError, match=r"log.jsonl, line 2 is not a JSON record; remove or repair that line"):
        rundir.read_log(str(path))


# ---- bad inputs: one clear message each, before any training ----

def test_bad_config_files(tmp_path):
    bad = tmp_path / "syntax.py"
    bad.write_text("n_layer = 4\nlearning_rate = = 1e-3\n")
    with pytest.raises(ConfigError, match=rf"config file '{bad}', line 2: syntax error"):
        train.main([str(bad)])
    with pytest.raises(ConfigError, match=rf"config file '{tmp_path}' is a directory"):
        train.main([str(tmp_path)])
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"n_layer = 2\x00\xff\n")
    with pytest.raises(ConfigError, match=rf"config file '{binary}'.*(cannot be read|syntax error)"):
        train.main([str(binary)])
    raising = tmp_path / "raises.py"
    raising.write_text("n_layer = 4\nn_embd = n_layer * undefined_name\n")
    with pytest.raises(ConfigError, match=rf"config file '{raising}', line 2 raised NameError: .*undefined_name"):
        train.main([str(raising)])


def test_empty_dataset(tmp_path):
    with pytest.raises(ConfigError, match="'dataset' is empty; name a prepared dataset"):
        train.main(["--dataset=", f"--out_dir={tmp_path / 'o'}"])


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range(seed, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'seed' must be in \[0, 2\*\*31\)"):
        train.main(tiny_args(data_dir, tmp_path / "o", f"--seed={seed}"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage,message", [
    ("truncate", "is not a readable checkpoint"),
    ("random", "is not a readable checkpoint"),
    ("foreign", r"is not a train.py checkpoint \(no model, model_config, step\)"),
])
def test_bad_checkpoint_on_resume(damage, message, data_dir, run_copy):
    ckpt = run_copy / "ckpt.pt"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    elif damage == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        torch.save({"state_dict": {}}, ckpt)
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match=rf"'resume': {ckpt} {message}"):
        train.main(tiny_args(data_dir, run_copy, "--resume", "--max_iters=6"))
    assert snapshot(run_copy) == before


def test_resume_with_other_seed_or_data(data_dir, run_copy, tmp_path):
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match="'seed' is 7 but the checkpoint's run used 1337.*resume with --seed=1337"):
        train.main(tiny_args(data_dir, run_copy, "--resume", "--max_iters=6", "--seed=7"))
    other = data_copy(data_dir, tmp_path)
    meta = json.loads((other / "meta.json").read_text())
    meta["fingerprint"]["val_fraction"] = 0.5  # prepared with other settings
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=f"trained on other data .*resume with --data_dir={data_dir}"):
        train.main(tiny_args(str(other), run_copy, "--resume", "--max_iters=6"))
    assert snapshot(run_copy) == before
    moved = data_copy(data_dir, tmp_path / "moved")  # the same data in another place is fine
    train.main(tiny_args(str(moved), run_copy, "--resume", "--max_iters=6"))
    assert torch.load(run_copy / "ckpt.pt", weights_only=False)["step"] == 6


def test_meta_json_not_an_object(data_dir, tmp_path):
    bad = data_copy(data_dir, tmp_path)
    (bad / "meta.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=rf"{bad}/meta.json is not a JSON object .*prepare.py"):
        train.main(tiny_args(str(bad), tmp_path / "o"))


def test_token_id_above_vocab(data_dir, tmp_path):
    bad = data_copy(data_dir, tmp_path)
    shard = next(bad.glob("train_*.bin"))
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=shards.HEADER_BYTES)
    tokens[1234] = 60000  # above GPT-2's 50257
    tokens.flush()
    del tokens
    with pytest.raises(ConfigError, match=rf"shard {shard}: token id 60000 >= vocab_size 50257 .*position 1234.*"
                                          rf"prepare.py pydocs --out-dir {bad} --restart"):
        train.main(tiny_args(str(bad), tmp_path / "o"))
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_out_dir_not_writable(data_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("notes")
    with pytest.raises(ConfigError, match=f"'out_dir': {afile} is a file, not a directory"):
        train.main(tiny_args(data_dir, afile))
    with pytest.raises(ConfigError, match=f"'out_dir': cannot write in {afile}/run .*writable --out_dir"):
        train.main(tiny_args(data_dir, afile / "run"))
    assert afile.read_text() == "notes"


def test_out_dir_read_only(data_dir, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through the mode bits: the file system refuses instead, as a read-only mount

        def read_only(directory, *args):
            raise OSError(errno.EROFS, "Read-only file system", str(directory))
        monkeypatch.setattr(rundir, "dir_lock", read_only)
    try:
        with pytest.raises(ConfigError, match=f"'out_dir': cannot write in {ro} .*writable --out_dir"):
            train.main(tiny_args(data_dir, ro))
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_wandb_online_without_key(data_dir, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="'wandb_mode' is 'online' but no wandb API key.*`wandb login`.*"
                                          "--wandb_mode=offline"):
        train.main(tiny_args(data_dir, out, "--wandb_log=True"))
    assert not (out / "log.jsonl").exists()  # refused before any training
    wc = tracking.WandbConfig(wandb_log=True)
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    tracking.check_wandb(wc)  # a key in .netrc (what `wandb login` writes) is enough
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    tracking.check_wandb(wc)


# ---- usability ----

def test_help_lists_every_key(capsys):
    assert train.main(["--help"]) is None
    text = capsys.readouterr().out
    assert text.startswith("usage: python train.py")
    rows = {}
    for line in text.splitlines():
        if line.startswith("  --"):
            key, _, rest = line.strip()[2:].partition("=")
            default, _, meaning = rest.partition(" ")
            rows[key] = (default, meaning.strip())
    assert set(rows) == set(config.DEFAULTS)
    assert all(meaning for _, meaning in rows.values()), [k for k, (_, m) in rows.items() if not m]
    assert rows["max_iters"] == ("10000", "optimizer steps in the run; -1 -> from param_data_ratio (nanochat's num_iterations=-1)")
    assert rows["scheme"][0] == "plain" and rows["out_dir"][0] == '""' and rows["kron_factors"][0] == "None"
    assert "keep_checkpoints" in rows and "data (data/loader.py):" in text.splitlines()
    train.main(["-h", "--n_layr=3"])  # help wins over a bad argument
    assert capsys.readouterr().out == text


def test_summary_and_eta_lines(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4 and all(" | eta " in line for line in steps)
    assert steps[-1].endswith("| eta 0s")
    last_eval = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert lines[-1].startswith("done: step 4, 512 tokens, ")
    assert lines[-1].endswith(f"| val loss {last_eval['val_loss']:.4f} | val bpb {last_eval['val_bpb']:.4f} | "
                              f"checkpoint {out / 'ckpt.pt'}")


def test_fmt_time():
    assert [common.fmt_time(s) for s in (0, 59.9, 61, 3599, 3600, 7322)] == ["0s", "59s", "1m01s", "59m59s", "1h00m",
                                                                             "2h02m"]


def test_sweep_process_count_and_divisibility(capsys, monkeypatch, tmp_path):
    import shlex
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import sweep
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.main(["--configs", "configs/quickstart.py", "--schemes", "plain", "kromhc", "--out_root",
                       str(tmp_path)]) == 0  # an empty out root: every command starts its run
    lines = capsys.readouterr().out.strip().splitlines()
    python = shlex.quote(sys.executable)  # this Python: a job script need not activate the venv
    assert len(lines) == 2 and all(line.startswith(f"{python} train.py configs/quickstart.py ") for line in lines)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--configs", "configs/quickstart.py", "--schemes", "plain", "--nproc", "8"])
    assert e.value.code == 2
    err = capsys.readouterr()
    assert err.out == ""  # nothing printed that would fail
    assert ("configs/quickstart.py: total_batch_tokens (2048) is not divisible by batch_size x block_size x "
            "processes = 16 x 128 x 8; pass --nproc (x --nnodes) for 1 process(es) in all") in err.err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 4-GPU node: GPU configs use every GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert sweep.main(["--configs", "configs/fwe_s.py", "--schemes", "plain"]) == 0
    assert capsys.readouterr().out.startswith(f"{python} -m torch.distributed.run --standalone --nproc_per_node=4 "
                                              f"train.py configs/fwe_s.py ")
    assert sweep.main(["--configs", "configs/quickstart.py", "--schemes", "plain", "--out_root", str(tmp_path)]) == 0
    # a CPU config: one process
    assert capsys.readouterr().out.startswith(f"{python} train.py configs/quickstart.py ")


def test_cli_bad_input_is_one_line(data_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    p = subprocess.run([sys.executable, "train.py", *tiny_args(data_dir, afile)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: config key 'out_dir': {afile} is a file, not a directory; "
                                             f"pass another --out_dir"]


def test_ctrl_c_ends_in_one_line(data_dir, tmp_path):
    # A shell that starts the tests in the background (`pytest &`, some CI runners) ignores SIGINT, and a
    # child inherits that: the run is given Ctrl-C's default disposition, as in a terminal.
    p = subprocess.Popen([sys.executable, "-u", "train.py", *tiny_args(data_dir, tmp_path / "o", "--max_iters=100000",
                                                                        "--eval_interval=100000")],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:  # wait until it trains
            if line.startswith("step "):
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert err.strip() == "interrupted; continue from the last checkpoint, if any, with the same command and --resume"
