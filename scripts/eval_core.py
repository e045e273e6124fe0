"""
CORE score of a checkpoint: the 22 DCLM "core" in-context-learning tasks (arXiv 2406.11794),
evaluated the way nanochat evaluates them.

Each task is one of three types, all scored from the model's per-token cross-entropy:
    multiple_choice    context + each choice; the choice with the lowest mean loss over its
                       tokens (the tokens after the choices' common prefix) is the prediction
    schema             each context option + the same continuation; the option under which
                       the continuation (the common suffix) has the lowest mean loss wins
    language_modeling  context + continuation; correct when greedy decoding reproduces every
                       continuation token (argmax at each position)
Prompts: num_fewshot solved examples (drawn with random.Random(1234 + item index) from the
other items) each followed by a blank line, then the item; <|endoftext|> is prepended as BOS.
Items are shuffled with random.Random(1337) before --max-per-task crops them.
Per task, centred accuracy = (acc - b) / (1 - b) with b the random baseline from
eval_meta_data.csv (given in percent there); CORE = the mean centred accuracy over the 22 tasks.

The eval bundle (core.yaml, eval_meta_data.csv, eval_data/**.jsonl, from the MosaicML Eval
Gauntlet, as packaged for nanochat) is read from a local directory:

    python scripts/eval_core.py --ckpt out/run --bundle-dir /path/to/eval_bundle
    python scripts/eval_core.py --ckpt out/run --download          # fetch the bundle once (~160 MB unpacked)
    torchrun --standalone --nproc_per_node=8 scripts/eval_core.py --ckpt out/run --bundle-dir ...

Default bundle directory: $HCGPT_CACHE_DIR/eval_bundle (~/.cache/hcgpt/eval_bundle). Results go
to <run dir>/core.json unless --out says otherwise.
"""

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_hellaswag import _logits, _unwrap, autocast, load_model, resolve_ckpt, run_cli, setup_device  # noqa: E402

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


# -----------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------
# tokens: where the scored part of each sequence starts and ends

def common_length(seqs, direction="left"):
    """Length of the common prefix (left) or suffix (right) of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = i if direction == "left" else -1 - i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def encode(enc, prompts):
    bos = enc.eot_token  # GPT-2's <|endoftext|> doubles as BOS
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


# -----------------------------------------------------------------------------
# evaluation

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
    losses, preds, ids = forward_losses(model, tokens, enc.eot_token, device, ctx)
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


# -----------------------------------------------------------------------------
# the bundle

def default_bundle_dir():
    return Path(os.environ.get("HCGPT_CACHE_DIR", Path.home() / ".cache" / "hcgpt")).expanduser() / "eval_bundle"


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
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e}); {fix}") from None
                if not isinstance(item, dict) or any(k not in item for k in fields):
                    raise ValueError(f"{path}:{lineno}: a {task['task_type']} item needs {', '.join(fields)}; {fix}")
                options = item.get("choices", item.get("context_options"))
                if "gold" in fields and not (type(item["gold"]) is int and 0 <= item["gold"] < len(options)):
                    raise ValueError(f"{path}:{lineno}: gold {item['gold']!r} is not the index of one of the "
                                     f"{len(options)} options; {fix}")
                data.append(item)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); {fix}") from None
    if not data:  # the mean over no items would be nan
        raise ValueError(f"{path}: no items (task {task['label']}); {fix}, or leave the task out with --tasks")
    random.Random(1337).shuffle(data)  # the files are often ordered; a crop should be a fair sample
    data = data[:max_per_task] if max_per_task > 0 else data
    if task["num_fewshot"] >= len(data):
        raise ValueError(f"task {task['label']} takes {task['num_fewshot']} solved examples from the other items, "
                         f"but {len(data)} item(s) are used ({path}); raise --max-per-task above "
                         f"{task['num_fewshot']} or leave the task out with --tasks")
    return data


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--bundle-dir", default=None, help=f"unpacked eval bundle (default: {default_bundle_dir()})")
    ap.add_argument("--download", action="store_true", help=f"fetch {EVAL_BUNDLE_URL} into the bundle dir if missing")
    ap.add_argument("--tasks", default=None, help="comma-separated task labels (default: all in core.yaml)")
    ap.add_argument("--max-per-task", type=int, default=-1,
                    help="crop every task to N >= 1 items (-1: all; a quick look)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="results JSON (default: <run dir>/core.json; '-' for none)")
    args = ap.parse_args(argv)
    if args.max_per_task == 0 or args.max_per_task < -1:
        ap.error(f"argument --max-per-task: must be >= 1, or -1 for all items, got {args.max_per_task}")
    return run_cli(lambda: _main(args), "eval_core.py")


def _main(args):
    device, device_type, rank, world_size = setup_device(args.device)
    try:
        bundle = Path(args.bundle_dir) if args.bundle_dir else default_bundle_dir()
        if args.download and rank == 0:
            download_bundle(bundle)
        if world_size > 1:
            dist.barrier()
        labels = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
        if labels == []:
            raise ValueError("--tasks: no task labels given; pass e.g. --tasks hellaswag,piqa or leave it out for all")
        select_tasks(load_bundle(bundle)[0], labels, bundle)  # a bad bundle or label fails before the model loads
        from data.tokenizer import get_encoding
        enc = get_encoding()
        model, meta = load_model(args.ckpt, device)
        res = evaluate_core(model, enc, device, bundle, args.max_per_task, labels, autocast(device_type, args.dtype),
                            log=print if rank == 0 else None)
        if rank == 0:
            name = "CORE" if res["complete"] else f"CORE-style mean over {len(res['results'])} task(s) (not CORE)"
            print(f"{name}: {res['core']:.4f} | step {meta.get('step')}")
            ckpt = resolve_ckpt(args.ckpt)
            out = ckpt.parent / "core.json" if args.out is None else args.out
            if out != "-":
                record = {"task": "core", **res, "step": meta.get("step"), "tokens": meta.get("tokens"),
                          "ckpt": str(ckpt), "bundle_dir": str(bundle)}
                Path(out).write_text(json.dumps(record, indent=1) + "\n")
        return res
    finally:
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
