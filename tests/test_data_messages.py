"""The refusals of data/'s command lines (prepare.py, tokenizer.py): each one line naming the cause and a
fix, run as a user runs them, and the fix followed to show that it works and overwrites nothing."""

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from data import prepare as prep
from data import pydocs
from data import sources
from data import tokenizer as tok
from data.loader import load_meta

DOCS = 40  # pydocs documents used here: enough text for a 300-token BPE, tokenized in a moment
TRAIN = ["train", "pydocs", "--vocab-size", "300", "--max-chars", "200000"]


@pytest.fixture(scope="module")
def corpus():
    return pydocs.documents()[:DOCS]


@pytest.fixture(autouse=True)
def small_pydocs(corpus, monkeypatch):
    """pydocs without its collecting subprocess: the same first documents every call."""
    monkeypatch.setattr(pydocs, "documents", lambda: list(corpus))


@pytest.fixture
def gpt2_copy(enc, tmp_path):
    """A copy of GPT-2's rank file under the name users give it."""
    return shutil.copy(tok.rank_file_path(), tmp_path / "gpt2.tiktoken")


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refused(main, argv, capsys):
    """main(argv) must refuse in one line (exit status 1, no traceback) -> that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def command_in(message):
    """The `python data/prepare.py ...` command a message tells the user to run -> prepare.main's argv."""
    command = re.findall(r"`(python data/prepare\.py [^`]*)`", message)
    assert len(command) == 1, message
    return shlex.split(command[0])[2:]


def prepare_argv(out, *extra):
    return ["pydocs", "--out-dir", str(out), "--workers", "1", "--no-progress", *extra]


# ----------------------------------------------------------------------------- GPT-2's rank file as a tokenizer

def test_prepare_with_the_gpt2_rank_file_as_tokenizer(gpt2_copy, tmp_path, capsys):
    before = digest(gpt2_copy)
    out = tmp_path / "ds"
    err = refused(prep.main, prepare_argv(out, "--tokenizer", str(gpt2_copy)), capsys)
    assert f"{gpt2_copy} is GPT-2's rank file" in err and "leave --tokenizer out" in err
    assert "--out" not in err.replace("--out-dir", "")  # no advice to train a tokenizer over it
    assert not out.exists() and digest(gpt2_copy) == before
    assert prep.main(prepare_argv(out)) == 0  # the fix: GPT-2's BPE is the default
    assert tok.is_gpt2(load_meta(out)["tokenizer"]) and digest(gpt2_copy) == before


def test_gpt2_rank_file_as_tokenizer_where_none_is_installed(gpt2_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(tok.ENV_VAR, str(tmp_path / "cache" / "gpt2.tiktoken"))  # nothing installed there
    out = tmp_path / "ds"
    err = refused(prep.main, prepare_argv(out, "--tokenizer", str(gpt2_copy)), capsys)
    assert "leave --tokenizer out" in err and f"`python data/tokenizer.py fetch --from {gpt2_copy}`" in err
    assert tok.main(["fetch", "--from", str(gpt2_copy)]) == 0  # the fix, step by step
    assert prep.main(prepare_argv(out)) == 0
    assert digest(tmp_path / "cache" / "gpt2.tiktoken") == digest(gpt2_copy) == tok.RANK_FILE_SHA256


def test_info_of_the_gpt2_rank_file(gpt2_copy, capsys):
    err = refused(tok.main, ["info", str(gpt2_copy)], capsys)
    assert "is GPT-2's rank file, not a tokenizer trained by `python data/tokenizer.py train`" in err


# ----------------------------------------------------------------------------- tokenizer.py train --out

@pytest.fixture
def training(monkeypatch):
    """Counts the trainings that read their text: a refusal must come before."""
    calls, load = [], sources.load_splits
    monkeypatch.setattr(sources, "load_splits", lambda *a, **k: calls.append(a) or load(*a, **k))
    return calls


def suggested_out(message):
    """The --out a refusal suggests (its last --out)."""
    return re.findall(r"--out (\S+?)[;,)]?(?:\s|$)", message)[-1]


def test_train_over_an_existing_tokenizer(tmp_path, training, capsys):
    out = tmp_path / "t.tiktoken"
    assert tok.main([*TRAIN, "--out", str(out)]) == 0
    first = digest(out)
    err = refused(tok.main, [*TRAIN, "--max-chars", "100000", "--out", str(out)], capsys)
    assert f"{out} already exists" in err and "pass another --out, or --force to replace it" in err
    assert digest(out) == first and len(training) == 1
    assert tok.main([*TRAIN, "--max-chars", "100000", "--out", str(out), "--force"]) == 0  # the fix
    assert digest(out) != first and tok.load_bpe(out).n_vocab == 300


@pytest.mark.parametrize("kind", ["folder", "json", "no_suffix"])
def test_train_out_suggestion_works(kind, tmp_path, training, capsys):
    out = {"folder": tmp_path, "json": tmp_path / "t.json", "no_suffix": tmp_path / "t"}[kind]
    err = refused(tok.main, [*TRAIN, "--out", str(out)], capsys)
    assert f"--out {out}" in err and training == []
    assert sorted(tmp_path.iterdir()) == []  # nothing written
    fix = suggested_out(err)
    assert fix.endswith(".tiktoken")
    assert tok.main([*TRAIN, "--out", fix]) == 0
    assert tok.load_bpe(fix).n_vocab == 300


def test_train_never_overwrites_the_gpt2_rank_file(gpt2_copy, tmp_path, monkeypatch, training, capsys):
    before = digest(gpt2_copy)
    for force in ([], ["--force"]):
        err = refused(tok.main, [*TRAIN, "--out", str(gpt2_copy), *force], capsys)
        assert "is GPT-2's rank file" in err and "pass another --out" in err
    installed = tmp_path / "cache" / "gpt2.tiktoken"  # where GPT-2's rank file goes, not fetched yet
    monkeypatch.setenv(tok.ENV_VAR, str(installed))
    err = refused(tok.main, [*TRAIN, "--out", str(installed)], capsys)
    assert "is GPT-2's rank file" in err and not installed.parent.exists()
    assert digest(gpt2_copy) == before and training == [] and sorted(tmp_path.iterdir()) == [gpt2_copy]
    assert tok.main([*TRAIN, "--out", str(tmp_path / "other.tiktoken")]) == 0  # another --out


def test_train_force_replaces_only_a_tokenizer(tmp_path, training, capsys):
    config = tmp_path / "t.json"  # the .json of --out t.tiktoken would be this user's file
    config.write_text('{"mine": 1}')
    err = refused(tok.main, [*TRAIN, "--out", str(tmp_path / "t.tiktoken"), "--force"], capsys)
    assert f"{config} exists and is not part of a tokenizer" in err and "pass another --out" in err
    assert config.read_text() == '{"mine": 1}' and training == []
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = refused(tok.main, [*TRAIN, "--out", str(blocker / "t.tiktoken")], capsys)
    assert f"cannot write in {blocker}" in err and training == []


def test_train_val_fraction_out_of_range(tmp_path, training, capsys):
    err = refused(tok.main, [*TRAIN, "--val-fraction", "2", "--out", str(tmp_path / "t.tiktoken")], capsys)
    assert "--val-fraction must be in (0, 1), got 2.0" in err and training == []


def test_train_an_unknown_dataset(capsys):
    with pytest.raises(SystemExit) as e:
        tok.main(["train", "fineweb"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'fineweb'" in err and "fineweb_edu" in err and "Traceback" not in err


def test_info_of_a_tokenizer_saved_without_training_notes(tmp_path, capsys):
    ranks = {bytes([i]): i for i in range(256)}
    specials = {s: 256 + i for i, s in enumerate(tok.NANOCHAT_SPECIALS)}
    tok.save_bpe(tok.Tokenizer("bytes", tok.NANOCHAT_PATTERN, ranks, specials, bos_token=256), tmp_path / "b.tiktoken")
    assert tok.main(["info", str(tmp_path / "b.tiktoken")]) == 0
    assert "265 tokens (256 byte-pair + 9 special), bos 256" in capsys.readouterr().out


def test_missing_tokenizer_file(tmp_path, capsys):
    trained = tmp_path / "t.tiktoken"
    assert tok.main([*TRAIN, "--out", str(trained)]) == 0
    for argv in (prepare_argv(tmp_path / "ds", "--tokenizer", str(tmp_path / "typo.tiktoken")),
                 prepare_argv(tmp_path / "ds", "--tokenizer", str(tmp_path))):
        err = refused(prep.main, argv, capsys)
        assert "not found" in err or "is a folder" in err
        assert "pass a .tiktoken file `python data/tokenizer.py train` wrote" in err
    trained.with_suffix(".json").rename(tmp_path / "elsewhere.json")  # copied without its .json
    err = refused(prep.main, prepare_argv(tmp_path / "ds", "--tokenizer", str(trained)), capsys)
    assert f"{trained.with_suffix('.json')} not found" in err and "with the .json written beside it" in err
    (tmp_path / "elsewhere.json").rename(trained.with_suffix(".json"))  # the fix
    assert prep.main(prepare_argv(tmp_path / "ds", "--tokenizer", str(trained))) == 0


# ----------------------------------------------------------------------------- prepare.py --verify

@pytest.fixture
def prepared(tmp_path):
    """pydocs' first documents prepared in small shards, as a user's own folder -> that folder."""
    out = tmp_path / "mine"
    assert prep.main(prepare_argv(out, "--max-docs", "30", "--shard-tokens", "4000")) == 0
    assert len(load_meta(out)["splits"]["train"]["shards"]) >= 3
    return out


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_verify_a_damaged_shard_and_follow_the_fix(damage, prepared, capsys):
    shard = prepared / "train_000001.bin"
    before = shard.read_bytes()
    shard.unlink() if damage == "missing" else shard.write_bytes(before[:-10])
    err = refused(prep.main, ["pydocs", "--verify", "--out-dir", str(prepared)], capsys)
    assert str(shard) in err and damage in err
    argv = command_in(err)
    assert argv[-3:] == ["--out-dir", str(prepared), "--restart"] and "--max-docs" in argv and "--shard-tokens" in argv
    assert prep.main([*argv, "--workers", "1", "--no-progress"]) == 0
    assert prep.main(["pydocs", "--verify", "--out-dir", str(prepared)]) == 0
    assert shard.read_bytes() == before  # the same dataset again


@pytest.mark.parametrize("damage", ["never_prepared", "damaged_meta"])
def test_verify_a_dataset_not_prepared(damage, tmp_path, capsys):
    out = tmp_path / "mine"
    if damage == "damaged_meta":
        out.mkdir()
        (out / "meta.json").write_text("{")
    err = refused(prep.main, ["pydocs", "--verify", "--out-dir", str(out)], capsys)
    assert "<dataset>" not in err and ("never prepared" in err or "not valid JSON" in err)
    assert prep.main([*command_in(err), "--workers", "1", "--no-progress"]) == 0
    assert prep.main(["pydocs", "--verify", "--out-dir", str(out)]) == 0


def test_dataset_without_its_tokenizer_copy(tmp_path, capsys):
    trained = tmp_path / "t.tiktoken"
    assert tok.main([*TRAIN, "--out", str(trained)]) == 0
    out = tmp_path / "mine"
    assert prep.main(prepare_argv(out, "--tokenizer", str(trained), "--max-docs", "30")) == 0
    (out / tok.DATA_RANK_FILE).unlink()
    err = refused(prep.main, ["pydocs", "--verify", "--out-dir", str(out)], capsys)
    assert str(out / tok.DATA_RANK_FILE) in err and err.count("prepare the dataset again") == 1
    argv = command_in(err)
    assert argv[argv.index("--tokenizer") + 1] == str(trained)
    assert prep.main([*argv, "--workers", "1", "--no-progress"]) == 0
    assert prep.main(["pydocs", "--verify", "--out-dir", str(out)]) == 0
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["name"] == "t"
