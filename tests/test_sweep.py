"""scripts/sweep.py: a sweep finished by rerunning it (finished runs skipped, started ones resumed, ones stopped
before their first checkpoint restarted, missing ones started), a summary, failures and Ctrl-C, this Python for
the runs, paths from the current directory, distinct names for configs of one file name, every command checked
by train.py's rules before anything prints, a config's own data_seed."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import read_log
from errors import HcgptError
from scripts import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = shlex.quote(sys.executable)


def tiny_config(path, data_dir, **extra):
    """A config file for 4 steps of a 2-layer, 32-wide model on CPU (evals and checkpoints at steps 2 and 4)."""
    keys = dict(data_dir=data_dir, device="cpu", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                total_batch_tokens=128, eval_tokens=512, eval_interval=2, log_interval=1, warmup_iters=2,
                learning_rate=1e-2, max_iters=4, **extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in keys.items()))
    return str(path)


def printed(capsys, *argv):
    """The sweep's printed commands, [(train.py's arguments, the comment)] (a finished run's: ([], comment)), and
    what it said on stderr."""
    assert sweep.main(list(argv)) == 0
    out, cmds = capsys.readouterr(), []
    for line in out.out.splitlines():
        cmd, _, comment = line.partition("# ")
        words = shlex.split(cmd)
        cmds.append((words[words.index(sweep.shown(sweep.TRAIN)) + 1:] if words else [], comment))
    return cmds, out.err


def in_process(cmd):
    """sweep.launch, with train.py run in this process (quick; the real launch is tested on its own)."""
    assert cmd[:2] == [sys.executable, sweep.shown(sweep.TRAIN)]
    try:
        train.main(cmd[2:])
    except HcgptError:
        return 1, False
    return 0, False


def evals(out_dir):
    return [r["step"] for r in read_log(out_dir) if r["type"] == "eval"]


def test_a_sweep_runs_with_this_python_from_another_directory(data_dir, tmp_path, capsys, monkeypatch):
    """--run from another directory, with relative --configs and --out_root, without the venv on PATH: the run
    uses this Python (a `python` or `torchrun` on PATH would fail it) and lands under that directory; the same
    command again skips it as finished."""
    work, fake_bin = tmp_path / "work", tmp_path / "bin"
    tiny_config(work / "cfg" / "tiny.py", data_dir)
    fake_bin.mkdir()
    for exe in ("python", "python3", "torchrun"):  # what a sweep that took them from PATH would start
        (fake_bin / exe).write_text("#!/bin/sh\necho wrong interpreter >&2\nexit 3\n")
        (fake_bin / exe).chmod(0o755)
    argv = ["--configs", "cfg/tiny.py", "--schemes", "plain", "--seeds", "1", "--out_root", "runs", "--run"]
    env = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin"}
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"), *argv], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out_dir = work / "runs" / "tiny-plain-n1-s0-d0"
    assert evals(out_dir) == [0, 2, 4]
    assert f"sweep: run 1/1: start: {PYTHON} {shlex.quote(sweep.TRAIN)} cfg/tiny.py --scheme=plain " in p.stdout
    assert "sweep: 1 run(s) under runs:\n  started  runs/tiny-plain-n1-s0-d0\n" in p.stdout
    assert "wrong interpreter" not in p.stderr and "Traceback" not in p.stderr
    monkeypatch.chdir(work)  # the same command again, here: nothing to run
    monkeypatch.setattr(sweep, "launch", lambda cmd: pytest.fail(f"ran {cmd}"))
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "sweep: run 1/1: skip, finished at step 4: runs/tiny-plain-n1-s0-d0" in out
    assert "  skipped, finished at step 4  runs/tiny-plain-n1-s0-d0\nsweep: every run finished" in out


def test_an_interrupted_sweep_is_finished_by_running_it_again(data_dir, tmp_path, capsys, monkeypatch):
    """Four runs left as a stopped sweep leaves them: finished, stopped after its step-2 checkpoint, stopped at
    step 2 before any checkpoint (a log alone), never started. The printed commands say so; --run skips the
    first, resumes the second, restarts the third and starts the fourth; all four then end at step 4."""
    config = tiny_config(tmp_path / "tiny.py", data_dir)
    argv = ["--configs", config, "--schemes", "plain", "--seeds", "4", "--out_root", str(tmp_path / "out"),
            "--nproc", "0"]
    cmds, _ = printed(capsys, *argv)
    assert [c for _, c in cmds] == ["start"] * 4
    outs = [tmp_path / "out" / f"tiny-plain-n1-s{s}-d0" for s in range(4)]
    save = train.save

    def stop_at_step_2(after_checkpoint):
        def patched(c, rt, run, step, *a):
            if step == 2 and not after_checkpoint:
                raise KeyboardInterrupt
            saved = save(c, rt, run, step, *a)
            if step == 2:
                raise KeyboardInterrupt
            return saved
        return patched

    train.main(cmds[0][0])
    for k, after_checkpoint in ((1, True), (2, False)):
        monkeypatch.setattr(train, "save", stop_at_step_2(after_checkpoint))
        with pytest.raises(KeyboardInterrupt):
            train.main(cmds[k][0])
    monkeypatch.setattr(train, "save", save)
    assert [os.path.exists(o / "ckpt.pt") for o in outs] == [True, True, False, False]
    finished_log = (outs[0] / "log.jsonl").read_bytes()
    capsys.readouterr()  # the runs' own output

    cmds, err = printed(capsys, *argv)
    assert [c for _, c in cmds] == [f"skip, finished at step 4: {outs[0]}", "resume: stopped at step 2 of 4",
                                    "restart: stopped at step 2 of 4 without a checkpoint", "start"]
    assert cmds[0][0] == [] and cmds[1][0][-1] == "--resume" and cmds[2][0][-1] == "--overwrite=True"
    assert "1 to start, 1 to resume, 1 to restart, 1 finished (skipped)" in err

    monkeypatch.setattr(sweep, "launch", in_process)
    assert sweep.main([*argv, "--run"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("sweep: 4 run(s) under"):].splitlines()
    assert [line.split("  ")[1] for line in summary[1:5]] == ["skipped, finished at step 4", "resumed", "restarted",
                                                              "started"]
    assert (outs[0] / "log.jsonl").read_bytes() == finished_log  # kept as it was
    assert [evals(o) for o in outs] == [[0, 2, 4]] * 4
    assert [r["type"] for r in read_log(outs[1]) if r["type"] in ("config", "resume")] == ["config", "resume"]
    assert [r["type"] for r in read_log(outs[2]) if r["type"] in ("config", "resume")] == ["config"]
    assert not os.path.exists(outs[2] / ".overwritten")  # the stopped run's log, deleted at the first checkpoint

    # a config edited since: its runs there are of another setting, and nothing prints
    tiny_config(tmp_path / "tiny.py", data_dir, dropout=0.1)
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    err = capsys.readouterr()
    assert e.value.code == 2 and err.out == ""
    assert f"{outs[0]} holds a run of another setting (dropout: 0.0 there, 0.1 now); pick another --out_root" in err.err


@pytest.mark.parametrize("stop", [False, True])
def test_a_failed_run_does_not_stop_the_others_unless_asked(stop, data_dir, tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path / "tiny.py", data_dir)
    monkeypatch.chdir(tmp_path)
    statuses, ran = iter([0, 1, -signal.SIGKILL]), []
    monkeypatch.setattr(sweep, "launch", lambda cmd: ran.append(cmd) or (next(statuses), False))
    argv = ["--configs", config, "--schemes", "plain", "--seeds", "3", "--out_root", "out", "--run"]
    assert sweep.main(argv + ["--stop-on-failure"] * stop) == 1
    out = capsys.readouterr()
    summary = out.out[out.out.index("sweep: 3 run(s) under out:"):].splitlines()
    assert [line.split("  ")[1] for line in summary[1:4]] == ["started", "failed (exit status 1)",
                                                              "not run" if stop else "failed (killed by SIGKILL)"]
    assert len(ran) == 2 + (not stop)
    assert f"sweep: {1 + (not stop)} run(s) failed (their errors are above); fix the cause and rerun" in out.err
    assert "compare and plot" not in out.out  # not before the runs are all there


@pytest.mark.parametrize("sent_to,foreground,pass_on_s", [
    ("terminal", True, 0),       # Ctrl-C: the terminal's foreground group, the sweep and its run, gets it
    ("group", False, 60),        # kill -INT -<group> (a job's cancel): the run ends on it well before 60 s
    ("sweep", False, 0)])        # kill -INT <sweep>: the run did not get it
def test_ctrl_c_stops_the_run_and_the_sweep_without_a_traceback(sent_to, foreground, pass_on_s, data_dir, tmp_path,
                                                                 capsys, monkeypatch):
    """The run gets the SIGINT once (never twice at once, which would cut its own cleanup short): from the terminal
    or its process group, or passed on by the sweep when it alone got it; the sweep waits for the run to end as
    train.py does on Ctrl-C, starts no other, and says how to continue."""
    config = tiny_config(tmp_path / "tiny.py", data_dir)
    children = []

    class Child:   # a run that ends on SIGINT, from the terminal (foreground) or from the sweep
        pid = 12345

        def __init__(self, cmd):
            self.signals, self.waits = [], 0
            self.ends_at = 3 if sent_to != "sweep" else float("inf")   # a run takes a while to stop
            children.append(self)

        def send_signal(self, sig):
            self.signals.append(sig)
            self.ends_at = min(self.ends_at, self.waits + 2)

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run trains: the sweep's handler runs now
                time.sleep(0.01)
            if self.waits >= self.ends_at:
                return 130   # train.py's status on Ctrl-C
            assert self.waits < 8, "the SIGINT was not passed on to the run"
            raise subprocess.TimeoutExpired("train.py", timeout)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep.subprocess, "Popen", Child)
    monkeypatch.setattr(sweep, "foreground", lambda: foreground)
    monkeypatch.setattr(sweep, "PASS_ON_S", pass_on_s)
    previous = signal.getsignal(signal.SIGINT)
    argv = ["--configs", config, "--schemes", "plain", "--seeds", "3", "--out_root", "out", "--run"]
    assert sweep.main(argv) == 130
    out = capsys.readouterr()
    assert len(children) == 1
    assert children[0].signals == ([signal.SIGINT] if sent_to == "sweep" else [])  # once, not twice
    assert signal.getsignal(signal.SIGINT) is previous
    summary = out.out[out.out.index("sweep: 3 run(s) under out:"):].splitlines()
    assert [line.split("  ")[1] for line in summary[1:4]] == ["interrupted", "not run", "not run"]
    assert (f"sweep: interrupted at run 1/3 (out/tiny-plain-n1-s0-d0); to continue, rerun "
            f"{PYTHON} {shlex.quote(sweep.shown(sweep.__file__))} {shlex.join(argv)}") in out.err


def test_configs_of_one_file_name_get_distinct_names(data_dir, tmp_path, capsys):
    a = tiny_config(tmp_path / "a" / "base.py", data_dir)
    b = tiny_config(tmp_path / "b" / "base.py", data_dir)
    c = tiny_config(tmp_path / "c" / "other.py", data_dir)
    again = os.path.join(tmp_path, "a", ".", "base.py")  # a second spelling of a: one config
    cmds, _ = printed(capsys, "--configs", a, b, c, again, "--schemes", "plain", "--out_root", str(tmp_path / "out"))
    names = [next(w for w in args if w.startswith("--wandb_run_name=")).split("=", 1)[1] for args, _ in cmds]
    assert names == ["a_base-plain-n1-s0-d0", "b_base-plain-n1-s0-d0", "other-plain-n1-s0-d0"]
    assert [args[0] for args, _ in cmds] == [a, b, c]


def test_every_command_is_checked_by_train_rules_before_anything_prints(data_dir, tmp_path, capsys):
    config = tiny_config(tmp_path / "tiny.py", data_dir)
    base = ["--configs", config, "--schemes", "plain"]
    for argv, needle in [
            (["--data_seed", "-3"], "--data_seed: config key 'data_seed' must be in [0, 2**31), or -1 for the seed, "
                                    "got -3"),
            (["--data_seed", "-1"], "pass --vary_data for that"),
            (["--", "--dropout=1.5"], "config key 'dropout' must be"),
            # a rule between two keys, seen only in the run's whole config
            (["--", "--keep_checkpoints=2", "--checkpoint=False"], "'keep_checkpoints' needs checkpoints"),
            (["--", "--resume"], "--resume after `--`: the sweep resumes a started run"),
            (["--", "--overwrite=True"], "drop it (to redo a finished run, move its out_dir away)")]:
        with pytest.raises(SystemExit) as e:
            sweep.main(base + argv)
        out = capsys.readouterr()
        assert e.value.code == 2 and needle in out.err and out.out == "", (argv, out.err)


def test_a_config_keeps_its_own_data_seed(data_dir, tmp_path, capsys):
    """A config file's data_seed is its runs' data order (named -d<it>); --vary_data replaces it, with a note."""
    config = tiny_config(tmp_path / "tiny.py", data_dir, data_seed=7)
    base = ["--configs", config, "--schemes", "plain", "--seeds", "2", "--out_root", str(tmp_path / "out")]
    cmds, _ = printed(capsys, *base)
    assert [[w for w in args if w.startswith(("--data_seed=", "--wandb_run_name="))] for args, _ in cmds] == [
        ["--data_seed=7", f"--wandb_run_name=tiny-plain-n1-s{s}-d7"] for s in (0, 1)]
    cmds, err = printed(capsys, *base, "--vary_data")
    assert [w for args, _ in cmds for w in args if w.startswith("--data_seed=")] == ["--data_seed=0", "--data_seed=1"]
    assert f"sweep: note: {config} sets data_seed = 7; --vary_data replaces it" in err
