"""Evaluations that training and the scripts share; each score equals its reference's.

    val_loss_bpb          val loss and bits per byte over fixed val windows (nanochat's BPB)
    residual_diagnostics  the connections' H_pre / H_post / H_res on a fixed batch (hc.diagnostics)
    training_eval         what train.py evaluates every eval_interval steps: the above, HellaSwag if asked
    HellaSwag             acc_norm / acc as nanoGPT and llm.c score it
    CORE                  the 22 DCLM tasks as nanochat scores them
    end of a run          plan_final_evals / run_final_evals: HellaSwag and CORE once, at the end of train.py

Every scorer takes the uncompiled, unwrapped model; under torch.distributed each rank scores its
share and the sums are all-reduced, so every rank must call it. The command lines are
scripts/eval_hellaswag.py and scripts/eval_core.py.
"""

import csv
import json
import math
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import hc
from errors import ConfigError
from keys import check, key


@dataclass
class EvalConfig:
    """What a training run evaluates, and when (config keys)."""
    SECTION = "evaluation during and at the end of a run (evals)"
    eval_interval: int = key(250, "steps between evals (also checkpoints); always at the end", above=0,
                             setting="when evals run, not what is trained or measured (compare.py checks the steps match)")
    eval_tokens: int = key(1_048_576, "fixed val tokens per eval (the same windows every time)", above=0)
    eval_batch_size: int = key(0, "sequences per rank per eval forward; 0 -> batch_size", at_least=0)
    diag_batch_size: int = key(4, "sequences of the fixed val batch for the residual diagnostics", above=0,
                               applies={"scheme": hc.NOT_PLAIN})
    hellaswag: bool = key(False, "also HellaSwag acc_norm at every eval (scripts/eval_hellaswag.py)",
                          setting="whether an optional eval runs (compare.py names a run that lacks a metric)")
    hellaswag_file: str = key("", '"" -> the cached / downloaded validation jsonl', path=True,
                              applies={"hellaswag": (True,), "final_hellaswag": (True,)}, setting="a path")
    hellaswag_limit: int = key(0, "items scored per eval; 0 -> all 10,042", at_least=0, applies={"hellaswag": (True,)})
    final_hellaswag: bool = key(False, "HellaSwag on all items once at the end, if the jsonl is here (hellaswag_file "
                                "or the cache)", setting="whether an optional eval runs")
    final_core: bool = key(False, "CORE (scripts/eval_core.py) once at the end, if the eval bundle is here",
                           setting="whether an optional eval runs")
    core_bundle_dir: str = key("", '"" -> the cache ($HCGPT_CACHE_DIR/eval_bundle, ~/.cache/hcgpt/eval_bundle)',
                               path=True, applies={"final_core": (True,)}, setting="a path")
    core_max_per_task: int = key(-1, "items per CORE task at the end; -1 -> all (nanochat's base_eval), 500: "
                                 "base_train's", applies={"final_core": (True,)})

    def __post_init__(self):
        check(self)


def cache_root():
    """$HCGPT_CACHE_DIR, else ~/.cache/hcgpt: where downloaded evaluation data is kept."""
    return Path(os.environ.get("HCGPT_CACHE_DIR", Path.home() / ".cache" / "hcgpt")).expanduser()


# -----------------------------------------------------------------------------
# val loss and BPB, residual diagnostics

@torch.no_grad()
def val_loss_bpb(model, batches, token_bytes, ctx, device, ddp=False):
    """(val loss, val BPB) over batches of (x, y), summed over ranks. Loss: mean nats per target
    token. BPB = nats / (ln 2 x bytes) over the target tokens that are text: special tokens have
    0 bytes in token_bytes and count in neither sum (as in nanochat)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats of text, bytes
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with ctx:
            _, loss = model(x, y, reduction="none")
        loss = loss.double()
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        sums += torch.stack([loss.sum(), valid.sum(), (loss * (nbytes > 0)).sum(), nbytes.sum()])
    if ddp:
        dist.all_reduce(sums)
    model.train(was_training)
    nats, count, text_nats, nbytes = sums.tolist()
    return nats / count, text_nats / (math.log(2) * nbytes)


@torch.no_grad()
def residual_diagnostics(raw_model, x, ctx):
    """hc.diagnostics of every connection of the (uncompiled) model on the batch x, with the readout
    weights of each stream (hc.readout_diagnostics) where the model reads out with hc_head."""
    coeffs, readout = [], []
    hooks = [c.register_forward_pre_hook(lambda mod, args: coeffs.append(mod.coefficients(args[0])))
             for c in raw_model.connections()]
    head = getattr(raw_model, "hc_head", None)
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda mod, args: readout.append(mod.weights(args[0]))))
    was_training = raw_model.training
    raw_model.eval()
    try:
        with ctx:
            raw_model(x)
    finally:
        for h in hooks:
            h.remove()
        raw_model.train(was_training)
    d = hc.diagnostics(coeffs, raw_model.connection_names())
    for w in readout:
        d["scalars"].update(hc.readout_diagnostics(w))
    return d



def training_eval(step, tokens, eval_model, raw_model, val_loader, token_bytes, hellaswag_examples, diag_x, ctx,
             device, ddp, wandb_run, enc=None):
    """One eval: val loss and BPB, HellaSwag if asked (enc: the run's tokenizer), the residual
    diagnostics on the fixed batch. -> (log record, wandb items beyond the record's numbers (the H_res
    image), the console line's extra part)."""
    val_loss, val_bpb = val_loss_bpb(eval_model, val_loader, token_bytes, ctx, device, ddp)
    record = {"type": "eval", "step": step, "tokens": tokens, "val_loss": val_loss, "val_bpb": val_bpb}
    wandb_data = {}
    extra = ""
    if hellaswag_examples is not None:  # every rank scores its share; counts are all-reduced
        hs = evaluate_hellaswag(raw_model, hellaswag_examples, device, enc=enc, ctx=ctx)
        record.update(hellaswag_acc_norm=hs["acc_norm"], hellaswag_acc=hs["acc"], hellaswag_n=hs["n"])
        extra = f" | hellaswag acc_norm {hs['acc_norm']:.4f}"
    if diag_x is not None:
        d = residual_diagnostics(raw_model, diag_x, ctx)
        s = d["scalars"]
        record.update(diag=s, hres=d["matrices"], hres_composite=d["composite"])
        if wandb_run is not None:
            from tracking import hres_image
            wandb_data["hres"] = hres_image(d)
        extra += (f" | composite H_res amax fwd {s['composite/amax_fwd']:.3f} bwd {s['composite/amax_bwd']:.3f}"
                  f" | max |H_res - I| {max(v for k, v in s.items() if k.endswith('/dist_identity')):.2e}")
        means = [v for k, v in s.items() if k.startswith("readout/w_mean/")]
        if means:
            extra += f" | readout w {' '.join(f'{v:.3f}' for v in means)}"
    return record, wandb_data, extra

# -----------------------------------------------------------------------------
# HellaSwag (the official jsonl, github.com/rowanz/hellaswag): each of 4 endings appended to the
# context and scored by the mean (acc_norm) or sum (acc) of its tokens' cross-entropy

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"

NUM_ITEMS = {"train": 39905, "val": 10042, "test": 10003}



def hellaswag_dir():
    return cache_root() / "hellaswag"


def download(split="val", dest_dir=None):
    """Path of hellaswag_<split>.jsonl, downloaded once (atomically) if not already there."""
    if split not in NUM_ITEMS:
        raise ValueError(f"unknown HellaSwag split {split!r}; choose one of {list(NUM_ITEMS)}")
    dest_dir = Path(dest_dir) if dest_dir is not None else hellaswag_dir()
    path = dest_dir / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    url = URL.format(split=split)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"cannot download {url} ({e}). Without network, copy hellaswag_{split}.jsonl from a machine "
            f"that has it to {path}, or pass --data-file /path/to/hellaswag_{split}.jsonl") from None
    os.replace(tmp, path)
    return path


def load_examples(path=None, split="val", limit=None):
    """The items of a HellaSwag jsonl file (downloaded if path is None), in file order; the
    first limit items if limit is given (>= 1). Each item keeps the official fields; scoring
    uses "ctx", "endings" and "label". A malformed item is a ValueError naming file and line."""
    if limit is not None and limit < 1:
        raise ValueError(f"HellaSwag limit must be >= 1 (or None for all items), got {limit}")
    if path is None:
        path = download(split)
    fix = (f"use the official hellaswag_{split}.jsonl (github.com/rowanz/hellaswag; the test split has no "
           f"labels), or delete {path} if it is a damaged download")
    if not Path(path).is_file():
        raise FileNotFoundError(f"HellaSwag data file {path} not found: pass --data-file with the path of "
                                f"hellaswag_{split}.jsonl, or leave it out to download the file once")
    examples = []
    for lineno, ex in jsonl_items(path, fix):
        endings = ex.get("endings") if isinstance(ex, dict) else None
        if not (isinstance(ex, dict) and isinstance(ex.get("ctx"), str) and isinstance(endings, list)
                and len(endings) == 4 and all(isinstance(e, str) for e in endings)
                and type(ex.get("label")) is int):
            raise ValueError(f"{path}:{lineno}: not a labelled HellaSwag item (needs a string 'ctx', 4 "
                             f"string 'endings' and an integer 'label'); {fix}")
        if not 0 <= ex["label"] < 4:  # scored as a miss otherwise: a silently wrong accuracy
            raise ValueError(f"{path}:{lineno}: label {ex['label']} is not the index of one of the 4 "
                             f"endings (0-3); {fix}")
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"{path}: no HellaSwag items; {fix}")
    return examples


def jsonl_items(path, fix):
    """(line number, object) for each non-blank line of a JSON-lines file; a ValueError that names the line
    and the fix for a line that is not JSON or a file that is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON line ({e}); {fix}") from None
                    yield lineno, item
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); {fix}") from None


def render_example(example, enc):
    """-> (rows, label): for each ending the full token row (context + ending) and the index
    of the ending's first token in it."""
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    rows = []
    for ending in example["endings"]:
        end_tokens = enc.encode_ordinary(" " + ending)
        rows.append((ctx_tokens + end_tokens, len(ctx_tokens)))
    return rows, int(example["label"])


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


def _logits(model, idx):
    out = model(idx)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def score_rows(model, rows, device, block_size=None, ctx=None):
    """Sum and mean cross-entropy over the ending tokens of each (tokens, start) row, in one
    right-padded batch. Rows longer than block_size lose tokens on the left (the ending stays)."""
    cropped = []
    for tokens, start in rows:
        if block_size is not None and len(tokens) > block_size:
            cut = len(tokens) - block_size
            tokens, start = tokens[cut:], max(start - cut, 1)
        cropped.append((tokens, start))
    T = max(len(t) for t, _ in cropped)
    idx = torch.zeros((len(cropped), T), dtype=torch.long)
    mask = torch.zeros((len(cropped), T), dtype=torch.bool)  # True at ending tokens
    for i, (tokens, start) in enumerate(cropped):
        idx[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, start:len(tokens)] = True
    idx, mask = idx.to(device), mask.to(device)
    with ctx or nullcontext():
        logits = _logits(model, idx)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), idx[:, 1:], reduction="none")  # (R, T-1)
    m = mask[:, 1:].float()
    sum_loss = (losses * m).sum(1)
    return sum_loss, sum_loss / m.sum(1)


def evaluate_hellaswag(model, examples, device, enc=None, batch_size=8, ctx=None, rank=None, world_size=None,
                       predictions=None):
    """Accuracy of model on examples (a list of HellaSwag items).

    model: a GPT (or anything whose forward(idx) returns logits or (logits, ...)); pass the
    uncompiled, unwrapped model from a training loop. Under torch.distributed each rank scores
    every world_size-th item and the counts are all-reduced, so every rank must call this.
    batch_size: items per forward (4 rows each). ctx: e.g. a bf16 autocast context.
    predictions: a list to append, for this rank's items, {"index", "label", "pred", "pred_norm",
    "sum_loss", "mean_loss"} to. Returns {"acc_norm", "acc", "n", "correct_norm", "correct"}.
    """
    if enc is None:
        from data.tokenizer import get_encoding
        enc = get_encoding()
    if rank is None or world_size is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    block_size = getattr(getattr(_unwrap(model), "config", None), "block_size", None)
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(examples), world_size))
    n = correct = correct_norm = 0
    try:
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
    finally:
        model.train(was_training)
    if world_size > 1:
        counts = torch.tensor([n, correct, correct_norm], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        n, correct, correct_norm = counts.tolist()
    return {"acc_norm": correct_norm / n, "acc": correct / n, "n": n,
            "correct_norm": correct_norm, "correct": correct}


# -----------------------------------------------------------------------------
# CORE (DCLM, arXiv 2406.11794): the eval bundle as packaged for nanochat, scored as nanochat does

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

ITEM_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
               "language_modeling": ("context", "continuation")}  # what each task type's items must hold

CORE_TASKS = (  # the 22 tasks of DCLM's core aggregate
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)



# prompts (the same strings as nanochat's jinja templates)

def render_prompts_mc(item, delim, fewshot=()):
    """One prompt per choice: shared context, different continuations."""
    prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]



def render_prompts_schema(item, delim, fewshot=()):
    """One prompt per context option: different contexts, shared continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{option}{delim}{item['continuation']}" for option in item["context_options"]]



def render_prompts_lm(item, delim, fewshot=()):
    """[prompt without the continuation (stripped), prompt with it]."""
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]



# tokens: where the scored part of each sequence starts and ends

def common_length(seqs, direction="left"):
    """Length of the common prefix (left) or suffix (right) of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = i if direction == "left" else -1 - i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n



def bos_token(enc):
    """The token that starts a document: enc.bos_token (hcgpt's tokenizers: GPT-2's <|endoftext|>, a
    trained tokenizer's <|bos|>), else eot_token (a plain tiktoken GPT-2 encoding, whose <|endoftext|>
    hcgpt's shards put before every document)."""
    bos = getattr(enc, "bos_token", None)
    return enc.eot_token if bos is None else bos


def encode(enc, prompts):
    """Each prompt's tokens after the BOS token, as nanochat's CORE encodes them."""
    bos = bos_token(enc)
    return [[bos] + enc.encode_ordinary(p) for p in prompts]



def batch_mc(enc, prompts):
    tokens = encode(enc, prompts)
    start = common_length(tokens, "left")
    return tokens, [start] * len(tokens), [len(t) for t in tokens]



def batch_schema(enc, prompts):
    tokens = encode(enc, prompts)
    suffix = common_length(tokens, "right")
    return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]



def batch_lm(enc, prompts):
    without, with_ = encode(enc, prompts)
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError("language_modeling item: the prompt without the continuation does not tokenize "
                         "to a prefix of the prompt with it")
    return [with_], [len(without)], [len(with_)]



def crop(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of longer sequences, shifting the indices (as nanochat does)."""
    if max_len is None:
        return tokens, starts, ends
    out = ([], [], [])
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        for lst, v in zip(out, (t[cut:], max(s - cut, 1), e - cut)):
            lst.append(v)
    return out



# scoring

@torch.no_grad()
def forward_losses(model, tokens, pad, device, ctx=None):
    """Right-pad and forward -> (losses (B, T), argmax predictions (B, T)); position i scores
    token i + 1, the last column is nan."""
    T = max(len(t) for t in tokens)
    idx = torch.full((len(tokens), T), pad, dtype=torch.long)
    for i, t in enumerate(tokens):
        idx[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    idx = idx.to(device)
    with ctx or nullcontext():
        logits = _logits(model, idx)
    logits = logits.float()
    target = torch.roll(idx, -1, dims=1)
    losses = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    losses[:, -1] = float("nan")
    return losses, logits.argmax(-1), idx



def evaluate_example(idx, model, enc, data, device, task, ctx=None):
    """Is item data[idx] answered correctly? -> (bool, info dict)."""
    item = data[idx]
    fewshot = []
    if task["num_fewshot"] > 0:
        others = [i for i in range(len(data)) if i != idx]
        fewshot = [data[i] for i in random.Random(1234 + idx).sample(others, task["num_fewshot"])]
    delim, kind = task["continuation_delimiter"], task["task_type"]
    if kind == "multiple_choice":
        tokens, starts, ends = batch_mc(enc, render_prompts_mc(item, delim, fewshot))
    elif kind == "schema":
        tokens, starts, ends = batch_schema(enc, render_prompts_schema(item, delim, fewshot))
    elif kind == "language_modeling":
        tokens, starts, ends = batch_lm(enc, render_prompts_lm(item, delim, fewshot))
    else:
        raise ValueError(f"unsupported task type {kind!r}; choose one of {TASK_TYPES}")
    block_size = getattr(getattr(_unwrap(model), "config", None), "block_size", None)
    tokens, starts, ends = crop(tokens, starts, ends, block_size)
    losses, preds, ids = forward_losses(model, tokens, bos_token(enc), device, ctx)  # padded with BOS, as nanochat
    if kind == "language_modeling":
        s, e = starts[0], ends[0]
        correct = bool(torch.equal(preds[0, s - 1:e - 1], ids[0, s:e]))
        return correct, {"idx": idx, "correct": correct}
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    pred = mean_losses.index(min(mean_losses))
    return pred == item["gold"], {"idx": idx, "gold": item["gold"], "pred": pred, "mean_losses": mean_losses}



def evaluate_task(model, enc, data, device, task, ctx=None, rank=None, world_size=None):
    """Accuracy over data; under torch.distributed every rank takes every world_size-th item."""
    if rank is None or world_size is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        correct[idx] = float(evaluate_example(idx, model, enc, data, device, task, ctx)[0])
    if world_size > 1:
        dist.all_reduce(correct)
    return correct.mean().item()



def centered(acc, baseline_percent):
    b = 0.01 * baseline_percent
    return (acc - b) / (1.0 - b)



def evaluate_core(model, enc, device, bundle_dir, max_per_task=-1, labels=None, ctx=None, log=print):
    """Evaluate every task of the bundle (or those in labels) -> {"results": {label: accuracy},
    "centered": {label: centred accuracy}, "core": mean centred accuracy, "complete": whether
    all 22 CORE tasks were evaluated, "max_per_task"}."""
    tasks, baselines = load_bundle(bundle_dir)
    tasks = select_tasks(tasks, labels, bundle_dir)
    all_data = [load_task_data(task, max_per_task) for task in tasks]  # every file checked before hours of work
    was_training = model.training
    model.eval()
    results, cent = {}, {}
    try:
        for task, data in zip(tasks, all_data):
            t0 = time.time()
            acc = evaluate_task(model, enc, data, device, task, ctx)
            results[task["label"]] = acc
            cent[task["label"]] = centered(acc, baselines[task["label"]])
            if log:
                log(f"{task['label']:<34} {task['task_type']:<18} {task['num_fewshot']:>2}-shot {len(data):>6} items "
                    f"| acc {acc:.4f} | centred {cent[task['label']]:+.4f} | {time.time() - t0:.1f}s")
    finally:
        model.train(was_training)
    complete = set(CORE_TASKS) <= set(results) and max_per_task <= 0
    return {"results": results, "centered": cent, "core": sum(cent.values()) / len(cent),
            "complete": complete, "max_per_task": max_per_task}



# the bundle

def default_bundle_dir():
    return cache_root() / "eval_bundle"


def download_bundle(dest=None, url=EVAL_BUNDLE_URL):
    """Fetch and unpack eval_bundle.zip into dest (default: the cache) unless it is already there."""
    dest = Path(dest) if dest is not None else default_bundle_dir()
    if (dest / "core.yaml").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        zpath = Path(tmp) / "eval_bundle.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(zpath, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except OSError as e:
            raise RuntimeError(f"cannot download {url} ({e}). Without network, copy an unpacked eval_bundle "
                               f"directory (core.yaml, eval_meta_data.csv, eval_data/) to {dest} or pass "
                               f"--bundle-dir") from None
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"{url}: the download is not a readable zip ({e}); run again, or unzip a good "
                               f"copy into {dest} (or pass --bundle-dir)") from None
        found = next(Path(tmp).rglob("core.yaml"), None)
        if found is None:
            raise RuntimeError(f"{url}: the archive holds no core.yaml")
        os.replace(found.parent, dest)
    return dest



def load_bundle(bundle_dir):
    """-> (tasks, random baselines in percent): tasks are dicts with label, task_type,
    dataset (path), num_fewshot, continuation_delimiter, in core.yaml's order. A damaged bundle is a
    FileNotFoundError / ValueError naming the file and the fix."""
    import yaml
    bundle_dir = Path(bundle_dir)
    config, meta = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    fix = (f"download {EVAL_BUNDLE_URL} where there is network and unzip it (or run with --download into an "
           f"empty --bundle-dir)")
    for p in (config, meta):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {bundle_dir} is not an unpacked eval bundle (core.yaml, "
                                    f"eval_meta_data.csv, eval_data/); {fix}")
    try:
        spec = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{config}: not a readable YAML file ({str(e)[:300]}); fix the file or restore it: "
                         f"{fix}") from None
    entries = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config}: no 'icl_tasks' list; {fix}")
    tasks = []
    for i, t in enumerate(entries):
        where = f"{config}: icl_tasks[{i}]"
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type")
                   if not isinstance(t, dict) or k not in t]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; every task needs label, dataset_uri, "
                             f"num_fewshot and icl_task_type ({fix})")
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{where} ({t['label']}): task type {t['icl_task_type']!r} is not one of {TASK_TYPES}; "
                             f"only these are scored: remove the task from core.yaml")
        shots = t["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if type(shots) is not int or shots < 0:
            raise ValueError(f"{where} ({t['label']}): num_fewshot {t['num_fewshot']!r} is not a count >= 0 "
                             f"(e.g. [0] or [5])")
        tasks.append({"label": str(t["label"]), "task_type": t["icl_task_type"],
                      "dataset": bundle_dir / "eval_data" / str(t["dataset_uri"]),
                      "num_fewshot": shots, "continuation_delimiter": t.get("continuation_delimiter", " ")})
    try:
        with open(meta, encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError) as e:  # a missing column, a value that is not a number
        raise ValueError(f"{meta}: needs the columns 'Eval Task' and 'Random baseline' (in percent) with a "
                         f"number on every row ({type(e).__name__}: {e}); {fix}") from None
    missing = [t["label"] for t in tasks if t["label"] not in baselines]
    if missing:
        raise ValueError(f"{meta}: no random baseline for {missing}; add their rows or use the bundle's own file")
    return tasks, baselines



def select_tasks(tasks, labels, bundle_dir):
    """The tasks named in labels (all if None), in core.yaml's order; an unknown label is an error."""
    if labels is None:
        return tasks
    known = [t["label"] for t in tasks]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValueError(f"--tasks: {unknown} not in {Path(bundle_dir) / 'core.yaml'}; choose among {known}")
    return [t for t in tasks if t["label"] in labels]



def load_task_data(task, max_per_task=-1):
    """The items of a task's jsonl, shuffled with a fixed seed, the first max_per_task of them if > 0.
    A missing, empty or malformed file is an error naming the file (and line)."""
    path = task["dataset"]
    fix = "restore the eval bundle (unzip eval_bundle.zip again, or --download into an empty --bundle-dir)"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found (task {task['label']}): {fix}")
    fields = ITEM_FIELDS[task["task_type"]]
    data = []
    for lineno, item in jsonl_items(path, fix):
        if not isinstance(item, dict) or any(k not in item for k in fields):
            raise ValueError(f"{path}:{lineno}: a {task['task_type']} item needs {', '.join(fields)}; {fix}")
        options = item.get("choices", item.get("context_options"))
        if "gold" in fields and not (type(item["gold"]) is int and 0 <= item["gold"] < len(options)):
            raise ValueError(f"{path}:{lineno}: gold {item['gold']!r} is not the index of one of the "
                             f"{len(options)} options; {fix}")
        data.append(item)
    if not data:  # the mean over no items would be nan
        raise ValueError(f"{path}: no items (task {task['label']}); {fix}, or leave the task out with --tasks")
    random.Random(1337).shuffle(data)  # the files are often ordered; a crop should be a fair sample
    data = data[:max_per_task] if max_per_task > 0 else data
    if task["num_fewshot"] >= len(data):
        raise ValueError(f"task {task['label']} takes {task['num_fewshot']} solved examples from the other items, "
                         f"but {len(data)} item(s) are used ({path}); raise --max-per-task above "
                         f"{task['num_fewshot']} or leave the task out with --tasks")
    return data



# -----------------------------------------------------------------------------
# the end of a training run

def plan(hellaswag, hellaswag_file, hellaswag_limit, cfg):
    """What a training run evaluates beyond val loss: the HellaSwag items of every eval (hellaswag) or None,
    and plan_final_evals' plan for the end; a file the config names that cannot be read refuses the run."""
    examples = None
    if hellaswag:
        try:
            examples = load_examples(hellaswag_file or None, limit=hellaswag_limit or None)
        except (OSError, ValueError, RuntimeError) as e:  # missing file, bad jsonl, failed download
            raise ConfigError(f"config key 'hellaswag': cannot read the HellaSwag items ({e}); set 'hellaswag_file' "
                              f"to a local hellaswag_val.jsonl, or --hellaswag=False") from None
    return examples, plan_final_evals(cfg)


def plan_final_evals(cfg):
    """What the end of the run evaluates: {"hellaswag": (path, items) or None, "core": bundle dir or
    None, "skipped": [why]}. Only data on this machine is used (no download); a file or directory
    the config names explicitly must exist, the default cache may be empty (the eval is skipped)."""
    final = {"hellaswag": None, "core": None, "skipped": []}
    if cfg["final_hellaswag"]:
        path = cfg["hellaswag_file"] or str(hellaswag_dir() / "hellaswag_val.jsonl")
        if os.path.isfile(path):
            try:
                final["hellaswag"] = (path, load_examples(path))
            except (OSError, ValueError) as e:
                raise ConfigError(f"config key 'final_hellaswag': cannot read {path} ({e})") from None
        elif cfg["hellaswag_file"]:
            raise ConfigError(f"config key 'hellaswag_file': {path} does not exist; point it at a local "
                              f"hellaswag_val.jsonl, or leave it empty to use the cache when it is there")
        else:
            final["skipped"].append(f"final_hellaswag: no {path}, so no HellaSwag at the end; copy hellaswag_val.jsonl "
                                    f"there (or set hellaswag_file) and score the checkpoint with scripts/eval_hellaswag.py")
    if cfg["final_core"]:
        bundle = cfg["core_bundle_dir"] or str(default_bundle_dir())
        if os.path.isfile(os.path.join(bundle, "core.yaml")):
            try:
                load_bundle(bundle)
            except (OSError, ValueError) as e:
                raise ConfigError(f"config key 'final_core': {bundle} is not a usable eval bundle ({e})") from None
            final["core"] = bundle
        elif cfg["core_bundle_dir"]:
            raise ConfigError(f"config key 'core_bundle_dir': {bundle} holds no core.yaml; point it at an unpacked "
                              f"eval bundle, or leave it empty to use the cache when it is there")
        else:
            final["skipped"].append(f"final_core: no eval bundle in {bundle}, so no CORE at the end; fetch it with "
                                    f"`python scripts/eval_core.py --download ...` and score the checkpoint with it")
    return final


def core_line(res):
    """CORE on nanochat's scale (a fraction: base_eval's "core_metric") and x100 (the scale the KromHC
    paper quotes, e.g. 16.872); a mean over fewer tasks or items is named as such."""
    if res["complete"]:
        name = "CORE"
    elif res.get("max_per_task", -1) > 0 and set(CORE_TASKS) <= set(res["results"]):
        name = f"CORE on {res['max_per_task']} items per task (nanochat base_train's variant)"
    else:
        name = f"CORE-style mean over {len(res['results'])} task(s) (not CORE)"
    return f"{name} {res['core']:.4f} (x100: {100 * res['core']:.3f})"


def run_final_evals(final, raw_model, cfg, step, tokens, device, ctx, master, log, enc):
    """HellaSwag and CORE once, at the end of the run, on every rank (the counts are all-reduced),
    with enc, the run's tokenizer (rundir.data_tokenizer). Logged as a "final" record and written to
    <out_dir>/hellaswag.json and core.json, as the eval scripts write them (plot_runs.py reads them)."""
    record = {"type": "final", "step": step, "tokens": tokens}
    files = {}
    if final["hellaswag"]:
        path, examples = final["hellaswag"]
        hs = evaluate_hellaswag(raw_model, examples, device, enc=enc, ctx=ctx)
        record.update(hellaswag_acc_norm=hs["acc_norm"], hellaswag_acc=hs["acc"], hellaswag_n=hs["n"])
        files["hellaswag.json"] = {"task": "hellaswag", "split": "val", **hs, "data_file": path}
    if final["core"]:
        res = evaluate_core(raw_model, enc, device, final["core"], cfg["core_max_per_task"], ctx=ctx,
                            log=print if master else None)
        record.update(core=res["core"], core_complete=res["complete"], core_centered=res["centered"])
        files["core.json"] = {"task": "core", **res, "bundle_dir": final["core"]}
    if final["skipped"]:
        record["skipped"] = final["skipped"]
    if master:
        for msg in final["skipped"]:
            print(f"note: {msg}")
        parts = [f"hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in record else "",
                 core_line(res) if "core" in record else ""]
        if any(parts):
            print(f"final step {step}: " + " | ".join(p for p in parts if p))
        ckpt = os.path.join(cfg["out_dir"], "ckpt.pt")
        for name, content in files.items():
            with open(os.path.join(cfg["out_dir"], name), "w") as f:
                json.dump({**content, "step": step, "tokens": tokens, "ckpt": ckpt}, f, indent=1)
    log(record)  # wandb: the record's numbers as final/<key>, also in the run summary (tracking.log_record)
    return {k: record[k] for k in ("hellaswag_acc_norm", "core") if k in record}
