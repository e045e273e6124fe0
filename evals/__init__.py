"""Evaluations, one module a task; each score equals its reference's.

    evals/val.py        val loss and bits per byte over fixed val windows; the residual diagnostics
    evals/hellaswag.py  HellaSwag: acc_norm / acc as nanoGPT and llm.c score it
    evals/core.py       CORE: the 22 DCLM tasks as nanochat scores them
    evals/harness.py    a checkpoint as an lm-evaluation-harness model (the only module that imports lm_eval)
    evals/stories.py    story completions graded by an LLM judge, after TinyStories' GPT-Eval
    evals/results.py    the results file an evaluation writes next to a checkpoint (one writer)
    evals/training.py   what train.py evaluates every eval_interval steps and at the end of a run

Every scorer takes the uncompiled, unwrapped model; under torch.distributed every rank must call it (each scores
its share, the sums are all-reduced). Here: the data cache and what the task modules share."""

import json
import os
import shutil
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from errors import ConfigError, NotFound


def cache_root():
    """$HCGPT_CACHE_DIR, else ~/.cache/hcgpt: where downloaded evaluation data is kept."""
    return Path(os.environ.get("HCGPT_CACHE_DIR", Path.home() / ".cache" / "hcgpt")).expanduser()


def fetch(url, path, without_network):
    """url's bytes into the file path, atomically (a partial download never takes its name); a
    NotFound that says what to do without network when the download fails."""
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NotFound(f"cannot download {url} ({e}). Without network, {without_network}") from None
    os.replace(tmp, path)


def jsonl_items(path, fix):
    """(line number, object) for each non-blank line of a JSON-lines file; a ConfigError that names the line
    and the fix for a line that is not JSON or a file that is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{lineno}: not a JSON line ({e}); {fix}") from None
                    yield lineno, item
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); {fix}") from None


def model_block_size(model):
    """The model's context length (config.block_size, through a DDP wrapper), None if it has none."""
    return getattr(getattr(getattr(model, "module", model), "config", None), "block_size", None)


def forward_logits(model, rows, device, ctx=None, pad=0):
    """-> (logits, idx): token rows right-padded with pad into one batch idx, and the model's logits on it
    (position t predicts token t + 1; a GPT returns (logits, loss), another model may return logits alone)."""
    idx = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    idx = idx.to(device)
    with ctx or nullcontext():
        out = model(idx)
    return (out[0] if isinstance(out, (tuple, list)) else out), idx


def crop(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of longer sequences, shifting the indices (as nanochat does)."""
    if max_len is None:
        return tokens, starts, ends
    cuts = [max(0, len(t) - max_len) for t in tokens]
    return ([t[c:] for t, c in zip(tokens, cuts)], [max(s - c, 1) for s, c in zip(starts, cuts)],
            [e - c for e, c in zip(ends, cuts)])


@contextmanager
def eval_mode(model):
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
