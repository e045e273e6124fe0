"""scripts/eval_core.py: prompts (the same strings as nanochat's jinja templates), hand-checked
scoring of each task type on the fixture bundle, centring and the CORE mean, cropping, the CLI
on a checkpoint, and torchrun/DDP giving the same accuracies as one process."""

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tests" / "fixtures" / "core" / "eval_bundle"
sys.path.insert(0, str(REPO))

from conftest import ByteEnc  # noqa: E402
import evals.core  # noqa: E402
from errors import NotFound  # noqa: E402
import numerics  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import eval_core as core  # noqa: E402


class BigramLM(nn.Module):
    """logits(next | prev) = table[prev]: 0 everywhere except the given boosts.
    boosts: {(prev, next): logit}, with "*" as prev for every row."""

    def __init__(self, boosts, block_size=None):
        super().__init__()
        table = torch.zeros(257, 257)
        for (prev, nxt), v in boosts.items():
            rows = slice(None) if prev == "*" else ord(prev)
            table[rows, ord(nxt)] = v
        self.register_buffer("table", table)
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx, targets=None):
        return self.table[idx], None


LIKES_A = BigramLM({("*", "a"): 3.0})  # a unigram model: "a" is likely everywhere
A_THEN_SPACE = BigramLM({("a", " "): 4.0})
SPELLS_ABAB = BigramLM({(":", " "): 4.0, (" ", "a"): 4.0, ("a", "b"): 4.0, ("b", "a"): 4.0})


def task(label):
    tasks, _ = evals.core.load_bundle(BUNDLE)
    return next(t for t in tasks if t["label"] == label)


# ----------------------------------------------------------------------------- prompts

MC = {"query": "Q1?", "choices": ["x", "y"], "gold": 1}
SCHEMA = {"context_options": ["A cat", "A dog"], "continuation": "barks.", "gold": 1}
LM = {"context": "  Spell it: ", "continuation": "abab"}
SHOTS = {"mc": [{"query": "Q2?", "choices": ["p", "q"], "gold": 0}, {"query": "Q3?", "choices": ["r", "s"], "gold": 1}],
         "schema": [{"context_options": ["It rains", "It shines"], "continuation": "today.", "gold": 0}],
         "lm": [{"context": "Say hi: ", "continuation": "hi"}]}


def test_prompts_by_hand():
    assert evals.core.render_prompts_mc(MC, " ") == ["Q1? x", "Q1? y"]
    assert evals.core.render_prompts_mc(MC, "\nAnswer: ", SHOTS["mc"]) == [
        "Q2?\nAnswer: p\n\nQ3?\nAnswer: s\n\nQ1?\nAnswer: x", "Q2?\nAnswer: p\n\nQ3?\nAnswer: s\n\nQ1?\nAnswer: y"]
    assert evals.core.render_prompts_schema(SCHEMA, " ", SHOTS["schema"]) == [
        "It rains today.\n\nA cat barks.", "It rains today.\n\nA dog barks."]
    assert evals.core.render_prompts_lm(LM, " ", SHOTS["lm"]) == ["Say hi: hi\n\nSpell it:", "Say hi: hi\n\nSpell it: abab"]


def test_prompts_match_nanochats_jinja_templates():
    jinja2 = pytest.importorskip("jinja2")
    fs = "{%- for example in fewshot_examples -%}\n"
    mc = fs + ("{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}\n\n{% endfor -%}\n"
               "{{ item.query }}{{ continuation_delimiter }}{{ choice }}")
    schema = fs + ("{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}"
                   "\n\n{% endfor -%}\n{{ context }}{{ continuation_delimiter }}{{ item.continuation }}")
    lm = fs + ("{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}\n\n{% endfor -%}\n"
               "{{ item.context | trim }}{{ continuation_delimiter }}"
               "{% if include_continuation %}{{ item.continuation }}{% endif %}")
    for delim in (" ", "\nAnswer: "):
        for k in (0, 1, 2):
            kw = dict(continuation_delimiter=delim)
            t = jinja2.Template(mc)
            want = [t.render(choice=c, item=MC, fewshot_examples=SHOTS["mc"][:k], **kw) for c in MC["choices"]]
            assert evals.core.render_prompts_mc(MC, delim, SHOTS["mc"][:k]) == want
            t = jinja2.Template(schema)
            want = [t.render(context=c, item=SCHEMA, fewshot_examples=SHOTS["schema"][:k], **kw)
                    for c in SCHEMA["context_options"]]
            assert evals.core.render_prompts_schema(SCHEMA, delim, SHOTS["schema"][:k]) == want
            t = jinja2.Template(lm)
            shots = (SHOTS["lm"] * 2)[:k]
            want = [t.render(include_continuation=False, item=LM, fewshot_examples=shots, **kw).strip(),
                    t.render(include_continuation=True, item=LM, fewshot_examples=shots, **kw)]
            assert evals.core.render_prompts_lm(LM, delim, shots) == want


def test_scored_spans():
    enc = ByteEnc()
    tokens, starts, ends = evals.core.batch_mc(enc, ["Q: ab", "Q: ac", "Q: b"])
    assert all(t[0] == 256 for t in tokens)  # BOS
    assert starts == [4, 4, 4] and ends == [6, 6, 5]  # after the common prefix "<bos>Q: "
    tokens, starts, ends = evals.core.batch_schema(enc, ["A cat barks.", "A dog barks."])
    assert [t[s:e] for t, s, e in zip(tokens, starts, ends)] == [list(b" barks.")] * 2
    tokens, starts, ends = evals.core.batch_lm(enc, ["Spell it:", "Spell it: abab"])
    assert len(tokens) == 1 and tokens[0][starts[0]:ends[0]] == list(b" abab")
    # cropping keeps the end and shifts the indices
    t, s, e = evals.crop([list(range(10))], [6], [10], 4)
    assert t == [[6, 7, 8, 9]] and s == [1] and e == [4]
    assert evals.crop([[1, 2]], [1], [2], None) == ([[1, 2]], [1], [2])


# ----------------------------------------------------------------------------- hand-checked scoring

def token_loss_error(lz):
    """The most an fp32 mean of these models' token losses is off the float64 one: each loss is a logsumexp of 257
    terms, 256 of them equal (so the deterministic gamma: their roundings do not cancel), its log, + max and
    - logit (3 u of log Z = lz); the mean's sum and division (2 u)."""
    return numerics.gamma(257) + 5 * numerics.u() * lz


@pytest.mark.numerics
def test_multiple_choice_by_hand():
    """Only "a" is likely: the all-"a" choice wins; 3 of the 4 golds are all-"a"."""
    data = evals.core.load_task_data(task("toy_mc"))
    outcome = {tuple(d["choices"]): evals.core.evaluate_example(i, LIKES_A, ByteEnc(), data, "cpu", task("toy_mc"))
               for i, d in enumerate(data)}
    ok, info = outcome[("ba", "bb", "aa", "ab")]
    lz = math.log(math.exp(3.0) + 256)
    assert ok and info["pred"] == 2
    numerics.assert_close(info["mean_losses"], [lz - 1.5, lz, lz - 3.0, lz - 1.5], 1.0, "mean losses",
                          scale=token_loss_error(lz))
    ok, info = outcome[("aaa", "bbb")]
    assert not ok and info["pred"] == 0 and info["gold"] == 1
    for label in ("toy_mc", "toy_mc_2shot"):
        assert evals.core.evaluate_task(LIKES_A, ByteEnc(), data, "cpu", task(label)) == 0.75


@pytest.mark.numerics
def test_schema_by_hand():
    """The options differ only in the context's last byte; " " is likely only after "a", so
    the option ending in "a" wins: tea (gold), boa (gold), pizza (gold is sandwich)."""
    data = evals.core.load_task_data(task("toy_schema"))
    la, lu = math.log(math.exp(4.0) + 256) - 4.0, math.log(257)  # " " after "a", any token after the rest
    for i, d in enumerate(data):
        ok, info = evals.core.evaluate_example(i, A_THEN_SPACE, ByteEnc(), data, "cpu", task("toy_schema"))
        assert d["context_options"][info["pred"]].endswith("a")
        n = len(d["continuation"]) + 1  # scored: " " + continuation; only the first loss differs
        worst, best = max(info["mean_losses"]), min(info["mean_losses"])
        # two fp32 means against float64
        numerics.assert_close(worst - best, (lu - la) / n, 1.0, "loss gap", scale=2 * token_loss_error(lu + 4))
    # an fp32 mean of 0s and 1s: an exact sum and one division, within u = 6e-8; approx's default 1e-6 leaves 16x
    assert evals.core.evaluate_task(A_THEN_SPACE, ByteEnc(), data, "cpu", task("toy_schema")) == pytest.approx(2 / 3)


def test_language_modeling_by_hand():
    """Greedy decoding of the model after ":" is " abababa...": "abab" and "ababa" are
    reproduced exactly, "abba" is not (the context's trailing space is trimmed)."""
    data = evals.core.load_task_data(task("toy_lm"))
    got = {d["continuation"]: evals.core.evaluate_example(i, SPELLS_ABAB, ByteEnc(), data, "cpu", task("toy_lm"))[0]
           for i, d in enumerate(data)}
    assert got == {"abab": True, "ababa": True, "abba": False}


def test_core_is_the_mean_centred_accuracy():
    model = BigramLM({("*", "a"): 3.0, (":", " "): 6.0, (" ", "a"): 6.0, ("a", "b"): 6.0, ("b", "a"): 6.0,
                      ("a", " "): 9.0})
    res = evals.core.evaluate_core(model, ByteEnc(), "cpu", BUNDLE, log=None)
    with open(BUNDLE / "eval_meta_data.csv", newline="") as f:
        base = {r["Eval Task"]: float(r["Random baseline"]) / 100 for r in csv.DictReader(f)}
    assert list(res["results"]) == ["toy_mc", "toy_mc_2shot", "toy_schema", "toy_lm"]
    # the centring and the mean: float64 arithmetic of a few operations on both sides (1e-16 relative): approx's
    # default 1e-6 is far above that and far below a wrong formula
    for label, acc in res["results"].items():
        assert res["centered"][label] == pytest.approx((acc - base[label]) / (1 - base[label]))
    assert res["core"] == pytest.approx(sum(res["centered"].values()) / 4)
    assert res["complete"] is False  # 4 toy tasks, not the 22 of CORE
    assert evals.core.centered(0.75, 25) == pytest.approx(2 / 3) and evals.core.centered(0.5, 0) == 0.5
    sub = evals.core.evaluate_core(model, ByteEnc(), "cpu", BUNDLE, labels=["toy_lm"], max_per_task=2, log=None)
    assert list(sub["results"]) == ["toy_lm"] and sub["max_per_task"] == 2


def test_complete_only_with_all_22_tasks(tmp_path):
    (tmp_path / "eval_data").mkdir()
    item = {"query": "Pick:", "choices": ["bb", "aa"], "gold": 1}
    (tmp_path / "eval_data" / "t.jsonl").write_text((json.dumps(item) + "\n") * 2)
    (tmp_path / "core.yaml").write_text("icl_tasks:\n" + "".join(
        f"-\n  label: {name}\n  dataset_uri: t.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
        for name in evals.core.CORE_TASKS))
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n" + "".join(
        f"{name},{i}\n" for i, name in enumerate(evals.core.CORE_TASKS)))
    res = evals.core.evaluate_core(LIKES_A, ByteEnc(), "cpu", tmp_path, log=None)
    assert res["complete"] is True and res["core"] == pytest.approx(1.0)   # float64 mean of 22 centred 1s
    assert evals.core.evaluate_core(LIKES_A, ByteEnc(), "cpu", tmp_path, max_per_task=1, log=None)["complete"] is False


def test_missing_bundle_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval_bundle.zip"):
        evals.core.load_bundle(tmp_path)
    with pytest.raises(ValueError, match="not in"):
        evals.core.evaluate_core(LIKES_A, ByteEnc(), "cpu", BUNDLE, labels=["hellaswag"], log=None)


def test_download_bundle_unpacks_once(tmp_path):
    import zipfile
    z = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in BUNDLE.rglob("*"):
            if p.is_file():
                zf.write(p, "eval_bundle/" + str(p.relative_to(BUNDLE)))
    dest = evals.core.download_bundle(tmp_path / "cache" / "eval_bundle", url="file://" + str(z))
    assert evals.core.load_bundle(dest)[0] == [dict(t, dataset=dest / t["dataset"].relative_to(BUNDLE))
                                         for t in evals.core.load_bundle(BUNDLE)[0]]
    z.unlink()
    assert evals.core.download_bundle(dest, url="file://" + str(z)) == dest  # already there: no download
    with pytest.raises(NotFound, match="--bundle-dir"):  # one line from the scripts (errors.py)
        evals.core.download_bundle(tmp_path / "other", url="file://" + str(z))


# ----------------------------------------------------------------------------- real tokenizer, CLI, DDP

def test_cropping_to_the_block_size(enc):
    """A GPT with a block size shorter than the few-shot prompts still scores every item."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).eval()
    lengths = []
    model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    res = evals.core.evaluate_core(model, enc, "cpu", BUNDLE, log=None)
    tasks = evals.core.load_bundle(BUNDLE)[0]
    sizes = {t["label"]: len(evals.core.load_task_data(t)) for t in tasks}
    assert set(res["results"]) == set(sizes)
    assert len(lengths) == sum(sizes.values()) and max(lengths) == 24   # one forward per item, cropped to 24


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(5)
    cfg = GPTConfig(block_size=128, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, scheme="mhc", n_streams=2)
    torch.save({"model": GPT(cfg).state_dict(), "model_config": asdict(cfg), "step": 3, "config": {}}, d / "ckpt.pt")
    return d


def test_cli_and_torchrun(ckpt_dir, enc, tmp_path):
    res = core.main(["--ckpt", str(ckpt_dir), "--bundle-dir", str(BUNDLE), "--device", "cpu"])
    saved = json.loads((ckpt_dir / "core.json").read_text())
    assert saved["results"] == res["results"] and saved["step"] == 3 and saved["complete"] is False
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "scripts/eval_core.py", "--ckpt", str(ckpt_dir), "--bundle-dir", str(BUNDLE),
                        "--device", "cpu", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads(out.read_text())
    # exact: every accuracy is a count of items (each scored on its own, whichever rank) over their number, and the
    # core the same float64 arithmetic on those; an item scored otherwise changes a count, which no tolerance
    # should absorb
    assert ddp["results"] == res["results"] and ddp["core"] == res["core"]
