"""HellaSwag (the official jsonl, github.com/rowanz/hellaswag) as nanoGPT and llm.c score it: each of 4 endings
appended to the context and scored by the mean (acc_norm) or sum (acc) of its tokens' cross-entropy."""

import itertools
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from errors import ConfigError, NotFound
from evals import cache_root, crop, eval_mode, fetch, forward_logits, jsonl_items, model_block_size

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"

NUM_ITEMS = {"train": 39905, "val": 10042, "test": 10003}


def hellaswag_dir():
    return cache_root() / "hellaswag"


def download(split="val"):
    """Path of hellaswag_<split>.jsonl, downloaded once (atomically) if not already there."""
    if split not in NUM_ITEMS:
        raise ConfigError(f"unknown HellaSwag split {split!r}; choose one of {list(NUM_ITEMS)}")
    path = hellaswag_dir() / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fetch(URL.format(split=split), path, f"copy hellaswag_{split}.jsonl from a machine that has it to {path}, or "
                                         f"pass --data-file /path/to/hellaswag_{split}.jsonl")
    return path


def load_examples(path=None, split="val", limit=None):
    """The items of a HellaSwag jsonl file (downloaded if path is None), in file order; the
    first limit items if limit is given (>= 1). Each item keeps the official fields; scoring
    uses "ctx", "endings" and "label". A malformed item is a ConfigError naming file and line."""
    if limit is not None and limit < 1:
        raise ConfigError(f"HellaSwag limit must be >= 1 (or None for all items), got {limit}")
    if path is None:
        path = download(split)
    fix = (f"use the official hellaswag_{split}.jsonl (github.com/rowanz/hellaswag; the test split has no "
           f"labels), or delete {path} if it is a damaged download")
    if not Path(path).is_file():
        raise NotFound(f"HellaSwag data file {path} not found: pass --data-file with the path of "
                       f"hellaswag_{split}.jsonl, or leave it out to download the file once")
    examples = []
    for lineno, ex in itertools.islice(jsonl_items(path, fix), limit):
        endings = ex.get("endings") if isinstance(ex, dict) else None
        if not (isinstance(ex, dict) and isinstance(ex.get("ctx"), str) and isinstance(endings, list)
                and len(endings) == 4 and all(isinstance(e, str) for e in endings)
                and type(ex.get("label")) is int):
            raise ConfigError(f"{path}:{lineno}: not a labelled HellaSwag item (needs a string 'ctx', 4 "
                              f"string 'endings' and an integer 'label'); {fix}")
        if not 0 <= ex["label"] < 4:  # scored as a miss otherwise: a silently wrong accuracy
            raise ConfigError(f"{path}:{lineno}: label {ex['label']} is not the index of one of the 4 "
                              f"endings (0-3); {fix}")
        examples.append(ex)
    if not examples:
        raise ConfigError(f"{path}: no HellaSwag items; {fix}")
    return examples


def render_example(example, enc):
    """-> (rows, label): for each ending the full token row (context + ending) and the index
    of the ending's first token in it."""
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    rows = [(ctx_tokens + enc.encode_ordinary(" " + ending), len(ctx_tokens)) for ending in example["endings"]]
    return rows, int(example["label"])


@torch.no_grad()
def score_rows(model, rows, device, block_size=None, ctx=None):
    """Sum and mean cross-entropy over the ending tokens of each (tokens, start) row, in one
    right-padded batch. Rows longer than block_size lose tokens on the left (the ending stays)."""
    tokens, starts, _ = crop([t for t, _ in rows], [s for _, s in rows], [len(t) for t, _ in rows], block_size)
    logits, idx = forward_logits(model, tokens, device, ctx)
    mask = torch.zeros_like(idx, dtype=torch.bool)  # True at ending tokens
    for i, (t, start) in enumerate(zip(tokens, starts)):
        mask[i, start:len(t)] = True
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), idx[:, 1:], reduction="none")  # (R, T-1)
    m = mask[:, 1:].float()
    sum_loss = (losses * m).sum(1)
    return sum_loss, sum_loss / m.sum(1)


def evaluate_hellaswag(model, examples, device, enc=None, batch_size=8, ctx=None, rank=None, world_size=None,
                       predictions=None):
    """Accuracy of model (whose forward(idx) returns logits or (logits, ...)) on examples (HellaSwag items); under
    torch.distributed each rank scores every world_size-th item. batch_size: items per forward (4 rows each).
    predictions: a list to append, for this rank's items, {"index", "label", "pred", "pred_norm",
    "sum_loss", "mean_loss"} to. Returns {"acc_norm", "acc", "n", "correct_norm", "correct"}.
    """
    if enc is None:
        from data.tokenizer import get_encoding
        enc = get_encoding()
    if rank is None or world_size is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    block_size = model_block_size(model)
    mine = list(range(rank, len(examples), world_size))
    n = correct = correct_norm = 0
    with eval_mode(model):
        for b in range(0, len(mine), batch_size):
            chunk = mine[b:b + batch_size]
            rendered = [render_example(examples[i], enc) for i in chunk]
            rows = [row for r, _ in rendered for row in r]
            sum_loss, mean_loss = score_rows(model, rows, device, block_size, ctx)
            for j, (i, (r, label)) in enumerate(zip(chunk, rendered)):
                s, m = sum_loss[4 * j:4 * j + 4], mean_loss[4 * j:4 * j + 4]
                pred, pred_norm = int(s.argmin()), int(m.argmin())
                n, correct, correct_norm = n + 1, correct + (pred == label), correct_norm + (pred_norm == label)
                if predictions is not None:
                    predictions.append({"index": i, "label": label, "pred": pred, "pred_norm": pred_norm,
                                        "sum_loss": s.tolist(), "mean_loss": m.tolist()})
    if world_size > 1:
        counts = torch.tensor([n, correct, correct_norm], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        n, correct, correct_norm = counts.tolist()
    return {"acc_norm": correct_norm / n, "acc": correct / n, "n": n,
            "correct_norm": correct_norm, "correct": correct}
