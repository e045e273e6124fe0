"""Bad input to the tools (sample.py, the evals, plot_runs.py, prepare.py, tokenizer.py): every
case ends in exit status 1 (or an argparse error, 2) with a message naming the file or flag and
the fix, never a traceback, and the data-safety cases leave the earlier output untouched."""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import GPT, GPTConfig  # noqa: E402
import checkpoint  # noqa: E402
from errors import ConfigError  # noqa: E402
import evals.core  # noqa: E402
import evals.hellaswag  # noqa: E402
from scripts import eval_core, eval_hellaswag, sample  # noqa: E402

HELLASWAG = REPO / "tests" / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"
BUNDLE = REPO / "tests" / "fixtures" / "core" / "eval_bundle"


def fails(main, argv, capsys, *needles, code=1):
    """main(argv) exits with code; stderr names every needle; no traceback. -> stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def snapshot(d):
    """{relative path: bytes} of every file under d."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A train.py-format checkpoint of a tiny GPT-2-vocabulary model."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    cfg = GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, scheme="mhc", n_streams=2)
    torch.save({"model": GPT(cfg).state_dict(), "model_config": asdict(cfg), "step": 4, "config": {}}, d / "ckpt.pt")
    return d / "ckpt.pt"


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory, ckpt):
    """name -> a file that is no usable checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    good = ckpt.read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    state = torch.load(ckpt, weights_only=False)
    state["model_config"] = dict(state["model_config"], n_embd=32)  # weights of another shape
    torch.save(state, d / "mismatched.pt")
    return {p.stem: p for p in d.iterdir()} | {"missing": d / "nothing_here"}


# ----------------------------------------------------------------------------- checkpoints (all three tools)

@pytest.mark.parametrize("kind", ["missing", "truncated", "random", "foreign", "mismatched"])
def test_bad_checkpoints_are_named(kind, bad_ckpts, capsys):
    path = bad_ckpts[kind]
    fix = {"missing": "pass a ckpt.pt", "foreign": "pass the ckpt.pt", "mismatched": "pass a ckpt.pt"}.get(
        kind, "use another checkpoint")
    fails(sample.main, ["--ckpt", str(path), "--device", "cpu", "--max-new-tokens", "2"], capsys, path, fix)
    fails(eval_hellaswag.main, ["--ckpt", str(path), "--device", "cpu", "--data-file", str(HELLASWAG), "--out", "-"],
          capsys, path, fix)
    fails(eval_core.main, ["--ckpt", str(path), "--device", "cpu", "--bundle-dir", str(BUNDLE), "--out", "-"],
          capsys, path, fix)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_named(ckpt, capsys):
    fails(sample.main, ["--ckpt", str(ckpt), "--device", "cuda"], capsys, "--device cuda", "--device cpu")
    fails(eval_hellaswag.main, ["--ckpt", str(ckpt), "--device", "cuda:1", "--data-file", str(HELLASWAG)], capsys,
          "--device cuda:1", "--device cpu")
    fails(sample.main, ["--ckpt", str(ckpt), "--device", "gpu"], capsys, "--device gpu", "cpu, cuda")


# ----------------------------------------------------------------------------- sample.py

def test_temperature_zero_is_greedy(ckpt, capsys):
    """Checked against an argmax loop written here, from two different seeds."""
    from data.tokenizer import get_encoding
    enc = get_encoding()
    model, _ = checkpoint.load_model(ckpt)
    ids = enc.encode_ordinary("def f(")
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, model(x)[0][:, -1].argmax(-1, keepdim=True)], 1)
    want = sample.decode(enc, x[0, len(ids):].tolist())
    for seed in ("1", "2"):
        got = sample.main(["--ckpt", str(ckpt), "--prompt", "def f(", "--temperature", "0", "--num-samples", "2",
                           "--max-new-tokens", "6", "--seed", seed, "--device", "cpu"])
        assert got == [want, want]
    capsys.readouterr()


@pytest.mark.parametrize("flag,value", [("--temperature", "-0.5"), ("--temperature", "nan"), ("--top-k", "-1"),
                                        ("--num-samples", "0"), ("--max-new-tokens", "-3"), ("--max-new-tokens", "x")])
def test_sample_flags_out_of_range(flag, value, ckpt, capsys):
    fails(sample.main, ["--ckpt", str(ckpt), flag, value], capsys, f"argument {flag}", code=2)


def test_generate_refuses_negative_temperature(ckpt):
    model, _ = checkpoint.load_model(ckpt)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=-1.0)


def test_prompt_file_errors(ckpt, tmp_path, capsys):
    fails(sample.main, ["--ckpt", str(ckpt), "--prompt", f"FILE:{tmp_path / 'none.txt'}", "--device", "cpu"],
          capsys, "none.txt", "UTF-8 text file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    fails(sample.main, ["--ckpt", str(ckpt), "--prompt", f"FILE:{latin1}", "--device", "cpu"], capsys, "latin1.txt")


# ----------------------------------------------------------------------------- eval_hellaswag.py

def hellaswag_lines(tmp_path, *lines):
    p = tmp_path / "hs.jsonl"
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


GOOD_ITEM = json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 2})


@pytest.mark.parametrize("bad,needle", [
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}), "hs.jsonl:2: label 4"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": -1}), "hs.jsonl:2: label -1"),
    ('{"ctx": "A man", "endings": [', "hs.jsonl:2: not a JSON line"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"]}), "hs.jsonl:2: not a labelled"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", 3, "d"], "label": 1}), "hs.jsonl:2: not a labelled"),
    (json.dumps([1, 2]), "hs.jsonl:2: not a labelled"),
    ("caf\xe9".encode("latin-1"), "not UTF-8"),
])
def test_hellaswag_bad_lines_are_named(bad, needle, tmp_path, ckpt, capsys):
    path = hellaswag_lines(tmp_path, GOOD_ITEM, bad)
    fails(eval_hellaswag.main, ["--ckpt", str(ckpt), "--data-file", str(path), "--device", "cpu", "--out", "-"],
          capsys, needle, "official hellaswag_val.jsonl")


def test_hellaswag_missing_or_empty_file(tmp_path, ckpt, capsys):
    fails(eval_hellaswag.main, ["--ckpt", str(ckpt), "--data-file", str(tmp_path / "no.jsonl"), "--device", "cpu"],
          capsys, "no.jsonl not found", "--data-file")
    fails(eval_hellaswag.main, ["--ckpt", str(ckpt), "--data-file", str(hellaswag_lines(tmp_path, "")),
                                "--device", "cpu"], capsys, "hs.jsonl: no HellaSwag items")


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--limit", "-2"), ("--batch-size", "0")])
def test_hellaswag_counts_must_be_positive(flag, value, ckpt, capsys):
    fails(eval_hellaswag.main, ["--ckpt", str(ckpt), flag, value], capsys, f"argument {flag}", "must be >= 1", code=2)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evals.hellaswag.load_examples(HELLASWAG, limit=0)


def test_hellaswag_limit_counts_items(ckpt, capsys):
    res = eval_hellaswag.main(["--ckpt", str(ckpt), "--data-file", str(HELLASWAG), "--limit", "3", "--device", "cpu",
                               "--out", "-"])
    assert res["n"] == 3
    capsys.readouterr()


# ----------------------------------------------------------------------------- eval_core.py

def copy_bundle(tmp_path):
    import shutil
    dest = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dest)
    return dest


def core_fails(ckpt, bundle, capsys, *needles, extra=()):
    return fails(eval_core.main, ["--ckpt", str(ckpt), "--bundle-dir", str(bundle), "--device", "cpu", "--out", "-",
                                  *extra], capsys, *needles)


def test_core_empty_task_file(tmp_path, ckpt, capsys):
    b = copy_bundle(tmp_path)
    (b / "eval_data" / "toy" / "schema.jsonl").write_text("\n")
    core_fails(ckpt, b, capsys, "schema.jsonl: no items (task toy_schema)", "--tasks")


@pytest.mark.parametrize("text,needle", [("icl_tasks: [\n  - label: x\n", "not a readable YAML file"),
                                         ("just a string\n", "no 'icl_tasks' list"),
                                         ("icl_tasks:\n- label: toy_mc\n  num_fewshot: [0]\n", "lacks dataset_uri"),
                                         ("icl_tasks:\n- {label: toy_mc, dataset_uri: toy/multiple_choice.jsonl, "
                                          "num_fewshot: [0], icl_task_type: generation}\n", "task type 'generation'"),
                                         ("icl_tasks:\n- {label: toy_mc, dataset_uri: toy/multiple_choice.jsonl, "
                                          "num_fewshot: [-1], icl_task_type: schema}\n", "num_fewshot [-1]")])
def test_core_bad_yaml(text, needle, tmp_path, ckpt, capsys):
    b = copy_bundle(tmp_path)
    (b / "core.yaml").write_text(text)
    core_fails(ckpt, b, capsys, "core.yaml", needle)


def test_core_unknown_task_and_missing_bundle(tmp_path, ckpt, capsys):
    core_fails(ckpt, BUNDLE, capsys, "--tasks: ['piqa']", "choose among ['toy_mc'", extra=["--tasks", "toy_mc,piqa"])
    core_fails(ckpt, tmp_path / "nowhere", capsys, "core.yaml not found", "--download")
    b = copy_bundle(tmp_path)
    (b / "eval_data" / "toy" / "schema.jsonl").unlink()
    core_fails(ckpt, b, capsys, "schema.jsonl not found (task toy_schema)", "unzip eval_bundle.zip")
    (b / "eval_meta_data.csv").write_text("Task,Baseline\ntoy_mc,25\n")
    core_fails(ckpt, b, capsys, "eval_meta_data.csv", "'Random baseline'")


@pytest.mark.parametrize("line,needle", [("{not json", ":2: not a JSON line"),
                                         (json.dumps({"query": "q", "choices": ["a", "b"]}),
                                          ":2: a multiple_choice item needs"),
                                         (json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}), ":2: gold 2")])
def test_core_bad_items_are_named(line, needle, tmp_path, ckpt, capsys):
    b = copy_bundle(tmp_path)
    f = b / "eval_data" / "toy" / "multiple_choice.jsonl"
    first = f.read_text().splitlines()[0]
    f.write_text(first + "\n" + line + "\n")
    core_fails(ckpt, b, capsys, "multiple_choice.jsonl" + needle)


def test_core_max_per_task(ckpt, capsys):
    fails(eval_core.main, ["--ckpt", str(ckpt), "--max-per-task", "0"], capsys, "--max-per-task", "-1 for all", code=2)
    # 2 items cannot hold a 2-shot prompt drawn from the *other* items
    core_fails(ckpt, BUNDLE, capsys, "task toy_mc_2shot takes 2 solved examples", "raise --max-per-task",
               extra=["--max-per-task", "2"])


# ----------------------------------------------------------------------------- data/prepare.py

from data import prepare as prep  # noqa: E402
from data import shards as shardlib  # noqa: E402

DOCS = [f"document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(40)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def prep_main(files, out, tmp_path, *extra):
    """prepare.py's main on local files -> its exit status."""
    return prep.main(["fineweb_edu", "--data-files", *map(str, files), "--out-dir", str(out), "--workers", "1",
                      "--val-fraction", "0.1", "--shard-tokens", "300", "--cache-dir", str(tmp_path / "hf"), *extra])


def top_files(d):
    """{name: bytes} of the dataset files directly in d (the lock file and the staging dir aside)."""
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file() and p.name != ".prepare.lock"}


def test_null_texts_are_skipped_counted_and_recorded(tmp_path, capsys):
    with_nulls = DOCS[:5] + [None] + DOCS[5:20] + [None, None] + DOCS[20:]
    nulls = write_jsonl(tmp_path / "nulls.jsonl", with_nulls)
    assert prep_main([nulls], tmp_path / "a", tmp_path, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "skipped 3 of 43 documents whose text is null" in out
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["skipped_docs"] == 3
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    # the same shards as the corpus without its null rows: nulls are no documents (no bare EOT, same split)
    assert prep_main([write_jsonl(tmp_path / "clean.jsonl", DOCS)], tmp_path / "b", tmp_path, "--no-progress") == 0
    a, b = top_files(tmp_path / "a"), top_files(tmp_path / "b")
    assert {k: v for k, v in a.items() if k.endswith(".bin")} == {k: v for k, v in b.items() if k.endswith(".bin")}
    assert json.loads(b["meta.json"])["skipped_docs"] == 0


@pytest.mark.parametrize("flag,value", [("--max-docs", "0"), ("--max-docs", "-5"), ("--workers", "0"),
                                        ("--chunk-docs", "0"), ("--shard-tokens", "0"), ("--seed", "-1")])
def test_prepare_flags_out_of_range(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prep.main(["pydocs", "--out-dir", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_max_docs_zero_is_not_all(tmp_path):
    with pytest.raises(ValueError, match="--max-docs must be >= 1"):
        prep.prepare("pydocs", out_dir=tmp_path / "o", max_docs=0, progress=False, log=lambda *a: None)


@pytest.fixture
def prepared(tmp_path, capsys):
    """A complete preparation of DOCS in tmp_path/ds -> (dir, its files)."""
    out = tmp_path / "ds"
    assert prep_main([write_jsonl(tmp_path / "docs.jsonl", DOCS)], out, tmp_path, "--no-progress") == 0
    capsys.readouterr()
    return out, top_files(out)


def test_second_prepare_into_a_busy_directory(prepared, tmp_path, capsys):
    out, before = prepared
    with shardlib.dir_lock(out, ".prepare.lock", "`prepare.py`"):  # a first run still at work
        rc = prep_main([tmp_path / "docs.jsonl"], out, tmp_path, "--restart", "--no-progress")
    err = capsys.readouterr().err
    assert rc == 1 and "another `prepare.py` is using" in err and str(out) in err and "wait for it" in err
    assert "Traceback" not in err and top_files(out) == before


def make_bad(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / {"empty_parquet": "e.parquet", "int_parquet": "i.parquet", "no_text": "n.parquet",
                    "garbage_parquet": "g.parquet", "latin_txt": "l.txt"}.get(kind, f"{kind}.jsonl")
    if kind == "empty_jsonl":
        p.write_text("")
    elif kind == "empty_parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    elif kind == "garbage_parquet":
        p.write_bytes(os.urandom(256))
    elif kind == "int_parquet":
        pq.write_table(pa.table({"text": [1, 2, 3]}), p)
    elif kind == "no_text":
        pq.write_table(pa.table({"body": ["a", "b", "c"]}), p)
    elif kind == "latin_jsonl":
        p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    elif kind == "latin_txt":
        p.write_bytes(b"caf\xe9\n")
    elif kind == "malformed":
        p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    elif kind == "mixed":
        p.write_text('{"text": "a"}\n{"text": 7}\n')
    return p


@pytest.mark.parametrize("kind,needle", [
    ("empty_jsonl", "empty_jsonl.jsonl is empty"), ("empty_parquet", "e.parquet has no rows"),
    ("garbage_parquet", "g.parquet is not a readable parquet file"), ("int_parquet", "'text' column holds"),
    ("no_text", "no 'text' column"), ("latin_jsonl", "latin_jsonl.jsonl:2: not UTF-8"),
    ("latin_txt", "l.txt:1: not UTF-8"), ("malformed", "malformed.jsonl:3: not a JSON line"),
    ("mixed", "'text' column holds"),
])
def test_bad_input_files_keep_the_previous_dataset(kind, needle, prepared, tmp_path, capsys):
    """Each bad file is named with the fix, and a --restart onto it leaves the complete dataset as it was."""
    out, before = prepared
    bad = make_bad(tmp_path, kind)
    rc = prep_main([bad], out, tmp_path, "--restart", "--no-progress")
    err = capsys.readouterr().err
    assert rc == 1 and needle in err and "Traceback" not in err, err
    assert "'text'" in err  # the fix: what an input file must hold
    assert top_files(out) == before
    from data.loader import load_meta
    assert load_meta(out)["splits"]["train"]["tokens"] > 0


class Killed(Exception):
    pass


def test_killed_rebuild_keeps_the_previous_dataset_then_completes(prepared, tmp_path, capsys):
    out, before = prepared

    def kill(split, index, path):
        raise Killed

    kw = dict(data_files=[str(tmp_path / "docs.jsonl")], workers=1, shard_tokens=300, val_fraction=0.2,
              cache_dir=str(tmp_path / "hf"), progress=False, log=lambda *a: None)
    with pytest.raises(Killed):
        prep.prepare("fineweb_edu", out_dir=out, restart=True, on_shard=kill, **kw)
    assert top_files(out) == before  # the old dataset, whole
    prep.prepare("fineweb_edu", out_dir=out, restart=True, **kw)  # the same command again: continues, swaps
    fresh = prep.prepare("fineweb_edu", out_dir=tmp_path / "fresh", **kw)
    assert top_files(out).keys() == top_files(tmp_path / "fresh").keys()
    assert {k: v for k, v in top_files(out).items() if k.endswith(".bin")} == \
        {k: v for k, v in top_files(tmp_path / "fresh").items() if k.endswith(".bin")}
    assert json.loads((out / "meta.json").read_text())["splits"] == fresh["splits"]
    assert not (out / prep.STAGING).exists()


def test_progress_in_a_log_file_is_plain_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "PROGRESS_EVERY_S", 0.0)
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert prep_main([docs], tmp_path / "o", tmp_path, "--chunk-docs", "4") == 0  # stdout, stderr: not terminals
    cap = capsys.readouterr()
    assert "\r" not in cap.out + cap.err
    lines = [line for line in cap.out.splitlines() if line.startswith("train: ")]
    assert len(lines) == 9 and lines[-1].startswith("train: 36/36 documents (100%)")  # 36 of 40 docs, 4 per task


# ----------------------------------------------------------------------------- data/tokenizer.py

from data import tokenizer as tok  # noqa: E402


@pytest.fixture(scope="module")
def rank_bytes(enc):
    return tok.rank_file_path().read_bytes()


def bad_rank_file(tmp_path, kind, rank_bytes):
    p = tmp_path / f"{kind}.tiktoken"
    if kind == "random":
        p.write_bytes(os.urandom(5000))
    elif kind == "truncated":
        p.write_bytes(rank_bytes[: len(rank_bytes) // 2])
    elif kind == "edited":  # parses fine, wrong digest: one rank changed
        p.write_bytes(rank_bytes.replace(b" 100\n", b" 101\n", 1))
    elif kind == "directory":
        p.mkdir()
    return p


@pytest.mark.parametrize("kind", ["random", "truncated", "edited", "missing", "directory"])
def test_tokenizer_check_names_a_bad_rank_file(kind, tmp_path, rank_bytes, monkeypatch, capsys):
    p = bad_rank_file(tmp_path, kind, rank_bytes)
    monkeypatch.setenv(tok.ENV_VAR, str(p))
    assert tok.main(["check"]) == 1
    err = capsys.readouterr().err
    assert str(p) in err and "python data/tokenizer.py fetch" in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["random", "truncated", "edited", "missing", "directory", "bad_tar", "empty_tar"])
def test_tokenizer_fetch_from_a_bad_file_keeps_the_installed_one(kind, tmp_path, rank_bytes, capsys):
    import tarfile
    dest = tmp_path / "installed" / "gpt2.tiktoken"
    dest.parent.mkdir()
    dest.write_bytes(rank_bytes)
    if kind == "bad_tar":
        src = tmp_path / "openai-whisper.tar.gz"
        src.write_bytes(os.urandom(3000))
    elif kind == "empty_tar":
        src = tmp_path / "other.tar.gz"
        with tarfile.open(src, "w:gz"):
            pass
    else:
        src = bad_rank_file(tmp_path, kind, rank_bytes)
    assert tok.main(["fetch", "--from", str(src), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and "--from" in err and "Traceback" not in err, err
    assert dest.read_bytes() == rank_bytes and os.listdir(dest.parent) == ["gpt2.tiktoken"]


def test_tokenizer_fetch_to_an_unwritable_place(tmp_path, rank_bytes, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    src = tmp_path / "gpt2.tiktoken"
    src.write_bytes(rank_bytes)
    assert tok.main(["fetch", "--from", str(src), "--dest", str(blocker / "gpt2.tiktoken")]) == 1
    err = capsys.readouterr().err
    assert "cannot install the rank file at" in err and "--dest" in err


# ----------------------------------------------------------------------------- scripts/plot_runs.py

from scripts import plot_runs  # noqa: E402


def fake_run(d, n_train=10, eval_steps=(0, 5, 10), n=2):
    """A log.jsonl as train.py writes it: config, train records, eval records with H_res (uniform
    averaging, exactly doubly stochastic, so each connection and every composite has gain 1)."""
    d.mkdir(parents=True, exist_ok=True)
    u = [[1.0 / n] * n for _ in range(n)]
    recs = [{"type": "config", "scheme": "mhc", "n_streams": n, "n_layer": 1, "n_embd": 8}]
    recs += [{"type": "train", "step": s, "tokens": 100 * s, "loss": 8.0 - s / n_train} for s in range(1, n_train + 1)]
    recs += [{"type": "eval", "step": s, "tokens": 100 * s, "val_loss": 10.8 if s == 0 else 5.0 - s / 100,
              "val_bpb": 2.0, "hres": {"L00.attn": u, "L00.mlp": u}, "hres_composite": u} for s in eval_steps]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_plot_runs_bad_inputs(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path / "plots"), "--formats", "png"]
    fails(plot_runs.main, [str(tmp_path / "nowhere"), *out], capsys, "nowhere: no such directory", "out_dir")
    (tmp_path / "empty").mkdir()
    fails(plot_runs.main, [str(tmp_path / "empty"), *out], capsys, "empty: not a run directory (no log.jsonl)",
          "none of the 1 path(s) is a run directory", "out_dir")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "log.jsonl").write_bytes(b"\x00\xff garbage\n[1, 2]\n")
    fails(plot_runs.main, [str(tmp_path / "junk"), *out], capsys, "junk/log.jsonl: no train or eval records")
    run = fake_run(tmp_path / "run")
    fails(plot_runs.main, [str(run), "--step", "7", *out], capsys, "--step", "no eval at step 7", "[0, 5, 10]")
    fails(plot_runs.main, [str(run), "--smooth", "1.5", *out], capsys, "argument --smooth", code=2)
    (tmp_path / "afile").write_text("x")
    fails(plot_runs.main, [str(run), "--out-dir", str(tmp_path / "afile")], capsys, "afile")


def test_plot_runs_skips_a_damaged_line_with_a_warning(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    lines = (run / "log.jsonl").read_text().splitlines()
    lines[3] = lines[3][:20]  # a line cut in the middle of the log
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    (run / "core.json").write_text("{not json")
    r = plot_runs.read_run(run)
    err = capsys.readouterr().err
    assert f"{run / 'log.jsonl'}:4: skipping" in err and "core.json: unreadable" in err
    assert [t["step"] for t in r["train"]] == [1, 2, 4, 5, 6, 7, 8, 9, 10] and r["core"] is None


@pytest.fixture
def figures(monkeypatch):
    figs = []
    monkeypatch.setattr(plot_runs, "save", lambda fig, *a: figs.append(fig) or [])
    return figs


@pytest.mark.parametrize("n_train,smooth,title,lines", [(10, None, "train loss", 1), (60, None, "train loss (EMA)", 2),
                                                         (60, 0.0, "train loss", 1), (10, 0.5, "train loss (EMA)", 2)])
def test_ema_label_only_when_smoothing(n_train, smooth, title, lines, tmp_path, figures):
    run = plot_runs.read_run(fake_run(tmp_path / "r", n_train=n_train))
    plot_runs.plot_curves([run], "unused", ["png"], smooth=smooth)
    ax = figures[-1].axes[0]
    assert ax.get_title() == title and len(ax.lines) == lines
    raw = [8.0 - s / n_train for s in range(1, n_train + 1)]
    assert list(ax.lines[-1].get_ydata()) != raw if lines == 2 else list(ax.lines[0].get_ydata()) == raw


def test_step0_eval_in_view(tmp_path, figures):
    run = plot_runs.read_run(fake_run(tmp_path / "r", n_train=10, eval_steps=(0, 2, 4, 6, 8, 10)))
    plot_runs.plot_curves([run], "unused", ["png"])
    val = figures[-1].axes[1]
    lo, hi = val.get_ylim()
    assert val.get_title() == "val loss" and lo < 4.9 and hi > 10.8  # step 0 (10.8) and the rest
    assert val.get_xlim()[0] <= 0


def test_depth_single_connections_visible_over_the_composite(tmp_path, figures):
    """Doubly stochastic H_res: every single-connection and composite gain is 1, the lines coincide;
    the single connections are drawn on top with markers so both stay visible."""
    run = plot_runs.read_run(fake_run(tmp_path / "r"))
    run["color"] = "C0"
    plot_runs.plot_depth([run], "unused", ["png"])
    for ax in figures[-1].axes[:2]:
        drawn = [line for line in ax.lines if line.get_color() == "C0" and len(line.get_xdata()) == 2]  # the run's
        single = [line for line in drawn if line.get_marker() == "o"]
        comp = [line for line in drawn if line.get_marker() in ("None", "", None) and line.get_linestyle() == "-"]
        assert len(single) == 1 and len(comp) == 1
        assert list(single[0].get_ydata()) == pytest.approx([1.0, 1.0]) == list(comp[0].get_ydata())
        assert single[0].get_zorder() > comp[0].get_zorder()
        assert comp[0].get_linewidth() > single[0].get_linewidth()  # the composite shows around it


# ----------------------------------------------------------------------------- bench.py, param_table.py

@pytest.mark.parametrize("argv,flag", [(["--n-streams", "0"], "--n-streams"), (["--batch-size", "-1"], "--batch-size"),
                                       (["--seq-len", "0"], "--seq-len"), (["--device", "gpu"], "--device")])
def test_bench_flags(argv, flag, capsys):
    from scripts import bench
    fails(bench.main, ["--device", "cpu", *argv], capsys, f"argument {flag}", code=2)


@pytest.mark.parametrize("argv,flag", [(["--dim", "0"], "--dim"), (["--n-layer", "-2"], "--n-layer"),
                                       (["--n-streams", "4", "0"], "--n-streams")])
def test_param_table_flags(argv, flag, capsys):
    from scripts import param_table
    fails(param_table.main, argv, capsys, f"argument {flag}", code=2)


def test_small_vocabulary_checkpoint_is_named(tmp_path, capsys):
    cfg = GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=16)
    torch.save({"model": GPT(cfg).state_dict(), "model_config": asdict(cfg), "step": 1}, tmp_path / "ckpt.pt")
    fails(sample.main, ["--ckpt", str(tmp_path), "--device", "cpu"], capsys, "ckpt.pt: not a model", "vocab_size 257")


def test_damaged_bundle_download(tmp_path):
    z = tmp_path / "eval_bundle.zip"
    z.write_bytes(os.urandom(1000))
    with pytest.raises(ConfigError, match="not a readable zip.*--bundle-dir"):
        evals.core.download_bundle(tmp_path / "b", url="file://" + str(z))
    assert not (tmp_path / "b").exists()


def test_prepare_hub_failure_and_interrupt(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prep.main(["openwebtext", "--out-dir", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot load Skylion007/openwebtext" in err and "--data-files" in err and "Traceback" not in err

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.undo()  # the hub is back
    monkeypatch.setattr(prep, "_prepare_split", ctrl_c)
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert prep_main([docs], tmp_path / "p", tmp_path, "--no-progress") == 130
    assert "interrupted; rerun the same command" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --help

def parsers(module, monkeypatch):
    """The argparse parsers a command line builds (its subcommands' too), caught at parse_args."""
    import argparse

    class Built(Exception):
        pass

    def caught(self, *args, **kwargs):
        raise Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    with pytest.raises(Built) as e:
        module.main([])
    found = [e.value.args[0]]
    for action in found[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.values())
    return found


def test_every_help_shows_the_defaults(monkeypatch):
    """`--help` of every script shows each option's default (sample.py's --max-new-tokens was read from code)."""
    import argparse
    import importlib
    names = sorted(p.stem for p in (REPO / "scripts").glob("*.py") if "def main(" in p.read_text())
    modules = [importlib.import_module(f"scripts.{n}") for n in names]
    modules += [importlib.import_module("data.prepare"), importlib.import_module("data.tokenizer")]
    missing = []
    for module in modules:
        for parser in parsers(module, monkeypatch):
            for action in parser._actions:
                d = action.default
                if not action.option_strings or d is None or d is False or d in ("", [], argparse.SUPPRESS):
                    continue
                text = parser._get_formatter()._format_action(action)
                if "default" not in text:
                    missing.append(f"{module.__name__}: {action.option_strings[0]}")
    assert missing == []
    help_text = parsers(sample, monkeypatch)[0].format_help()
    assert "tokens generated per text (default: 100)" in " ".join(help_text.split())
