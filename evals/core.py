"""CORE (DCLM, arXiv 2406.11794): the eval bundle as packaged for nanochat, its 22 tasks scored as
nanochat scores them; scripts/eval_core.py is the command line."""

import csv
import os
import random
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from errors import ConfigError, NotFound
from evals import cache_root, crop, eval_mode, fetch, forward_logits, jsonl_items, model_block_size

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

ITEM_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
               "language_modeling": ("context", "continuation")}  # what each task type's items must hold
TASK_TYPES = tuple(ITEM_FIELDS)

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
        raise ConfigError("language_modeling item: the prompt without the continuation does not tokenize "
                          "to a prefix of the prompt with it")
    return [with_], [len(without)], [len(with_)]


TASK_SCORING = {"multiple_choice": (render_prompts_mc, batch_mc), "schema": (render_prompts_schema, batch_schema),
                "language_modeling": (render_prompts_lm, batch_lm)}  # a task type's prompts and scored spans


# scoring

@torch.no_grad()
def forward_losses(model, tokens, pad, device, ctx=None):
    """Right-pad and forward -> (losses (B, T), argmax predictions (B, T), the padded tokens); position i
    scores token i + 1, the last column is nan."""
    logits, idx = forward_logits(model, tokens, device, ctx, pad)
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
    kind = task["task_type"]
    render, batch = TASK_SCORING[kind]
    tokens, starts, ends = batch(enc, render(item, task["continuation_delimiter"], fewshot))
    tokens, starts, ends = crop(tokens, starts, ends, model_block_size(model))
    losses, preds, ids = forward_losses(model, tokens, bos_token(enc), device, ctx)  # padded with BOS, as nanochat
    if kind == "language_modeling":
        s, e = starts[0], ends[0]
        correct = bool(torch.equal(preds[0, s - 1:e - 1], ids[0, s:e]))
        return correct, {"idx": idx, "correct": correct}
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    pred = mean_losses.index(min(mean_losses))
    return pred == item["gold"], {"idx": idx, "gold": item["gold"], "pred": pred, "mean_losses": mean_losses}


def evaluate_task(model, enc, data, device, task, ctx=None):
    """Accuracy over data; under torch.distributed every rank takes every world_size-th item."""
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
    results, cent = {}, {}
    with eval_mode(model):
        for task, data in zip(tasks, all_data):
            t0 = time.time()
            acc = evaluate_task(model, enc, data, device, task, ctx)
            results[task["label"]] = acc
            cent[task["label"]] = centered(acc, baselines[task["label"]])
            if log:
                log(f"{task['label']:<34} {task['task_type']:<18} {task['num_fewshot']:>2}-shot {len(data):>6} items "
                    f"| acc {acc:.4f} | centred {cent[task['label']]:+.4f} | {time.time() - t0:.1f}s")
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
        fetch(url, zpath, f"copy an unpacked eval_bundle directory (core.yaml, eval_meta_data.csv, eval_data/) to "
                          f"{dest} or pass --bundle-dir")
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise ConfigError(f"{url}: the download is not a readable zip ({e}); run again, or unzip a good "
                              f"copy into {dest} (or pass --bundle-dir)") from None
        found = next(Path(tmp).rglob("core.yaml"), None)
        if found is None:
            raise ConfigError(f"{url}: the archive holds no core.yaml; unpack a good eval_bundle (core.yaml, "
                              f"eval_meta_data.csv, eval_data/) into {dest}, or pass --bundle-dir")
        os.replace(found.parent, dest)
    return dest


def load_bundle(bundle_dir):
    """-> (tasks, random baselines in percent): tasks are dicts with label, task_type,
    dataset (path), num_fewshot, continuation_delimiter, in core.yaml's order. A damaged bundle is a
    NotFound / ConfigError naming the file and the fix."""
    import yaml
    bundle_dir = Path(bundle_dir)
    config, meta = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    fix = (f"download {EVAL_BUNDLE_URL} where there is network and unzip it (or run with --download into an "
           f"empty --bundle-dir)")
    for p in (config, meta):
        if not p.is_file():
            raise NotFound(f"{p} not found: {bundle_dir} is not an unpacked eval bundle (core.yaml, "
                           f"eval_meta_data.csv, eval_data/); {fix}")
    try:
        spec = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config}: not a readable YAML file ({str(e)[:300]}); fix the file or restore it: "
                          f"{fix}") from None
    entries = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{config}: no 'icl_tasks' list; {fix}")
    tasks = []
    for i, t in enumerate(entries):
        where = f"{config}: icl_tasks[{i}]"
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type")
                   if not isinstance(t, dict) or k not in t]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}; every task needs label, dataset_uri, "
                              f"num_fewshot and icl_task_type ({fix})")
        if t["icl_task_type"] not in TASK_TYPES:
            raise ConfigError(f"{where} ({t['label']}): task type {t['icl_task_type']!r} is not one of {TASK_TYPES}; "
                              f"only these are scored: remove the task from core.yaml")
        shots = t["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if type(shots) is not int or shots < 0:
            raise ConfigError(f"{where} ({t['label']}): num_fewshot {t['num_fewshot']!r} is not a count >= 0 "
                              f"(e.g. [0] or [5])")
        tasks.append({"label": str(t["label"]), "task_type": t["icl_task_type"],
                      "dataset": bundle_dir / "eval_data" / str(t["dataset_uri"]),
                      "num_fewshot": shots, "continuation_delimiter": t.get("continuation_delimiter", " ")})
    try:
        with open(meta, encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError) as e:  # a missing column, a value that is not a number
        raise ConfigError(f"{meta}: needs the columns 'Eval Task' and 'Random baseline' (in percent) with a "
                          f"number on every row ({type(e).__name__}: {e}); {fix}") from None
    missing = [t["label"] for t in tasks if t["label"] not in baselines]
    if missing:
        raise ConfigError(f"{meta}: no random baseline for {missing}; add their rows or use the bundle's own file")
    return tasks, baselines


def select_tasks(tasks, labels, bundle_dir):
    """The tasks named in labels (all if None), in core.yaml's order; an unknown label is an error."""
    if labels is None:
        return tasks
    known = [t["label"] for t in tasks]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} not in {Path(bundle_dir) / 'core.yaml'}; choose among {known}")
    return [t for t in tasks if t["label"] in labels]


def load_task_data(task, max_per_task=-1):
    """The items of a task's jsonl, shuffled with a fixed seed, the first max_per_task of them if > 0.
    A missing, empty or malformed file is an error naming the file (and line)."""
    path = task["dataset"]
    fix = "restore the eval bundle (unzip eval_bundle.zip again, or --download into an empty --bundle-dir)"
    if not Path(path).is_file():
        raise NotFound(f"{path} not found (task {task['label']}): {fix}")
    fields = ITEM_FIELDS[task["task_type"]]
    data = []
    for lineno, item in jsonl_items(path, fix):
        if not isinstance(item, dict) or any(k not in item for k in fields):
            raise ConfigError(f"{path}:{lineno}: a {task['task_type']} item needs {', '.join(fields)}; {fix}")
        options = item.get("choices", item.get("context_options"))
        if "gold" in fields and not (type(item["gold"]) is int and 0 <= item["gold"] < len(options)):
            raise ConfigError(f"{path}:{lineno}: gold {item['gold']!r} is not the index of one of the "
                              f"{len(options)} options; {fix}")
        data.append(item)
    if not data:  # the mean over no items would be nan
        raise ConfigError(f"{path}: no items (task {task['label']}); {fix}, or leave the task out with --tasks")
    random.Random(1337).shuffle(data)  # the files are often ordered; a crop should be a fair sample
    data = data[:max_per_task] if max_per_task > 0 else data
    if task["num_fewshot"] >= len(data):
        raise ConfigError(f"task {task['label']} takes {task['num_fewshot']} solved examples from the other items, "
                          f"but {len(data)} item(s) are used ({path}); raise --max-per-task above "
                          f"{task['num_fewshot']} or leave the task out with --tasks")
    return data


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

