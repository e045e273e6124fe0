"""A run's files are never mixed, overwritten by a tool or lost: a continuation into another run's out_dir,
a run stopped before its first checkpoint (advice that works when followed), a failed log or results write
(one line, the checkpoint kept), a damaged or non-finite checkpoint (refused on load, left as it is), a
non-finite val loss (never checkpointed), ranks started with different settings, a tool's output path on
a run's own file."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import checkpoint
import evals.training
import rendezvous
import rundir
import train
from common import nonfinite_message
from conftest import read_log, snapshot, tiny_args
from errors import CheckpointError, ConfigError, DistributedSetupError, Diverged, WriteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) that tests copy, never touch."""
    out = tmp_path_factory.mktemp("writes") / "run"
    train.main(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    return out


# ---- continuing a run into another's out_dir ----

def test_resume_from_into_a_dir_holding_another_run(data_dir, base_run, run_copy, tmp_path):
    """--resume_from=<run A> --out_dir=<run B>: refused while B holds a run (the two logs would mix), with the
    fixes named; --overwrite=True replaces B's run by the continuation, and A is never touched."""
    other = tmp_path / "other"
    train.main(tiny_args(data_dir, other, "--max_iters=2", "--eval_interval=2", "--seed=7"))
    before_b, before_a = snapshot(other), snapshot(base_run)
    with pytest.raises(ConfigError) as e:
        train.main(tiny_args(data_dir, other, "--max_iters=6", "--eval_interval=2", f"--resume_from={base_run}"))
    msg = str(e.value)
    assert f"{other} already holds a run that reached step 2" in msg and "would mix the two runs" in msg
    assert "empty --out_dir" in msg and "--resume in place of --resume_from" in msg and "--overwrite=True" in msg
    assert snapshot(other) == before_b
    train.main(tiny_args(data_dir, other, "--max_iters=6", "--eval_interval=2", f"--resume_from={base_run}",
                         "--overwrite=True"))   # the fix, followed
    log = read_log(other)
    assert [r["type"] for r in log][0] == "resume" and log[0]["step"] == 4 and log[0]["seed"] != 7
    assert not any(r["type"] == "config" for r in log)   # nothing of the seed-7 run is left
    assert torch.load(other / "ckpt.pt", weights_only=False)["step"] == 6
    assert snapshot(base_run) == before_a
    # in place: the run's own checkpoint by name and --overwrite contradict; by name alone it continues
    with pytest.raises(ConfigError, match="'resume' and 'overwrite' contradict"):
        train.main(tiny_args(data_dir, run_copy, "--resume_from=ckpt.pt", "--overwrite=True", "--max_iters=6"))


def test_run_stopped_before_its_first_checkpoint(data_dir, run_copy):
    """Only a log (killed before the first checkpoint): neither refusal sends the user to the other one, and
    the advice they give, followed, starts the run."""
    for f in run_copy.glob("ckpt*.pt"):
        f.unlink()
    before = snapshot(run_copy)
    with pytest.raises(ConfigError) as plain:
        train.main(tiny_args(data_dir, run_copy, "--max_iters=2"))
    with pytest.raises(ConfigError) as resumed:
        train.main(tiny_args(data_dir, run_copy, "--max_iters=2", "--resume"))
    for e in (plain, resumed):
        msg = str(e.value)
        assert "before its first checkpoint" in msg and "--overwrite=True" in msg, msg
        assert "continue it with --resume" not in msg and "drop --resume" not in msg, msg
    assert snapshot(run_copy) == before
    train.main(tiny_args(data_dir, run_copy, "--max_iters=2", "--eval_interval=2", "--overwrite=True"))
    assert torch.load(run_copy / "ckpt.pt", weights_only=False)["step"] == 2


# ---- a write that fails: one line, the path, the cause, the checkpoint kept ----

def failing_open(after, path_end="log.jsonl"):
    """rundir's open, failing with ENOSPC on the (after+1)-th opening of log.jsonl."""
    calls = []

    def fake(path, *args, **kwargs):
        if str(path).endswith(path_end):
            calls.append(path)
            if len(calls) > after:
                raise OSError(28, "No space left on device")
        return open(path, *args, **kwargs)
    return fake


def test_failed_log_write_mid_run_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # log.jsonl opened for the header, then once per record: the step-3 train record fails (log_interval=1)
    monkeypatch.setattr(rundir, "open", failing_open(after=5), raising=False)
    with pytest.raises(WriteError) as e:
        train.main(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=2"))
    msg = str(e.value)
    assert f"could not write {out / 'log.jsonl'} (No space left on device)" in msg
    assert f"the checkpoint {out / 'ckpt.pt'} (step 2) is kept" in msg and "--resume" in msg
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2
    monkeypatch.undo()
    train.main(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=2", "--resume"))  # the advice works
    assert max(r["step"] for r in read_log(out) if "step" in r) == 4


DISK_FULL = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import rundir
def full(path, *args, **kwargs):  # every write of log.jsonl fails as on a full disk
    if str(path).endswith("log.jsonl"):
        raise OSError(28, "No space left on device")
    return open(path, *args, **kwargs)
rundir.open = full
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_failed_log_write_at_start_is_one_line(data_dir, tmp_path):
    """train.py on the command line, its log unwritable from the start: one line, exit status 1."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", DISK_FULL, *tiny_args(data_dir, out, "--max_iters=2")], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert p.stderr.strip().splitlines() == [
        f"error: could not write {out / 'log.jsonl'} (No space left on device); no checkpoint of this run was "
        f"written yet, so there is nothing to resume: free space / fix permissions in {out}, then start the run "
        f"again with --overwrite=True"], p.stderr


def test_failed_results_write_is_one_line(data_dir, tmp_path, monkeypatch):
    """The end-of-run results file (hellaswag.json) goes through the same error path."""
    out = tmp_path / "run"
    hs = tmp_path / "hs.jsonl"
    item = {"ctx": "The cat", "endings": [" sat.", " ran.", " sang.", " flew."], "label": 0, "ind": 0,
            "activity_label": "x", "split": "val", "split_type": "indomain", "source_id": "a", "ctx_a": "The cat",
            "ctx_b": ""}
    hs.write_text(json.dumps(item) + "\n")
    real = evals.training.results.save

    def full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(evals.training.results, "save", full)
    with pytest.raises(WriteError, match=r"hellaswag.json .*No space left on device.*the checkpoint .*ckpt.pt "
                                         r"\(step 2\) is kept"):
        train.main(tiny_args(data_dir, out, "--max_iters=2", "--eval_interval=2", "--final_hellaswag=True",
                             f"--hellaswag_file={hs}"))
    assert real is not full and torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


# ---- checkpoints verified on load ----

def flip_data_byte(path):
    """One byte of a tensor's bytes changed, the zip's structure intact (what a bad disk or copy does)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # the local header: 30 bytes, then its own name and extra field (their lengths at bytes 26-29), then the data
    n, m = (int.from_bytes(raw[info.header_offset + i:info.header_offset + i + 2], "little") for i in (26, 28))
    start = info.header_offset + 30 + n + m
    raw[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return info.filename


def test_damaged_checkpoint_is_refused_and_kept(data_dir, run_copy):
    ckpt = run_copy / "ckpt.pt"
    name = flip_data_byte(ckpt)
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match=rf"'resume': {ckpt} is damaged: the bytes of {name} do not match the "
                                          rf"checksum.*left as it is"):
        train.main(tiny_args(data_dir, run_copy, "--resume", "--max_iters=6"))
    assert snapshot(run_copy) == before
    with pytest.raises(CheckpointError, match="is damaged"):   # the scripts' loader: the same check
        checkpoint.load_model(run_copy)


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_nonfinite_checkpoint_is_refused(where, run_copy):
    ckpt_path = run_copy / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    if where == "model":
        name = next(iter(ckpt["model"]))
        ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    else:
        state = next(iter(ckpt["optimizer"]["state"].values()))
        state["exp_avg"][..., 0] = float("inf")
        name = "optimizer state"
    torch.save(ckpt, ckpt_path)   # a valid zip: only the values are wrong
    with pytest.raises(CheckpointError, match=rf"holds non-finite values in .*{name.split()[0]}.*left as it is"):
        checkpoint.load(ckpt_path)


# ---- non-finite values ----

def test_nonfinite_val_loss_is_never_checkpointed(data_dir, tmp_path, monkeypatch):
    real = evals.training.val_loss_bpb

    calls = []

    def nan_at_step_4(model, *args, **kwargs):
        calls.append(1)
        loss, bpb = real(model, *args, **kwargs)
        return (float("nan"), float("nan")) if len(calls) == 3 else (loss, bpb)
    monkeypatch.setattr(evals.training, "val_loss_bpb", nan_at_step_4)   # evals at steps 0, 2, 4
    out = tmp_path / "run"
    with pytest.raises(Diverged) as e:
        train.main(tiny_args(data_dir, out, "--max_iters=6", "--eval_interval=2"))
    msg = str(e.value)
    assert "step 4: val loss is nan" in msg and f"last good checkpoint is {out / 'ckpt.pt'} (step 2)" in msg
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2
    log = read_log(out)
    assert log[-1]["type"] == "error" and log[-1]["step"] == 4
    assert not any(r["type"] == "eval" and r["step"] == 4 for r in log)


def test_first_step_nonfinite_is_not_blamed_on_the_learning_rate():
    first, later = ([1.0, float("nan"), 1.0], [5.0, float("nan"), 1.0])
    _, msg1 = nonfinite_message(first, 1, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), None, None)
    _, msg5 = nonfinite_message(later, 5, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), None, None)
    assert "learning rate is not the cause" in msg1 and "Lower learning_rate" not in msg1
    assert "Lower learning_rate" in msg5


# ---- ranks that disagree ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_with_different_settings_refuse_in_one_line(data_dir, tmp_path):
    """Two nodes launched with different flags (one rank each, as torchrun would start them): both stop at
    start naming the key, instead of hanging (other max_iters) or failing inside DDP (other schemes)."""
    port, procs = free_port(), []
    for rank, extra in enumerate(["--max_iters=3", "--max_iters=4"]):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HCGPT_RENDEZVOUS_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, "train.py", *tiny_args(data_dir, tmp_path / "run", extra)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 1, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        assert "different settings in the config (max_iters: 3 on rank 0, 4 on rank 1)" in err, err[-2000:]
    assert not (tmp_path / "run").exists()   # refused before anything was written


def test_world_size_without_rank_is_refused(monkeypatch):
    for k in rendezvous.TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE=2 is set but RANK is not"):
        rendezvous.torchrun_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rendezvous.torchrun_env() is None


# ---- tools never write over a run's own files ----

def test_check_output_guards_a_runs_files(base_run, tmp_path):
    for name in ("log.jsonl", "ckpt.pt", "ckpt_2.pt", "core.json"):
        with pytest.raises(ConfigError, match=rf"{base_run / name} is a file of the run in {base_run}"):
            rundir.check_output(str(base_run / name))
    rundir.check_output(str(base_run / "core.json"), own=("core.json",))   # the tool's own results file
    rundir.check_output(str(base_run / "lm_eval_x.json"), own=("lm_eval_*.json",))   # eval_lm's, by pattern
    with pytest.raises(ConfigError, match="is a file of the run"):
        rundir.check_output(str(base_run / "stories_judge.json"), own=("lm_eval_*.json",))
    rundir.check_output(str(base_run / "notes.json"))            # a new file beside the run
    rundir.check_output(str(tmp_path / "ckpt.pt"))    # a folder that is not a run (no log.jsonl): nothing to guard
    with pytest.raises(ConfigError, match="does not exist; create it"):
        rundir.check_output(str(tmp_path / "missing" / "out.json"))
    with pytest.raises(ConfigError, match="is a directory"):
        rundir.check_output(str(tmp_path))
    rundir.check_output("-")


def test_crosscheck_output_on_a_runs_log_is_refused_first(run_copy, capsys, monkeypatch):
    from scripts import crosscheck_hellaswag
    before = snapshot(run_copy)
    monkeypatch.setattr(crosscheck_hellaswag, "load_model", lambda *a: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit) as e:
        crosscheck_hellaswag.main([str(run_copy), "--output", str(run_copy / "log.jsonl"), "--device", "cpu"])
    assert e.value.code == 1 and "is a file of the run in" in capsys.readouterr().err
    assert snapshot(run_copy) == before
