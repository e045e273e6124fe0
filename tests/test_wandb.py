"""wandb, offline with the real library, read back from the run files it writes (tracking.read_offline_run):
a sweep's runs grouped by setting, tagged, with the config as job type, the log header as config,
tokens as the x-axis, val loss / BPB summarised as min and last, the final evaluations in the summary,
the same metric names as log.jsonl, and a resumed run continuing the same wandb run in the same group."""

import os

import pytest

import tracking
import train
from conftest import read_log, tiny_args
import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLASWAG = os.path.join(REPO, "tests", "fixtures", "hellaswag", "hellaswag_val_sample.jsonl")
CORE = os.path.join(REPO, "tests", "fixtures", "core", "eval_bundle")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tmp_path / "tiny.py"  # the config file's name is the job type
    config.write_text("n_layer = 2\nmax_iters = 4\neval_interval = 2\n")
    import wandb
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) per process: a fresh start for each test
    yield tmp_path, str(config)
    wandb.teardown()


def run(tmp_path, config, name, *extra):
    out = tmp_path / name
    train.main([config, *tiny_args(DATA, out, "--max_iters=4", "--eval_interval=2", "--wandb_log=True",
                                   "--wandb_mode=offline", f"--wandb_run_name={name}", "--core_max_per_task=3",
                                   *extra)])
    return read_log(out)


def run_files(tmp_path):
    """{wandb run id: [its offline run files, oldest first]}, once wandb has written them out (its service
    writes after run.finish() returns; train.py's process exit waits for it, a test waits here)."""
    import wandb
    wandb.teardown()
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    out = {}
    for f in files:
        out.setdefault(f.stem[len("run-"):], []).append(str(f))
    return out


@pytest.fixture(autouse=True)
def _data(data_dir):
    global DATA
    DATA = data_dir


def test_a_sweep_is_grouped_tagged_and_plotted_against_tokens(offline, capsys):
    tmp_path, config = offline
    logs = {name: run(tmp_path, config, name, *extra) for name, extra in (
        ("plain-s0", ["--seed=0"]),
        ("plain-s1", ["--seed=1", "--data_seed=0", "--final_hellaswag=True", f"--hellaswag_file={HELLASWAG}",
                      "--final_core=True", f"--core_bundle_dir={CORE}"]),
        ("hc-s0", ["--seed=0", "--scheme=hc"]),
        ("mine", ["--seed=0", "--wandb_group=mine", "--wandb_tags=ablation, v2"]))}
    files = run_files(tmp_path)
    assert len(files) == 4
    runs = {r["name"]: r for r in (tracking.read_offline_run(f[-1]) for f in files.values())}
    assert sorted(runs) == ["hc-s0", "mine", "plain-s0", "plain-s1"]
    # two seeds of one setting share a group, another scheme does not; the group is the log header's setting
    assert runs["plain-s0"]["group"] == runs["plain-s1"]["group"] == logs["plain-s0"][0]["setting"]
    assert runs["hc-s0"]["group"] == logs["hc-s0"][0]["setting"] != runs["plain-s0"]["group"]
    assert runs["plain-s0"]["group"].startswith("tiny-plain-n1-") and runs["hc-s0"]["group"].startswith("tiny-hc-n4-")
    assert runs["hc-s0"]["job_type"] == "tiny"
    assert runs["hc-s0"]["tags"] == ["hc", "n4", "gpt2", "adamw", "pydocs", "tokenizer:gpt2"]
    assert (runs["mine"]["group"], runs["mine"]["tags"]) == ("mine", ["ablation", "v2"])  # the keys override
    assert logs["mine"][0]["setting"] == runs["plain-s0"]["group"]  # ... wandb's group, not the setting
    # the wandb config is the log header: resolved values, code, data and tokenizer identity
    for name, r in runs.items():
        header = {k: v for k, v in logs[name][0].items() if k not in ("type", "step")}
        assert r["config"] == header
        assert {"git_commit", "git_dirty", "data_id", "tokenizer", "setting"} <= set(r["config"])
        assert r["config"]["data_seed"] == 0 and r["config"]["seed"] == (1 if name == "plain-s1" else 0)
    from scripts import wandb_offline  # the same records as a user reads them before `wandb sync`
    assert wandb_offline.main([str(tmp_path / "wandb")]) == 0
    out = capsys.readouterr().out
    assert f"3 group(s):\n  {runs['plain-s0']['group']}: plain-s0, plain-s1\n" in out
    assert f"  {runs['hc-s0']['group']}: hc-s0\n  mine: mine\n" in out
    # --summary: the results a reader looks for; --full-summary: every key, the diagnostics too
    assert wandb_offline.main([str(tmp_path / "wandb"), "--summary"]) == 0
    out = capsys.readouterr().out
    evals = [e for e in logs["plain-s1"] if e["type"] == "eval"]
    train_loss = [e for e in logs["plain-s1"] if e["type"] == "train"][-1]["loss"]
    after = out.split("plain-s1  group=")[1].splitlines()[1:]
    block = after[:next(i for i, line in enumerate(after) if not line.startswith("    "))]  # plain-s1's lines
    assert block[:5] == ["    step = 4", "    tokens = 512",
                         f"    val/loss = min {min(e['val_loss'] for e in evals):.4f}, "
                         f"last {evals[-1]['val_loss']:.4f}",
                         f"    val/bpb = min {min(e['val_bpb'] for e in evals):.4f}, last {evals[-1]['val_bpb']:.4f}",
                         f"    train/loss = {train_loss:.4f}"]
    assert {line.split(" = ")[0].strip() for line in block} >= {"final/hellaswag_acc_norm", "final/hellaswag_n",
                                                               "final/core"}
    assert "diag/" not in out and len(block) < 12  # not the ~130 keys (hc-s0's diagnostics)
    assert wandb_offline.main([str(tmp_path / "wandb"), "--full-summary"]) == 0
    assert "    diag/L00.attn/amax_fwd = " in capsys.readouterr().out
    m = runs["hc-s0"]["metrics"]
    assert m["tokens"]["step_metric"] is None
    assert m["train/*"]["step_metric"] == m["val/*"]["step_metric"] == m["diag/*"]["step_metric"] == "tokens"
    assert m["val/loss"] == m["val/bpb"] == {"step_metric": "tokens", "summary": ["min", "last"]}
    s = runs["plain-s1"]["summary"]
    evals = [e for e in logs["plain-s1"] if e["type"] == "eval"]
    assert s["val/bpb"] == {"min": min(e["val_bpb"] for e in evals), "last": evals[-1]["val_bpb"]}
    assert s["val/loss"]["last"] == evals[-1]["val_loss"]
    final = next(r for r in logs["plain-s1"] if r["type"] == "final")
    assert s["final/hellaswag_acc_norm"] == final["hellaswag_acc_norm"] and s["final/core"] == final["core"]
    assert "final/hellaswag_acc_norm" not in runs["plain-s0"]["summary"]
    # every logged name maps back (tracking.log_key) to its log.jsonl record's key: one set of names
    for name, f in ((n, files[r["id"]][-1]) for n, r in runs.items()):
        logged = {(r["type"], k) for r in logs[name] for k in r}
        for rec in tracking.offline_records(f):
            if rec.WhichOneof("record_type") != "history":
                continue
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                back = tracking.log_key(key)
                if back is not None:
                    assert back in logged, key
                else:
                    assert key.startswith(("_", "diag/", "final/core_centered/", "hres")) or key == "tokens", key


def test_a_resumed_run_continues_its_wandb_run_and_group(offline, capsys):
    tmp_path, config = offline
    first = run(tmp_path, config, "r", "--keep_checkpoints=2")
    (rid, files), = run_files(tmp_path).items()
    before = tracking.read_offline_run(files[-1])
    assert before["group"] == first[0]["setting"]
    run(tmp_path, config, "r", "--keep_checkpoints=2", "--resume_from=ckpt_2.pt")  # the same setting, from step 2
    # a longer run (max_iters is part of the setting): the wandb run keeps its group, and says so
    log = run(tmp_path, config, "r", "--keep_checkpoints=2", "--resume", "--max_iters=6", "--lr_decay_iters=4")
    assert [e["step"] for e in log if e["type"] == "eval"] == [0, 2, 4, 6]
    assert list(run_files(tmp_path)) == [rid]  # one wandb run id for all three starts
    files = run_files(tmp_path)[rid]
    assert len(files) == 3
    for f in files[1:]:
        r = tracking.read_offline_run(f)
        assert (r["id"], r["group"], r["name"]) == (rid, before["group"], "r")
    from scripts import wandb_offline
    capsys.readouterr()
    assert wandb_offline.main([str(tmp_path / "wandb")]) == 0
    line = (f"{rid}  r  group={before['group']}  job_type=tiny  tags=plain,n1,gpt2,adamw,pydocs,tokenizer:gpt2  "
            f"(3 starts)")
    assert line in capsys.readouterr().out.splitlines()
    headers = [r for r in log if r["type"] in ("config", "resume")]
    assert headers[-1]["setting"] != before["group"]  # what compare.py groups by: the last header's setting


def test_the_name_mapping_and_the_tags_override():
    assert tracking.wandb_key("eval", "val_bpb") == "val/bpb" and tracking.log_key("val/bpb") == ("eval", "val_bpb")
    assert tracking.wandb_key("eval", "hellaswag_acc_norm") == "val/hellaswag_acc_norm"
    assert tracking.log_key("val/hellaswag_acc_norm") == ("eval", "hellaswag_acc_norm")
    assert tracking.log_key("final/core") == ("final", "core") and tracking.log_key("train/loss") == ("train", "loss")
    assert tracking.log_key("diag/x/y") is None and tracking.log_key("tokens") is None
    row = tracking.wandb_metrics({"type": "eval", "step": 4, "tokens": 512, "val_loss": 3.0, "val_bpb": 4.0,
                                  "diag": {"L0.attn/amax": 1.5}, "hres": {"L0": [[1.0]]}})
    assert row == {"tokens": 512, "val/loss": 3.0, "val/bpb": 4.0, "diag/L0.attn/amax": 1.5}
    assert tracking.wandb_metrics({"type": "error", "step": 3, "tokens": 1, "message": "nan"}) == {}
    header = dict(config.DEFAULTS, n_streams=4, scheme="mhc", tokenizer="gpt2")
    assert tracking.wandb_tags(header) == ["mhc", "n4", "gpt2", "adamw", "pydocs", "tokenizer:gpt2"]
    assert tracking.wandb_tags(dict(header, wandb_tags="ablation, v2, ablation,")) == ["ablation", "v2"]  # each once


def test_the_users_values_are_checked_before_wandb_starts(tmp_path, monkeypatch):
    """A long tag, a timeout wandb refuses and a folder wandb cannot write in are each one line naming the key
    and the fix, said by check_wandb (train.py calls it before building anything); nothing starts wandb."""
    import wandb
    from errors import ConfigError
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    # wandb's own limit (its settings' validation, offline): 64 characters a tag
    wandb.Settings(run_tags=("t" * tracking.TAG_MAX,))
    with pytest.raises(ValueError, match="65 characters"):
        wandb.Settings(run_tags=("t" * (tracking.TAG_MAX + 1),))
    ok = dict(wandb_log=True, wandb_mode="offline")
    tracking.check_wandb(tracking.WandbConfig(**ok, wandb_tags="a, " + "t" * 64))
    with pytest.raises(ConfigError, match="config key 'wandb_tags': the tag 't{65}' has 65 characters, but wandb "
                                          "takes at most 64; shorten it"):
        tracking.check_wandb(tracking.WandbConfig(**ok, wandb_tags="a, " + "t" * 65))
    with pytest.raises(ConfigError, match="'wandb_tags'"):  # start_wandb's tags, without check_wandb
        tracking.wandb_tags(dict(config.DEFAULTS, wandb_tags="t" * 65))
    for value in ("inf", "nan", "0", "-3", "soon"):
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", value)
        with pytest.raises(ConfigError, match=f"WANDB_INIT_TIMEOUT={value!r} in the environment is not a finite "
                                              f"number of seconds > 0; set it to one"):
            tracking.check_wandb(tracking.WandbConfig(**ok))
        tracking.check_wandb(tracking.WandbConfig())  # without wandb_log nothing of wandb's is checked
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "120")
    assert tracking.init_timeout() == 120.0
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "f"))  # a file: wandb would move the run to the temp folder
    with pytest.raises(ConfigError, match=f"wandb writes its run files in {tmp_path / 'f' / 'wandb'} \\(under "
                                          f"WANDB_DIR\\), but {tmp_path / 'f'} is not a writable folder; set WANDB_DIR"):
        tracking.check_wandb(tracking.WandbConfig(**ok))
    tracking.check_wandb(tracking.WandbConfig(wandb_log=True, wandb_mode="disabled"))  # writes no files
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "new" / "dir"))  # missing: wandb makes it
    tracking.check_wandb(tracking.WandbConfig(**ok))


def test_a_failed_start_is_said_by_its_cause(tmp_path, monkeypatch):
    """wandb.init raising (monkeypatched: no service, no network): offline is never blamed on the network or the
    key; a file error names the folder, a refused value the keys, a rejected key the login."""
    import wandb
    from wandb.errors import AuthenticationError, CommError
    from errors import ConfigError
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")  # a guard: were wandb.init not replaced, no network either
    for var in ("WANDB_INIT_TIMEOUT", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    try:
        wandb.Settings(run_tags=("t" * 65,))
    except ValueError as e:
        refused = e  # pydantic's ValidationError, as wandb.init raises it
    network = "check the network and the key"
    for mode, exc, needle in [
            ("offline", RuntimeError("service died"), "wandb could not start the offline run (RuntimeError: service "
                                                      "died; offline mode uses no network)"),
            ("offline", PermissionError(13, "Permission denied", str(tmp_path / "wandb")),
             f"could not write its run files in {tmp_path / 'wandb'} (PermissionError"),
            ("online", NotADirectoryError(20, "Not a directory", str(tmp_path / "wandb" / "run-x")), "set WANDB_DIR"),
            ("offline", refused, "wandb refused a value of the run (ValidationError: 1 validation error for "
                                 "Settings run_tags "),  # pydantic's cause, below its first line, is kept
            ("online", AuthenticationError("invalid API key"), "wandb rejected the API key (AuthenticationError: "
                                                                "invalid API key); run `wandb login --relogin`"),
            ("online", CommError("timed out"), f"could not start the run at https://api.wandb.ai within 60 s "
                                               f"(CommError: timed out); {network}")]:
        def init(*args, exc=exc, **kwargs):
            raise exc
        monkeypatch.setattr(wandb, "init", init)
        with pytest.raises(ConfigError) as e:
            tracking.init_run(project="p", mode=mode)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert exc is not refused or "65 characters" in str(e.value)
        assert (network in str(e.value)) == (type(exc) is CommError)  # online, and no other cause
