"""scripts/eval_lm.py and evals/harness.py: hcgpt checkpoints through lm-evaluation-harness, offline, on
task YAMLs written here (multiple choice, rolling log-likelihood, generation, HellaSwag's own task
on the HellaSwag fixture). The scores are checked against log-probabilities computed directly
with the model; left truncation, batch-size invariance, the GPT-2 and a trained tokenizer,
log.jsonl / wandb records, the HellaSwag cross-check and every bad input's error."""

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiktoken
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lm_eval  # noqa: E402  (the tests need it; it is in requirements.txt)
import checkpoint  # noqa: E402
import evals  # noqa: E402
import rundir  # noqa: E402
from conftest import tiny_args  # noqa: E402
from evals import harness  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import crosscheck_hellaswag, eval_lm  # noqa: E402

HELLASWAG_FIXTURE = REPO / "tests" / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"
HELLASWAG_YAML = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"

MC = [{"question": f"Question {i}: what comes after {i}?", "choices": [f"{i + 1}", "a banana", "the word seven"],
       "label": i % 3} for i in range(6)]
PPL = [{"text": "def add(a, b):\n    return a + b\n" * (k + 1)} for k in range(3)]  # 12 to 36 GPT-2 tokens
GEN = [{"prompt": f"x = {i}\ny = ", "answer": f"{i + 1}"} for i in range(4)]


def write_tasks(d, cache):
    """A task directory: t_mc (multiple choice), t_ppl (loglikelihood_rolling), t_gen (generate_until),
    hs_lmeval (lm-eval's own hellaswag task on the fixture) and hs_raw (the fixture's raw ctx, as evals/hellaswag.py)."""
    d.mkdir()
    for name, rows in (("mc", MC), ("ppl", PPL), ("gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def data(split, path):
        return f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    {split}: {path}\n"

    (d / "t_mc.yaml").write_text(data("test", d / "mc.jsonl") + """task: t_mc
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "t_ppl.yaml").write_text(data("test", d / "ppl.jsonl") + """task: t_ppl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (d / "t_gen.yaml").write_text(data("test", d / "gen.jsonl") + """task: t_gen
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (d / "hs_lmeval.yaml").write_text(f"task: hs_lmeval\ninclude: {HELLASWAG_YAML}\ntraining_split: null\n"
                                      + data("validation", HELLASWAG_FIXTURE))
    (d / "hs_raw.yaml").write_text(data("validation", HELLASWAG_FIXTURE) + """task: hs_raw
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    return write_tasks(root / "tasks", root / "hf_cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    """A tiny kromhc run trained 5 steps by train.py (block_size 32, GPT-2 vocabulary)."""
    import train
    out = tmp_path_factory.mktemp("lm_eval_run") / "run"
    train.main(tiny_args(data_dir, out, "--scheme=kromhc", "--n_streams=4", "--max_iters=5"))
    return out


def save_gpt(d, seed=0, **kw):
    """A GPT built here and saved as a train.py checkpoint (no training: fast, and any arch)."""
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, scheme="mhc", n_streams=2)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "step": 3, "tokens": 96,
                "config": {}}, d / "ckpt.pt")
    return d


def lm_of(path, batch_size=4, tokenizer=None):
    model, meta = checkpoint.load_model(path)
    return harness.HcgptLM(model, tokenizer or checkpoint.load_tokenizer(meta), "cpu", batch_size)


def reqs(*args):
    return [SimpleNamespace(args=a) for a in args]


@torch.no_grad()
def logprobs(model, tokens):
    """log softmax of the model's logits for a token row: (len(tokens), vocab)."""
    return model(torch.tensor([tokens]))[0][0].float().log_softmax(-1)


def direct_ll(model, context, continuation):
    """log P(continuation | context) from one forward of context + continuation (no truncation)."""
    lp = logprobs(model, (context + continuation)[:-1])
    return sum(lp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


def direct_rolling(model, tokens, eot, block):
    """log P(text) with every token predicted once from up to `block` preceding tokens, <|endoftext|>
    before the first, in chunks of `block` targets (lm-eval's definition, written out here)."""
    padded, total = [eot] + tokens, 0.0
    for s in range(0, len(tokens), block):
        e = min(s + block, len(tokens))  # targets tokens[s:e] = padded[s + 1:e + 1]
        lo = max(0, e - block)  # the window padded[lo:e] predicts padded[lo + 1:e + 1]
        lp = logprobs(model, padded[lo:e])
        total += sum(lp[k - lo, padded[k + 1]].item() for k in range(s, e))
    return total


# ----------------------------------------------------------------------------- scoring

def test_loglikelihood_is_the_models_log_probability(run_dir):
    lm = lm_of(run_dir)
    enc, model = lm.enc, lm.model
    ctx, cont = "The function returns", " the sum of a and b"
    (ll, greedy), (ll_empty, _) = lm.loglikelihood(reqs((ctx, cont), ("", "import os")))
    assert ll == pytest.approx(direct_ll(model, enc.encode(ctx), enc.encode(cont)), abs=1e-4)
    # an empty context is <|endoftext|>, as lm-eval's Hugging Face model does for GPT-2
    assert ll_empty == pytest.approx(direct_ll(model, [enc.eot_token], enc.encode("import os")), abs=1e-4)
    # greedy: the continuation the model itself would pick, token by token
    ids = model.generate(torch.tensor([enc.encode(ctx)]), 3, temperature=0)[0, -3:].tolist()
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, enc.encode(ctx), ids),
                                                                (None, enc.encode(ctx), enc.encode(cont))])
    assert is_greedy and not greedy and not not_greedy


def test_arch_nanochat_scores_too(tmp_path):
    lm = lm_of(save_gpt(tmp_path / "nc", arch="nanochat", scheme="kromhc", n_streams=4, bias=False))
    ctx, cont = lm.enc.encode("Hello there,"), lm.enc.encode(" general Kenobi")
    [(ll, _)] = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert ll == pytest.approx(direct_ll(lm.model, ctx, cont), abs=1e-4)


def test_left_truncation_keeps_block_size_plus_one_tokens(run_dir):
    """A context + continuation longer than block_size + 1 loses tokens on the left: it scores as the
    untruncated request on the last block_size + 1 - len(continuation) context tokens."""
    lm = lm_of(run_dir)
    B = lm.max_length
    context, cont = lm.enc.encode("one two three four five six seven eight nine ten " * 6), lm.enc.encode(" eleven")
    assert len(context) + len(cont) > B + 1
    keep = B + 1 - len(cont)
    [(cut, _), (short, _), (shorter, _)] = lm._loglikelihood_tokens(
        [(None, context, cont), (None, context[-keep:], cont), (None, context[-keep + 1:], cont)])
    assert cut == pytest.approx(direct_ll(lm.model, context[-keep:], cont), abs=1e-4)
    assert cut == pytest.approx(short, abs=1e-5) and abs(cut - shorter) > 1e-4
    with pytest.raises(ValueError, match="longer than the model's block_size 32"):
        lm._loglikelihood_tokens([(None, context[:1], context[:B + 1])])


def test_rolling_loglikelihood_windows(run_dir):
    lm = lm_of(run_dir)
    got = lm.loglikelihood_rolling(reqs(*[(r["text"],) for r in PPL]))
    for text, ll in zip((r["text"] for r in PPL), got):
        tokens = lm.enc.encode(text)
        assert ll == pytest.approx(direct_rolling(lm.model, tokens, lm.enc.eot_token, lm.max_length), abs=1e-3)
    assert len(lm.enc.encode(PPL[-1]["text"])) > 32  # one text spans several windows


def test_generation_is_greedy_and_stops(run_dir):
    lm = lm_of(run_dir)
    until = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    prompts = ["x = 1\ny = ", "def f(a):\n", "import"]
    got = lm.generate_until(reqs(*[(p, until) for p in prompts]))
    for p, text in zip(prompts, got):
        ids = lm.model.generate(torch.tensor([lm.enc.encode(p)]), 5, temperature=0)[0, len(lm.enc.encode(p)):]
        want = lm.enc.decode(ids.tolist()).split("\n")[0].split("<|endoftext|>")[0]
        assert text == want
    with pytest.raises(ValueError, match="max_gen_toks below 32"):
        lm.generate_until(reqs(("x", {"until": ["\n"], "max_gen_toks": 40})))


def test_batch_size_does_not_change_results(run_dir):
    one, many = lm_of(run_dir, batch_size=1), lm_of(run_dir, batch_size=5)
    ll = reqs(*[(r["question"], c) for r in MC for c in r["choices"]], ("long " * 40, " tail"))
    rolling = reqs(*[(r["text"],) for r in PPL])
    gen = reqs(*[(r["prompt"], {"until": ["\n"], "max_gen_toks": 6}) for r in GEN])
    a, b = one.loglikelihood(ll), many.loglikelihood(ll)
    assert [g for _, g in a] == [g for _, g in b]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-5)
    assert one.loglikelihood_rolling(rolling) == pytest.approx(many.loglikelihood_rolling(rolling), abs=1e-4)
    assert one.generate_until(gen) == many.generate_until(gen)


# ----------------------------------------------------------------------------- the script, end to end

def test_local_tasks_end_to_end(run_dir, tasks_dir, capsys):
    res = eval_lm.main([str(run_dir), "--tasks", "t_mc,t_ppl,t_gen", "--include-path", str(tasks_dir),
                        "--device", "cpu", "--batch-size", "3"])
    out = capsys.readouterr().out
    r = res["results"]
    assert set(r) == {"t_mc", "t_ppl", "t_gen"} and "acc_norm" in out and "bits_per_byte" in out
    # the multiple-choice metrics from the model's own log-probabilities of each choice
    model, enc = checkpoint.load_model(run_dir)[0], checkpoint.load_tokenizer({})
    acc = acc_norm = 0
    for doc in MC:
        # lm-eval scores " " + choice (its target delimiter) and divides by len(choice) for acc_norm
        lls = [direct_ll(model, enc.encode(doc["question"]), enc.encode(" " + c)) for c in doc["choices"]]
        acc += max(range(3), key=lambda i: lls[i]) == doc["label"]
        acc_norm += max(range(3), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    assert r["t_mc"]["acc,none"] == pytest.approx(acc / len(MC))
    assert r["t_mc"]["acc_norm,none"] == pytest.approx(acc_norm / len(MC))
    # bits per byte of the rolling task: -sum(log P) / ln 2 / bytes, pooled over the documents
    lls = [direct_rolling(model, enc.encode(d["text"]), enc.eot_token, 32) for d in PPL]
    nbytes = sum(len(d["text"].encode()) for d in PPL)
    assert r["t_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / math.log(2) / nbytes, rel=1e-5)
    assert 0.0 <= r["t_gen"]["exact_match,none"] <= 1.0

    saved = json.loads((run_dir / "lm_eval_t_mc+t_ppl+t_gen_step5.json").read_text())
    assert saved["results"] == json.loads(json.dumps(r)) and "samples" not in saved
    assert saved["config"]["step"] == 5 and saved["config"]["scheme"] == "kromhc"
    assert saved["config"]["tokenizer"] == "gpt2" and saved["config"]["dtype"] == "float32"
    record = rundir.read_log(run_dir / "log.jsonl")[-1]
    assert record["type"] == "lm_eval" and record["step"] == 5 and record["tasks"] == ["t_mc", "t_ppl", "t_gen"]
    assert record["lm_eval/t_mc/acc_norm"] == r["t_mc"]["acc_norm,none"]
    assert record["lm_eval/t_ppl/bits_per_byte"] == r["t_ppl"]["bits_per_byte,none"]
    assert record["lm_eval/t_gen/exact_match"] == r["t_gen"]["exact_match,none"]


def test_a_trained_tokenizer_is_used(run_dir, tasks_dir, monkeypatch, tmp_path):
    """checkpoint.load_tokenizer is where the scripts get a run's tokenizer: a byte-level Encoding
    (another vocabulary, end-of-text 256) returned there is what the rolling task is scored with."""
    byte_enc = tiktoken.Encoding(name="bytes256", pat_str=r"[\s\S]", special_tokens={"<|endoftext|>": 256},
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda meta: byte_enc)
    out = tmp_path / "bytes.json"
    res = eval_lm.main([str(run_dir), "--tasks", "t_ppl", "--include-path", str(tasks_dir), "--device", "cpu",
                        "--output", str(out)])
    model = checkpoint.load_model(run_dir)[0]
    lls = [direct_rolling(model, list(d["text"].encode()), 256, 32) for d in PPL]
    nbytes = sum(len(d["text"].encode()) for d in PPL)
    assert res["results"]["t_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / math.log(2) / nbytes, rel=1e-5)
    assert json.loads(out.read_text())["config"]["tokenizer"] == "bytes256"


def test_commonsense_suite_names_its_tasks_and_metrics(tasks_dir):
    assert harness.expand_tasks("commonsense") == ["hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande",
                                                   "openbookqa", "boolq", "social_iqa"]
    assert harness.expand_tasks("t_mc,commonsense,piqa")[:3] == ["t_mc", "hellaswag", "piqa"]
    harness.check_tasks(list(harness.COMMONSENSE), tasks_dir)  # every one is a task of the installed lm-eval
    results = {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.25} for t in harness.COMMONSENSE}}
    avg = (3 * 0.25 + 5 * 0.5) / 8  # acc_norm for hellaswag, arc_challenge, openbookqa; acc for the other five
    assert harness.suite_averages(results) == {"commonsense": pytest.approx(avg)}
    assert harness.flat_metrics(results)["lm_eval/commonsense/avg"] == pytest.approx(avg)
    del results["results"]["boolq"]
    assert harness.suite_averages(results) == {}  # no average of a partial suite


def test_wandb_run_gets_the_results(tmp_path, tasks_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    d = save_gpt(tmp_path / "wb")
    ckpt = torch.load(d / "ckpt.pt", weights_only=False)
    ckpt.update(wandb_id="hcgptlmeval1", config={"wandb_log": True, "wandb_mode": "offline", "wandb_project": "hcgpt",
                                                "wandb_run_name": "wb-lm-eval"})
    torch.save(ckpt, d / "ckpt.pt")
    eval_lm.main([str(d), "--tasks", "t_mc", "--include-path", str(tasks_dir), "--device", "cpu", "--limit", "2"])
    runs = list((tmp_path / "wandb").glob("offline-run-*-hcgptlmeval1"))
    assert len(runs) == 1
    wandb_file = runs[0] / "run-hcgptlmeval1.wandb"
    for _ in range(60):  # wandb's service process may still be writing the file after run.finish() returns
        data = wandb_file.read_bytes()
        if b"lm_eval/t_mc/acc_norm" in data:
            break
        time.sleep(0.5)
    for key in (b"lm_eval/t_mc/acc_norm", b"lm_eval/step", b"wb-lm-eval"):
        assert key in data, key


def test_the_documented_example_tasks_parse():
    """docs/lm-eval-tasks (the example of docs/lm-eval.md): every YAML reads, every data file is there."""
    d = REPO / "docs" / "lm-eval-tasks"
    harness.check_task_dir(d)
    for y in d.glob("*.yaml"):
        cfg = harness.load_yaml(y, resolve_func=False, recursive=True)
        for path in cfg["dataset_kwargs"]["data_files"].values():
            assert [json.loads(line) for line in (REPO / path).read_text().splitlines()], path


def test_the_documented_example_tasks_raise_no_lm_eval_warning(monkeypatch, caplog):
    """A task built from each docs/lm-eval-tasks YAML logs no warning (a metric without its aggregation or
    higher_is_better does); the task is built up to its dataset, which the warnings come before."""
    from lm_eval.api.task import ConfigurableTask

    class Built(Exception):
        pass

    def download(self, *args, **kwargs):
        raise Built

    monkeypatch.setattr(ConfigurableTask, "download", download)
    for y in sorted((REPO / "docs" / "lm-eval-tasks").glob("*.yaml")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="lm_eval"), pytest.raises(Built):
            ConfigurableTask(config=harness.load_yaml(y, resolve_func=True, recursive=True))
        assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"], y.name


def test_wandb_online_without_key_stops_before_the_evaluation(tmp_path, tasks_dir, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    d = save_gpt(tmp_path / "online")
    ckpt = torch.load(d / "ckpt.pt", weights_only=False)
    ckpt.update(wandb_id="abc", config={"wandb_log": True, "wandb_mode": "online"})
    torch.save(ckpt, d / "ckpt.pt")
    fails([str(d), "--tasks", "t_mc", "--include-path", str(tasks_dir), "--device", "cpu"], capsys,
          "wandb run abc online", "`wandb login`", "WANDB_MODE=offline", "--no-wandb")
    assert not list(d.glob("lm_eval_*.json"))  # refused before the evaluation


# ----------------------------------------------------------------------------- HellaSwag cross-check

def test_hellaswag_crosscheck(tmp_path, tasks_dir):
    """lm-eval's own hellaswag task and evals/hellaswag.py on the same items: each accuracy equals its own
    definition; with the same prompt text (hs_raw) the summed log-likelihoods agree and only
    acc_norm's normalisation (characters vs tokens) separates them."""
    d = save_gpt(tmp_path / "hs", block_size=128)
    for task in ("hs_lmeval", "hs_raw"):
        out = tmp_path / f"{task}.json"
        crosscheck_hellaswag.main([str(d), "--task", task, "--include-path", str(tasks_dir), "--device", "cpu",
                                   "--batch-size", "3", "--output", str(out)])
        res = json.loads(out.read_text())
        assert res["n"] == 7
        for item in res["items"]:
            le, ev = item["lm_eval"], item["evals"]
            assert le["pred_norm"] == max(range(4), key=lambda i: (le["ll"][i] / le["chars"][i], -i))
            assert le["acc_norm"] == (le["pred_norm"] == item["label"])
            assert ev["pred_norm"] == min(range(4), key=lambda i: (ev["sum_loss"][i] / ev["ntokens"][i], i))
        assert res["lm_eval"] == pytest.approx(res["lm_eval_by_definition"])
        assert res["evals"] == pytest.approx(res["evals_by_definition"])
    assert res["max_ll_diff"] < 1e-3 and res["same_pred"] == 1.0  # hs_raw: the same numbers, the same acc
    assert res["same_pred_norm"] < 1.0  # characters and tokens pick different endings on some items


# ----------------------------------------------------------------------------- bad input

def fails(argv, capsys, *expected):
    with pytest.raises(SystemExit) as e:
        eval_lm.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert err.startswith("eval_lm.py: error:") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def test_bad_input_is_named(tmp_path, tasks_dir, capsys):
    ok = save_gpt(tmp_path / "ok")
    local = ["--include-path", str(tasks_dir), "--device", "cpu"]
    fails([str(tmp_path / "nope"), "--tasks", "t_mc", *local], capsys, "no checkpoint at", "ckpt.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"\x00not a checkpoint" * 10)
    fails([str(tmp_path / "bad"), "--tasks", "t_mc", *local], capsys, "not a readable checkpoint")
    fails([str(ok), "--tasks", "t_mcc", *local], capsys, "unknown task 't_mcc'", "did you mean t_mc", "--include-path")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.yaml").write_text("task: x\ndataset_path: json\n  dataset_kwargs: [unclosed\n")
    fails([str(ok), "--tasks", "x", "--include-path", str(broken)], capsys,
          "x.yaml is not a task file lm-eval can read")
    fails([str(ok), "--tasks", "x", "--include-path", str(tmp_path / "none")], capsys, "no such directory")
    fails([str(ok), "--tasks", ",", *local], capsys, "names no task")


def test_download_only_and_a_dataset_missing_offline(tmp_path, tasks_dir, monkeypatch, capsys):
    eval_lm.main(["--download-only", "--tasks", "t_mc,t_ppl", "--include-path", str(tasks_dir)])
    out = capsys.readouterr().out
    assert "t_mc: test 6" in out and "t_ppl: test 3" in out and "HF_DATASETS_OFFLINE=1" in out

    def offline(**kw):  # what `datasets` raises for a hub dataset that is not cached, offline
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(harness.lm_eval, "simple_evaluate", offline)
    fails([str(save_gpt(tmp_path / "ok")), "--tasks", "t_mc", "--include-path", str(tasks_dir), "--device", "cpu"],
          capsys, "Rowan/hellaswag", "--download-only --tasks t_mc", "HF_DATASETS_OFFLINE=1")


def test_lm_eval_missing_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "evals.harness")  # imported again by eval_lm.py, which then fails
    monkeypatch.delattr(evals, "harness")
    fails([str(save_gpt(tmp_path / "ok")), "--tasks", "hellaswag"], capsys, "pip install lm-eval==0.4.13")


def test_training_never_imports_lm_eval():
    code = ("import sys; import train, evals, rundir, tracking, common; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lm_eval' or m == 'evals.harness'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
