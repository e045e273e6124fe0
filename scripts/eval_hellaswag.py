"""
HellaSwag accuracy of a checkpoint, scored as nanoGPT / llm.c score it.

Every item has a context and 4 candidate endings. Each ending is appended to the context
(tokenized as " " + ending, the way GPT-2 sees running text) and scored by the model's
cross-entropy on the ending's tokens only:
    acc_norm   argmin over endings of the MEAN loss per ending token ("completion style",
               length-normalized): the number nanoGPT, llm.c and the KromHC paper report
    acc        argmin of the SUM of the ending's losses
Reference: OpenAI's GPT-2 124M scores acc 0.2859, acc_norm 0.2955 on the 10,042 validation
items this way (llm.c); KromHC reports 0.364 at 12 layers, C = 768.

    python scripts/eval_hellaswag.py --ckpt out/quickstart-kromhc-n4-s1337        # a run dir or ckpt.pt
    python scripts/eval_hellaswag.py --ckpt out/run/ckpt.pt --data-file hellaswag_val.jsonl
    torchrun --standalone --nproc_per_node=8 scripts/eval_hellaswag.py --ckpt out/run

Data: the official jsonl (github.com/rowanz/hellaswag), downloaded once into
$HCGPT_CACHE_DIR/hellaswag (default ~/.cache/hcgpt/hellaswag). On a node without network,
copy hellaswag_val.jsonl there or pass --data-file. Results go to <run dir>/hellaswag.json
(read by scripts/plot_runs.py for the results table) unless --out says otherwise.

From a training loop (every rank calls it; the counts are all-reduced):
    from scripts.eval_hellaswag import load_examples, evaluate_hellaswag
    examples = load_examples(limit=1000)                   # once, at startup
    res = evaluate_hellaswag(raw_model, examples, device, ctx=autocast_ctx)
    res["acc_norm"], res["acc"], res["n"]
"""

import argparse
import json
import os
import sys
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
NUM_ITEMS = {"train": 39905, "val": 10042, "test": 10003}


# -----------------------------------------------------------------------------
# data

def cache_dir():
    return Path(os.environ.get("HCGPT_CACHE_DIR", Path.home() / ".cache" / "hcgpt")).expanduser() / "hellaswag"


def download(split="val", dest_dir=None):
    """Path of hellaswag_<split>.jsonl, downloaded once (atomically) if not already there."""
    if split not in NUM_ITEMS:
        raise ValueError(f"unknown HellaSwag split {split!r}; choose one of {list(NUM_ITEMS)}")
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir()
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
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e}); {fix}") from None
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
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); {fix}") from None
    if not examples:
        raise ValueError(f"{path}: no HellaSwag items; {fix}")
    return examples


# -----------------------------------------------------------------------------
# scoring

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
# checkpoints

def resolve_ckpt(path):
    """A ckpt.pt, or a run directory that holds one."""
    p = Path(path)
    return p / "ckpt.pt" if p.is_dir() else p


def load_model(path, device="cpu"):
    """GPT from a train.py checkpoint, in eval mode -> (model, checkpoint dict without weights).
    An unusable checkpoint is a model.CheckpointError naming the file and the fix."""
    from model import GPT, GPTConfig, CheckpointError, load_checkpoint
    path = resolve_ckpt(path)
    ckpt = load_checkpoint(path)
    try:
        cfg = GPTConfig(**ckpt["model_config"])
        if cfg.vocab_size < 50257:  # the tools read and write GPT-2 tokens: a smaller table fails mid-run
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the GPT-2 tokenizer's 50257 tokens")
        model = GPT(cfg)
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
        model.load_state_dict(state)
    except Exception as e:  # a config or weights this model.py cannot build: another program's or version's
        raise CheckpointError(f"{path}: not a model this version of model.py can build ({type(e).__name__}: "
                              f"{str(e)[:300]}); pass a ckpt.pt written by this version of train.py on "
                              f"GPT-2 token shards") from None
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "ranks", "loader")}
    return model, meta


def setup_device(device="auto"):
    """-> (device, device_type, rank, world_size); initialises torch.distributed under torchrun."""
    device = check_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if int(os.environ.get("RANK", -1)) != -1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device_type == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return device, device_type, dist.get_rank(), dist.get_world_size()
    return device, device_type, 0, 1


def check_device(device):
    """--device value -> a device this machine has ("auto": cuda if present, else cpu); ValueError otherwise."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() "
                             f"is False); use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    return device


def positive_int(text):
    """argparse type: an integer >= 1 (a count or size of 0 or less would give a wrong or empty result)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def run_cli(main_body, prog):
    """Run a script's body; a user's mistake (bad file, flag, checkpoint, device) ends in one line
    naming it and exit status 1, not a traceback."""
    try:
        return main_body()
    except (OSError, ValueError, RuntimeError) as e:  # missing/bad files, checkpoints, devices, no network
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def autocast(device_type, dtype):
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint file, or the run directory holding ckpt.pt")
    ap.add_argument("--data-file", default=None, help="local HellaSwag jsonl (default: download once and cache)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N >= 1 items (default: all)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass (4 rows each)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--out", default=None, help="results JSON (default: <run dir>/hellaswag.json; '-' for none)")
    args = ap.parse_args(argv)
    return run_cli(lambda: _main(args), "eval_hellaswag.py")


def _main(args):
    device, device_type, rank, world_size = setup_device(args.device)
    try:
        if args.data_file is None and rank == 0:
            download(args.split)  # one process downloads, the others wait at the barrier
        if world_size > 1:
            dist.barrier()
        examples = load_examples(args.data_file, args.split, args.limit)
        model, meta = load_model(args.ckpt, device)
        if args.compile:
            model = torch.compile(model)
        t0 = time.time()
        res = evaluate_hellaswag(model, examples, device, batch_size=args.batch_size,
                                 ctx=autocast(device_type, args.dtype), rank=rank, world_size=world_size)
        dt = time.time() - t0
        if rank == 0:
            ckpt = resolve_ckpt(args.ckpt)
            print(f"hellaswag {args.split}: {res['n']} items | acc_norm {res['acc_norm']:.4f} | acc {res['acc']:.4f} "
                  f"| step {meta.get('step')} | {dt:.1f}s on {world_size} process(es)")
            out = ckpt.parent / "hellaswag.json" if args.out is None else args.out
            if out != "-":
                record = {"task": "hellaswag", "split": args.split, **res, "step": meta.get("step"),
                          "tokens": meta.get("tokens"), "ckpt": str(ckpt),
                          "data_file": str(args.data_file or download(args.split))}
                Path(out).write_text(json.dumps(record, indent=1) + "\n")
        return res
    finally:
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
