"""scripts/eval_hellaswag.py: llm.c's completion-style scoring (checked by hand and against a
plain re-implementation), batching and cropping, the cached download, the CLI on a checkpoint,
and torchrun/DDP giving the same counts as one process."""

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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"
sys.path.insert(0, str(REPO))

from conftest import ByteEnc  # noqa: E402
import evals.hellaswag  # noqa: E402
from errors import NotFound  # noqa: E402
import numerics  # noqa: E402
import checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import eval_hellaswag as hs  # noqa: E402


class UnigramLM(nn.Module):
    """The same next-token distribution at every position: logit `boost` for the bytes of
    `liked`, 0 for the other 256 tokens."""

    def __init__(self, liked="a", boost=3.0):
        super().__init__()
        logits = torch.zeros(257)
        logits[list(liked.encode())] = boost
        self.register_buffer("row", logits)
        self.config = SimpleNamespace(block_size=None)

    def forward(self, idx, targets=None):
        return self.row.expand(*idx.shape, 257), None


def tiny_gpt(vocab_size=257, block_size=256, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, scheme="kromhc",
               n_streams=4)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def reference_scores(model, example, enc):
    """llm.c's evaluate loop for one item, written out plainly: one row per ending, no batching."""
    ctx = enc.encode_ordinary(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)
        tokens = torch.tensor([ctx + end])
        with torch.no_grad():
            logits, _ = model(tokens)
        losses = F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
        ending_losses = losses[len(ctx) - 1:]  # the losses that predict the ending's tokens
        assert len(ending_losses) == len(end)
        sums.append(ending_losses.sum().item())
        means.append(ending_losses.mean().item())
    return sums, means


@pytest.fixture(scope="module")
def examples():
    return evals.hellaswag.load_examples(FIXTURE)


# ----------------------------------------------------------------------------- scoring

def test_fixture_is_in_the_official_format(examples):
    keys = {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id"}
    assert len(examples) == 7
    for ex in examples:
        assert set(ex) == keys and len(ex["endings"]) == 4 and ex["label"] in range(4)
    assert evals.hellaswag.load_examples(FIXTURE, limit=3) == examples[:3]


@pytest.mark.numerics
def test_hand_checked_acc_norm_vs_acc(examples):
    """Unigram model liking "a": per-token loss log Z - 3 for "a", log Z for any other byte
    (Z = e^3 + 256). Item 0, endings " bb", " aaaa", " b", " ab" (the space is a token too):
    mean loss is lowest for " aaaa" (the label): acc_norm right; the summed loss is lowest for the
    short " b": acc wrong. Item 1: " aaa" wins both ways."""
    lz = math.log(math.exp(3.0) + 256)
    la, lo = lz - 3.0, lz
    expected_sums = [3 * lo, lo + 4 * la, 2 * lo, 2 * lo + la]
    expected_means = [s / n for s, n in zip(expected_sums, (3, 5, 2, 3))]
    preds = []
    res = evals.hellaswag.evaluate_hellaswag(UnigramLM(), examples[:2], "cpu", enc=ByteEnc(), predictions=preds)
    # fp32 against float64: each token's loss is a logsumexp of 257 terms, 256 of them equal (so the deterministic
    # gamma: their roundings do not cancel), its log, + max and - logit (3 u of log Z); then sums of <= 5 tokens
    per_token = numerics.gamma(257) + 3 * numerics.u() * lz
    bound = 5 * per_token + numerics.gamma(5) * max(expected_sums)
    numerics.assert_close(preds[0]["sum_loss"], expected_sums, 1.0, "sum losses", scale=bound)
    numerics.assert_close(preds[0]["mean_loss"], expected_means, 1.0, "mean losses",
                          scale=bound + numerics.u() * max(expected_means))   # / n: its error, and one rounding
    assert (preds[0]["pred_norm"], preds[0]["pred"], preds[0]["label"]) == (1, 2, 1)
    assert (preds[1]["pred_norm"], preds[1]["pred"], preds[1]["label"]) == (0, 0, 0)
    assert res == {"acc_norm": 1.0, "acc": 0.5, "n": 2, "correct_norm": 2, "correct": 1}


@pytest.fixture(scope="module")
def reference(examples):
    model, enc = tiny_gpt(), ByteEnc()
    return model, [reference_scores(model, ex, enc) for ex in examples]


def forward_path(T):
    """tiny_gpt's forward to the per-token losses at up to T positions, and their sum over up to T tokens, in two
    fp32 orders (other batch shapes): numerics.gpt2_path, relative to the (positive) losses."""
    return numerics.gpt2_path(2, 32, 2, T, 257, T, n=4, res=numerics.res_widths("kromhc", 4), backward=False)


@pytest.mark.numerics
@pytest.mark.parametrize("batch_size", [3, 8])  # 3: the last batch is partial
def test_batched_scores_match_the_plain_reference(examples, reference, batch_size):
    model, refs = reference
    preds = []
    res = evals.hellaswag.evaluate_hellaswag(model, examples, "cpu", enc=ByteEnc(), batch_size=batch_size, predictions=preds)
    assert [p["index"] for p in preds] == list(range(len(examples)))
    rel = forward_path(256)   # rows of at most block_size tokens
    for p, (sums, means) in zip(preds, refs):
        numerics.assert_close(p["sum_loss"], sums, rel, f"item {p['index']}: sum losses")
        numerics.assert_close(p["mean_loss"], means, rel + numerics.u(), f"item {p['index']}: mean losses")
        assert p["pred"] == min(range(4), key=sums.__getitem__)
        assert p["pred_norm"] == min(range(4), key=means.__getitem__)
    assert res["n"] == len(examples)
    assert res["correct_norm"] == sum(p["pred_norm"] == p["label"] for p in preds)
    assert not model.training  # left as it was


@pytest.mark.numerics
def test_long_rows_are_cropped_on_the_left(examples):
    model, enc = tiny_gpt(block_size=16), ByteEnc()
    rows, _ = evals.hellaswag.render_example(examples[2], enc)
    assert max(len(t) for t, _ in rows) > 16
    sums, means = evals.hellaswag.score_rows(model, rows, "cpu", block_size=16)
    for (tokens, start), s, m in zip(rows, sums, means):
        cut = len(tokens) - 16
        kept, start = tokens[cut:], max(start - cut, 1)
        x = torch.tensor([kept])
        losses = F.cross_entropy(model(x)[0][0, :-1], x[0, 1:], reduction="none")[start - 1:]
        numerics.assert_close(s, losses.sum(), forward_path(16), "sum loss")
        numerics.assert_close(m, losses.mean(), forward_path(16) + numerics.u(), "mean loss")


def test_training_mode_is_restored(examples):
    model = tiny_gpt().train()
    evals.hellaswag.evaluate_hellaswag(model, examples[:2], "cpu", enc=ByteEnc())
    assert model.training


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": ""}) + "\n")
    with pytest.raises(ValueError, match="test.jsonl:1"):
        evals.hellaswag.load_examples(bad)


# ----------------------------------------------------------------------------- download

def test_download_once_then_cached(tmp_path, monkeypatch):
    src = tmp_path / "upstream"
    src.mkdir()
    (src / "hellaswag_val.jsonl").write_bytes(FIXTURE.read_bytes())
    monkeypatch.setattr(evals.hellaswag, "URL", "file://" + str(src) + "/hellaswag_{split}.jsonl")
    monkeypatch.setenv("HCGPT_CACHE_DIR", str(tmp_path / "cache"))
    path = evals.hellaswag.download("val")
    assert path == tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
    assert path.read_bytes() == FIXTURE.read_bytes()
    (src / "hellaswag_val.jsonl").unlink()  # upstream gone: the cached copy is used
    assert evals.hellaswag.load_examples(split="val") == evals.hellaswag.load_examples(FIXTURE)
    with pytest.raises(NotFound, match="--data-file"):  # one line from the scripts (errors.py)
        evals.hellaswag.download("train")  # not cached, and the "network" has no such file
    assert not list((tmp_path / "cache" / "hellaswag").glob("*.tmp*"))


# ----------------------------------------------------------------------------- CLI and DDP

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, enc):
    """A checkpoint in train.py's format of a tiny GPT-2-vocabulary model."""
    d = tmp_path_factory.mktemp("run")
    model = tiny_gpt(vocab_size=50304, block_size=64, n_layer=1, n_embd=16, seed=3)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "step": 7, "tokens": 7 * 2048,
                "config": {}}, d / "ckpt.pt")
    return d


def test_cli_writes_results_next_to_the_checkpoint(ckpt_dir, enc, examples):
    res = hs.main(["--ckpt", str(ckpt_dir), "--data-file", str(FIXTURE), "--device", "cpu", "--batch-size", "3"])
    saved = json.loads((ckpt_dir / "hellaswag.json").read_text())
    assert saved["n"] == 7 and saved["step"] == 7 and saved["acc_norm"] == res["acc_norm"]
    model, meta = checkpoint.load_model(ckpt_dir)
    assert meta["step"] == 7 and "model" not in meta
    assert evals.hellaswag.evaluate_hellaswag(model, examples, "cpu", enc=enc) == res


def test_torchrun_ddp_matches_one_process(ckpt_dir, tmp_path, enc, examples):
    """2 processes (gloo), items strided over ranks, counts all-reduced: the same as one process."""
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "scripts/eval_hellaswag.py", "--ckpt", str(ckpt_dir), "--data-file", str(FIXTURE),
                        "--device", "cpu", "--batch-size", "2", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads(out.read_text())
    one = evals.hellaswag.evaluate_hellaswag(checkpoint.load_model(ckpt_dir)[0], examples, "cpu", enc=enc)
    assert {k: ddp[k] for k in one} == one and one["n"] == 7


def test_train_logs_hellaswag_at_each_eval(tmp_path, data_dir):
    import train
    data = data_dir
    out = tmp_path / "run"
    train.main([f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--scheme=kromhc", "--n_layer=1",
                "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=2", "--total_batch_tokens=128",
                "--eval_tokens=256", "--eval_interval=2", "--max_iters=2", "--warmup_iters=1",
                "--hellaswag", f"--hellaswag_file={FIXTURE}", "--hellaswag_limit=5"])
    records = [json.loads(line) for line in open(out / "log.jsonl") if '"eval"' in line]
    assert [e["step"] for e in records] == [0, 2]
    # the logged accuracies are those of the step-2 checkpoint, scored again here on the same 5 items
    again = evals.hellaswag.evaluate_hellaswag(checkpoint.load_model(out)[0], evals.hellaswag.load_examples(FIXTURE, limit=5), "cpu")
    assert again["n"] == 5
    assert (records[-1]["hellaswag_acc_norm"], records[-1]["hellaswag_acc"]) == (again["acc_norm"], again["acc"])


def test_train_names_a_missing_hellaswag_file(tmp_path, data_dir):
    import train
    from errors import ConfigError
    data = data_dir
    with pytest.raises(ConfigError, match="hellaswag_file"):
        train.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--n_layer=1",
                    "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=2", "--total_batch_tokens=128",
                    "--eval_tokens=256", "--max_iters=1", "--hellaswag", f"--hellaswag_file={tmp_path / 'no.jsonl'}"])
