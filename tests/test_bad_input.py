"""No command destroys a run, hangs, or is silently wrong: one test per root cause, over its cases.

    refusal after a destructive step  every check before out_dir's first write; --overwrite moves aside
    an unbounded rendezvous           HCGPT_RENDEZVOUS_TIMEOUT, the missing ranks named
    a loop or a library that assumed  resume past max_iters, betas, WANDB_MODE, wandb offline,
                                      sweep/bench flags: one line each, from the shared rule
    silently wrong                    counted tokens, sweep keys, `key: value`, "~", max_iters=0,
                                      keys a run ignores
    right error, wrong cause          the key that asked, the checkpoint that exists, the command that
                                      made the dataset, imports in configs, `key=value`, --out
"""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import configurator
import rundir
import tracking
import train
from errors import ConfigError
from conftest import read_log, tiny_args
from errors import WriteError
from errors import DistributedSetupError
import rendezvous

REPO = Path(__file__).resolve().parents[1]
TINY = ("--n_layer=1", "--max_iters=4", "--eval_interval=2")  # 1 layer, 32 wide, 4 steps
QUICKSTART = str(REPO / "configs" / "quickstart.py")


def snapshot(d):
    """{relative path: sha256} of every file under d but the lock."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob("*"))
            if p.is_file() and p.name != ".train.lock"}


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4, keep_checkpoints=1): copied, never touched."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(tiny_args(data_dir, out, *TINY, "--keep_checkpoints=1"))
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1. a refusal after the destructive step: every check comes before out_dir's first write ----

Usage = namedtuple("Usage", "total used free")
OVERWRITE_REFUSALS = {
    "kron_factors": (["--scheme=kromhc", "--kron_factors=(2,3)"], "kron_factors=(2, 3) do not fit n_streams=4"),
    "eval_tokens": (["--eval_tokens=10000000"], "lower eval_tokens (10000000)"),
    "diag_batch_size": (["--scheme=hc", "--diag_batch_size=5000"], "lower diag_batch_size (5000"),
    "fused on CPU": (["--scheme=mhc", "--fused=on"], "config key 'fused' is 'on' but the fused kernels cannot run"),
    "beta1": (["--beta1=1.5"], "'beta1' must be in [0, 1)"),
    "wandb without key": (["--wandb_log=True"], "no wandb API key"),
    "disk": ([], "a checkpoint of this model needs about"),
    "wandb unreachable": (["--wandb_log=True", "--wandb_mode=offline"], "wandb could not start the run"),
}


@pytest.mark.parametrize("case", OVERWRITE_REFUSALS)
def test_refused_overwrite_leaves_the_old_run(case, data_dir, run, monkeypatch, capsys):
    extra, message = OVERWRITE_REFUSALS[case]
    # no wandb key, and no Triton interpreter: the fused kernels cannot run on this CPU
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    if case == "disk":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    if case == "wandb unreachable":

        def unreachable(header, run_id=None, run_group=None):
            raise ConfigError("wandb could not start the run at http://127.0.0.1:9 within 1 s")
        monkeypatch.setattr(tracking, "start_wandb", unreachable)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train.main(tiny_args(data_dir, run, *TINY, "--overwrite=True", *extra))
    assert snapshot(run) == before
    assert "overwrite: moved" not in capsys.readouterr().out  # refused before out_dir was touched at all
    assert not (run / rundir.ASIDE).exists()


def test_overwrite_keeps_the_old_run_until_the_new_runs_first_checkpoint(data_dir, run, monkeypatch, capsys):
    old = snapshot(run)
    real_save, seen = torch.save, []

    def save(obj, f, *a, **kw):  # at the new run's first checkpoint the old run is aside, whole
        aside = run / rundir.ASIDE
        seen.append({k.split("/", 1)[1]: v for k, v in snapshot(aside).items()} if aside.exists() else None)
        if obj["step"] == 2 and len(seen) == 1:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WriteError, match="no checkpoint of this run was written yet"):
        train.main(tiny_args(data_dir, run, *TINY, "--overwrite=True", "--seed=7"))
    assert seen == [old]
    assert snapshot(run) == old and not (run / rundir.ASIDE).exists()  # moved back
    assert "is back in" in capsys.readouterr().out
    train.main(tiny_args(data_dir, run, *TINY, "--overwrite=True", "--seed=7"))
    assert seen[1:] == [old, None] and not (run / rundir.ASIDE).exists()  # deleted once the new run was on disk
    assert torch.load(run / "ckpt.pt", weights_only=False)["config"]["seed"] == 7
    assert sorted(p.name for p in run.iterdir()) == [".train.lock", "ckpt.pt", "log.jsonl"]  # nothing old mixed in
    # a run killed before its first checkpoint leaves the old one aside: the refusal points there
    (run / rundir.ASIDE / "20260101-000000").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"moved aside is in {run}/{rundir.ASIDE}/"):
        train.main(tiny_args(data_dir, run, *TINY))


# ---- 2. an unbounded rendezvous ----

@pytest.mark.parametrize("world_size,started,needle", [
    (2, [0], "rank(s) 1 of 2 did not join the rendezvous at 127.0.0.1:{port} within 1 s"),
    (2, [1], "the rendezvous at 127.0.0.1:{port} was not reachable within 1 s: rank 0 has not started"),
    (3, [0, 1], "rank(s) 2 of 3 did not join the rendezvous"),  # rank 1 hears it from rank 0
    (2, [0, 1], None),  # all there: the store of the process group
])
def test_rendezvous_ends_in_time_naming_what_is_missing(world_size, started, needle, monkeypatch):
    port = free_port()
    for k, v in dict(WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     HCGPT_RENDEZVOUS_TIMEOUT="1").items():
        monkeypatch.setenv(k, v)
    results = {}

    def join(rank):
        try:
            results[rank] = rendezvous.rendezvous(rank, world_size, "127.0.0.1", port)
        except DistributedSetupError as e:
            results[rank] = str(e)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=join, args=(r,)) for r in started]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.perf_counter() - t0 < 20 and set(results) == set(started)
    for rank, result in results.items():
        if needle is None:
            assert isinstance(result, torch.distributed.Store)
        else:
            assert result.startswith(f"rank {rank}: ") and needle.format(port=port) in result, result
            assert f"MASTER_PORT={port}" in result and "WORLD_SIZE=" in result


@pytest.mark.parametrize("env,needle", [
    (dict(RANK="0"), "RANK is set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not"),
    (dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_PORT="29533"), "RANK is set but MASTER_ADDR is not"),
    (dict(RANK="2", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1"), "need 0 <= LOCAL_RANK <="),
    (dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="two", MASTER_ADDR="h", MASTER_PORT="1"), "must be integers"),
])
def test_incomplete_torchrun_environment(env, needle, monkeypatch):
    for k in rendezvous.TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedSetupError, match=needle.replace("(", r"\(")):
        rendezvous.join("cpu")


def test_train_py_rendezvous_timeout_is_one_line(data_dir, tmp_path):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), HCGPT_RENDEZVOUS_TIMEOUT="1")
    p = subprocess.run([sys.executable, "train.py", *tiny_args(data_dir, tmp_path / "o")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: rank 0: rank(s) 1 of 2 did not join") and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---- 3. a loop or a library that assumed: one line from the rule that owns it ----

@pytest.mark.parametrize("max_iters", [4, 3])
def test_resume_with_nothing_left_to_train(max_iters, data_dir, run):
    before = snapshot(run)
    with pytest.raises(ConfigError, match=f"is at step 4 and max_iters is {max_iters}, so there is nothing left"):
        train.main(tiny_args(data_dir, run, *TINY, "--resume", f"--max_iters={max_iters}"))
    assert snapshot(run) == before  # no "resume" record appended


@pytest.mark.parametrize("key,value", [("beta1", 1.5), ("beta1", -0.1), ("beta2", 1.0)])
def test_betas_outside_0_1(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be in \[0, 1\), got {value}"):
        config.build(dict(config.DEFAULTS, **{key: value}))


@pytest.mark.parametrize("env,configured,mode,noted", [
    (None, "online", "online", False), ("offline", "online", "offline", True),
    ("disabled", "online", "disabled", True), ("dryrun", "online", "offline", True),
    ("online", "offline", "online", True), ("offline", "offline", "offline", False),
])
def test_wandb_mode_environment_wins(env, configured, mode, noted, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    wc = tracking.WandbConfig(wandb_log=True, wandb_mode=configured)
    assert bool(tracking.resolve_mode(wc)) == noted and wc.wandb_mode == mode
    if mode == "online":
        with pytest.raises(ConfigError, match="no wandb API key"):
            tracking.check_wandb(wc)
    else:
        tracking.check_wandb(wc)  # offline and disabled need no key
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' in the environment is not a wandb mode"):
        tracking.resolve_mode(tracking.WandbConfig(wandb_log=True))


def test_wandb_without_network_gives_up_in_time(tmp_path):
    """A key but no server: wandb.init ends after WANDB_INIT_TIMEOUT with a message naming offline mode."""
    env = dict(os.environ, WANDB_API_KEY="k" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",
               WANDB_INIT_TIMEOUT="1", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    env.pop("WANDB_MODE", None)
    code = ("import config, tracking\n"
            "try:\n    tracking.start_wandb(dict(config.DEFAULTS, wandb_log=True, wandb_run_name='x', setting='tiny',\n"
            "                                  config_name='default'))\n"
            "except tracking.ConfigError as e:\n    print(e)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert "wandb could not start the run at http://127.0.0.1:" in p.stdout and "within 1 s" in p.stdout
    assert "--wandb_mode=offline" in p.stdout and "WANDB_INIT_TIMEOUT" in p.stdout, p.stdout + p.stderr[-2000:]


@pytest.mark.parametrize("script,argv,needle", [
    ("sweep", ["--nnodes", "0"], "argument --nnodes: must be >= 1, got 0"),
    ("sweep", ["--nproc", "-2"], "argument --nproc: must be >= 0, got -2"),
    ("sweep", ["--seeds", "-5", "-4"], "config key 'seed' must be in [0, 2**31), got -5"),
    ("bench", ["--schemes", "mhc_lite", "--n-streams", "8"], "it takes n_streams <= 6"),
    ("bench", ["--schemes", "kromhc", "--n-streams", "1"], "needs n_streams >= 2"),
    ("bench", ["--schemes", "hc", "--fused", "on"], "config key 'fused' is 'on' but the fused kernels cannot run hc"),
])
def test_script_flags_share_train_rules(script, argv, needle, capsys, monkeypatch):
    from scripts import bench, sweep
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # no interpreter: fused='on' cannot run on this CPU
    main = {"sweep": lambda a: sweep.main(["--configs", QUICKSTART, *a]),
            "bench": lambda a: bench.main(["--device", "cpu", *a])}[script]
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and needle in out.err and out.out == "", out.err


# ---- 4. silently wrong ----

def test_tokens_are_counted_across_a_batch_change(data_dir, run, capsys):
    train.main(tiny_args(data_dir, run, *TINY, "--resume", "--max_iters=6", "--batch_size=2",
                         "--total_batch_tokens=64"))
    tokens = {r["step"]: r["tokens"] for r in read_log(run) if r.get("type") == "eval"}
    assert tokens == {0: 0, 2: 256, 4: 512, 6: 512 + 2 * 64}
    assert torch.load(run / "ckpt.pt", weights_only=False)["tokens"] == 640
    assert "done: step 6, 640 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("arg,flag", [("--scheme=hc", "--schemes"), ("--n_streams=8", "--n"), ("--seed=5", "--seeds"),
                                      ("--out_dir=X", "--out_root"), ("--wandb_run_name=x", "the sweep names")])
def test_sweep_refuses_keys_it_sets(arg, flag, capsys):
    from scripts import sweep
    with pytest.raises(SystemExit):
        sweep.main(["--configs", QUICKSTART, "--schemes", "plain", "kromhc", "--", arg])
    out = capsys.readouterr()
    assert f"{arg} after `--` would give every run of the sweep the same" in out.err and flag in out.err
    assert out.out == ""


@pytest.mark.parametrize("text,result", [("n_layer: 2\n", "line 1: `n_layer: 2` is an annotation"),
                                         ("x = 1\nn_layer: int\n", "line 2"), ("n_layer: int = 2\n", 2)])
def test_annotation_in_a_config_file(text, result, tmp_path):
    f = tmp_path / "c.py"
    f.write_text(text)
    if isinstance(result, int):
        assert configurator.load(config.KEYS, [str(f)])["n_layer"] == result
    else:
        with pytest.raises(ConfigError, match=result):
            configurator.load(config.KEYS, [str(f)])


def test_paths_expand_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    paths = [k for k, key in config.KEYS.items() if key.path]
    assert set(paths) == {"out_dir", "data_dir", "resume_from", "hellaswag_file", "core_bundle_dir"}
    flat = config.flat(config.build(dict(config.DEFAULTS, **{k: f"~/{k}" for k in paths})))
    assert all(flat[k] == os.path.join(str(tmp_path), k) for k in paths)


def test_max_iters_0_and_ignored_keys_said_once(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    train.main(tiny_args(data_dir, out, "--n_layer=1", "--max_iters=0", "--scheme=mhc", "--kron_factors=(2,2)",
                         "--hc_optimizer=muon"))
    text = capsys.readouterr().out
    assert text.splitlines()[-1].endswith("checkpoint none (no step was trained)") and not (out / "ckpt.pt").exists()
    notes = [line for line in text.splitlines() if line.startswith("note: ")]
    assert notes == ["note: kron_factors=(2, 2) is ignored: it applies with scheme='kromhc' (this run: scheme='mhc')",
                     "note: hc_optimizer='muon' is ignored: it applies with optimizer='muon' (this run: "
                     "optimizer='adamw')"]
    assert read_log(out)[0]["notes"] == [n[6:] for n in notes]


@pytest.mark.parametrize("key,value,run,ignored", [
    ("kron_factors", (2, 2), dict(scheme="mhc"), True), ("kron_factors", (2, 2), dict(scheme="kromhc"), False),
    ("sinkhorn_iters", 5, dict(scheme="kromhc"), True), ("sinkhorn_end", "cols", dict(scheme="mhc"), False),
    ("res_logit_init", -4.0, dict(scheme="hc"), True), ("decay_static", True, dict(scheme="mhc_lite"), True),
    ("gate_init", 0.1, dict(scheme="plain"), True), ("gate_init", 0.1, dict(scheme="hc"), False),
    ("hc_optimizer", "muon", dict(optimizer="adamw"), True), ("matrix_lr", 0.01, dict(optimizer="muon"), False),
    ("warmdown_frac", 0.5, dict(lr_schedule="cosine"), True), ("wandb_project", "p", dict(wandb_log=False), True),
    ("hellaswag_file", "f", dict(final_hellaswag=True), False), ("core_max_per_task", 3, dict(final_core=False), True),
    ("sinkhorn_iters", 5, dict(scheme="mhc_v4"), False), ("gate_init", 0.1, dict(scheme="mhc_v4"), True),
    ("hc_eps", 1e-5, dict(scheme="kromhc"), True), ("hc_eps", 1e-5, dict(scheme="kromhc", readout="hc_head"), False),
    ("readout", "hc_head", dict(scheme="mhc_v4"), False), ("coeff_norm", "stream", dict(scheme="mhc_v4"), True),
    ("param_data_ratio", 8.0, dict(max_iters=5), True), ("param_data_ratio", 8.0, dict(max_iters=-1), False),
    ("muon_weight_decay", 0.2, dict(optimizer="adamw"), True), ("embedding_dtype", "bfloat16", dict(arch="gpt2"), True),
])
def test_keys_that_do_not_apply(key, value, run, ignored):
    cfg = dict(config.DEFAULTS, **run, **{key: value})
    notes = config.ignored(cfg)
    assert (key in notes) == ignored and set(notes) <= {key}
    assert config.KEYS[key].applies_to(cfg) != ignored


# ---- 5. right error, wrong cause ----

@pytest.mark.parametrize("had_one", [False, True])
def test_full_disk_says_what_is_kept(had_one, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    if had_one:
        checkpoint.write({"step": 2}, str(path))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(WriteError) as e:
        checkpoint.write({"step": 4}, str(path))
    msg = str(e.value)
    if had_one:
        assert f"the checkpoint {path} (step 2) is kept" in msg and "--resume" in msg
    else:
        assert "no checkpoint of this run was written yet" in msg and "--overwrite=True" in msg and "kept" not in msg


@pytest.mark.parametrize("meta,where,command", [
    (None, "data/pydocs", "python data/prepare.py pydocs --restart"),
    (None, "elsewhere/mydata", "python data/prepare.py <dataset> --out-dir elsewhere/mydata --restart"),
    ({"dataset": "fineweb_edu", "seed": 42, "val_fraction": 0.005,
      "source": {"kind": "data_files", "max_docs": None, "data_files": [{"path": "s/a.parquet"}]}},
     "data/my_fwe", "python data/prepare.py fineweb_edu --data-files s/a.parquet --out-dir data/my_fwe --restart"),
    ({"dataset": "fineweb_edu", "seed": 42, "val_fraction": 0.005, "source": {
        "kind": "data_files", "max_docs": 10, "data_files": [{"path": f"s/{i}.jsonl"} for i in range(9)]}},
     "data/fineweb_edu", "python data/prepare.py fineweb_edu --data-files s/*.jsonl --max-docs 10 --restart"),
    ({"dataset": "openwebtext", "seed": 7, "val_fraction": 0.0005, "source": {"kind": "hub", "subset": None,
                                                                             "revision": "main", "max_docs": None}},
     "data/openwebtext", "python data/prepare.py openwebtext --revision main --seed 7 --restart"),
])
def test_the_fix_names_the_command_that_made_the_dataset(meta, where, command, monkeypatch):
    from data import sources
    monkeypatch.chdir(REPO)
    assert sources.prepare_command(where, meta, restart=True) == command


def test_corrupt_meta_json_in_a_custom_folder(data_dir, tmp_path):
    bad = tmp_path / "mydata"
    shutil.copytree(data_dir, bad)
    (bad / "meta.json").write_text("{broken")
    with pytest.raises(ConfigError, match=f"re-run `python data/prepare.py <dataset> --out-dir {bad} --restart`"):
        train.main(tiny_args(str(bad), tmp_path / "o"))


@pytest.mark.parametrize("text", ["from math import sqrt\n", "import math\n", "from os import path as p\n",
                                  "from math import pi\n", "def helper():\n    return 2\n",
                                  "from collections import OrderedDict\n", "import os.path\n"])
def test_imports_and_helpers_in_config_files_are_not_keys(text, tmp_path):
    f = tmp_path / "c.py"
    f.write_text(text + "n_layer = 3\n")
    assert configurator.load(config.KEYS, [str(f)])["n_layer"] == 3


@pytest.mark.parametrize("arg,needle", [("n_layer=2", "to set the key write --n_layer=2"),
                                        ("nlayer=2", "did you mean --n_layer=2?")])
def test_override_without_dashes(arg, needle):
    with pytest.raises(ConfigError, match=needle.replace("?", r"\?")):
        configurator.load(config.KEYS, [arg])


@pytest.mark.parametrize("script", ["eval_hellaswag", "eval_core"])
def test_eval_out_into_a_missing_folder_fails_first(script, tmp_path, capsys):
    from scripts import eval_core, eval_hellaswag
    main = {"eval_hellaswag": eval_hellaswag.main, "eval_core": eval_core.main}[script]
    with pytest.raises(SystemExit) as e:  # no checkpoint either: the --out check comes before anything is read
        main(["--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "missing" / "r.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --out: the folder {tmp_path / 'missing'} does not exist" in err


def test_wrong_knob_is_not_blamed(data_dir, tmp_path):
    """The diagnostics' windows come from diag_batch_size: a val split too small for them names it."""
    with pytest.raises(ConfigError) as e:
        train.main(tiny_args(data_dir, tmp_path / "o", "--scheme=hc", "--eval_tokens=64", "--diag_batch_size=5000"))
    assert "lower diag_batch_size (5000 sequences" in str(e.value) and "eval_tokens" not in str(e.value)
