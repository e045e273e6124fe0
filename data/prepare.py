"""Tokenize a text dataset into token shards (GPT-2's BPE, or a tokenizer trained by data/tokenizer.py).

    python data/prepare.py pydocs                  # embedded corpus, no download, seconds
    python data/prepare.py openwebtext             # Skylion007/openwebtext (parquet revision)
    python data/prepare.py fineweb_edu             # HuggingFaceFW/fineweb-edu, sample-10BT
    python data/prepare.py fineweb_edu --subset sample-100BT
    python data/prepare.py fineweb_edu --data-files shards/*.parquet --out-dir data/my_fwe
    python data/prepare.py tinystories             # roneneldan/TinyStories, its own train / validation splits
    python data/prepare.py tinystories --data-files TinyStoriesV2-GPT4-train.txt TinyStoriesV2-GPT4-valid.txt
    python data/prepare.py fineweb_edu --tokenizer data/tokenizers/fineweb_edu-65536.tiktoken   # data/fineweb_edu-65536

Output in ``data/<DATASET>/`` (with ``--tokenizer FILE``: ``data/<DATASET>-<NAME>/``, NAME the
file's name without its suffix, or ``data/<NAME>/`` when NAME starts with ``<DATASET>-``, as
``fineweb_edu-65536``; or ``--out-dir``): ``val_000000.bin, ...``,
``train_000000.bin, ...`` (llm.c format, see ``data/shards.py``; ``--shard-tokens`` per shard,
100 M by default) and ``meta.json``. Every document is preceded by the tokenizer's document
token (``bos_token``: GPT-2's ``<|endoftext|>`` 50256, a trained tokenizer's ``<|bos|>``, as
nanochat's loader prepends it), and documents run on across shard boundaries: the concatenation
of a split's shards is its token stream. Shards hold uint16 ids: a tokenizer of more than 65,536
tokens is refused. ``meta.json`` records the tokenizer (``"tokenizer"``: name, rank-file sha256,
vocabulary, special tokens, BOS) and ``token_bytes``, each token's exact UTF-8 byte count (0 for
special tokens) for bits per byte; a trained tokenizer's rank file is copied in as
``tokenizer.tiktoken``, so the dataset (and every checkpoint trained on it) carries its tokenizer.

Train/val split: ``Dataset.train_test_split(test_size=val_fraction, seed=seed)`` on the document
list, with each dataset's fraction and seed (``data/sources.py``'s DATASETS: openwebtext 0.05 %, seed
2357 as in nanoGPT). A dataset published with its own validation split (tinystories) keeps it
(``--val-fraction`` splits all its documents at random instead); its ``--data-files`` named ``val``,
``valid`` or ``validation`` are val. ``--data-files`` go through the same path as the hub download.

Resumable and atomic: shards are written as ``*.bin.tmp`` and renamed when complete, and
``progress.json`` records the completed shards and the document cursor after each one. A
rerun of the same command continues after the last completed shard; a rerun with other
settings starts clean. ``meta.json`` is written last: a directory without it is not a
prepared dataset, and the loader refuses it. ``--restart`` over a complete preparation builds the
new one in ``<out-dir>/.restart/`` and swaps it in only when it is complete, so a failed or killed
rebuild never loses the previous dataset (rerun the same command to continue it).

Documents whose ``text`` is null are skipped, counted, reported and recorded in ``meta.json``
as ``skipped_docs`` (an empty string is a document: an EOT alone).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from itertools import chain
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import data.x` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from data import shards as shardlib
from data import tokenizer as toklib
from data.sources import DATA_ROOT, DATASETS, SPLITS, load_splits, prepare_command, source_spec

PROGRESS_EVERY_S = 30.0  # a plain progress line this often when stderr is not a terminal (a log file)
STAGING = ".restart"  # --restart over a complete preparation builds here, then swaps in

_SHARD_RE = re.compile(r"^(train|val)_\d{6}\.bin(\.tmp)?$")


# ----------------------------------------------------------------------------- tokenization

_W: dict = {}


def _worker_init(splits: dict, enc) -> None:
    if mp.current_process().name != "MainProcess":  # Ctrl-C: the parent stops the pool, no worker tracebacks
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _W["splits"] = splits
    _W["enc"] = enc


def _tokenize_range(task: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of documents [a, b) of a split, the BOS token before each; and each document's length."""
    split, a, b = task
    texts = _W["splits"][split][a:b]["text"]
    ids = _W["enc"].encode_ordinary_batch(texts, num_threads=1)
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    bos = (_W["enc"].bos_token,)
    flat = chain.from_iterable(chain(bos, x) for x in ids)  # consumed in C by fromiter
    return np.fromiter(flat, dtype=np.uint16, count=int(lens.sum())), lens


# ----------------------------------------------------------------------------- output dir

def _atomic_json(path: Path, obj) -> None:
    shardlib.write_atomic(path, json.dumps(obj, indent=1).encode())


def _clean_dir(out_dir: Path) -> None:
    for p in out_dir.iterdir():
        if _SHARD_RE.match(p.name) or p.name in ("meta.json", "progress.json", "meta.json.tmp",
                                                 "progress.json.tmp", toklib.DATA_RANK_FILE):
            p.unlink()


def _fresh_state(fingerprint: dict) -> dict:
    return {"fingerprint": fingerprint,
            "splits": {s: {"shards": [], "next_doc": 0, "skip_tokens": 0, "done": False} for s in SPLITS}}


def _resume_state(out_dir: Path, fingerprint: dict, log) -> dict | None:
    """The saved progress if it belongs to the same settings and its shards are intact."""
    path = out_dir / "progress.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        log(f"{path} unreadable; starting clean")
        return None
    if state.get("fingerprint") != fingerprint:
        log(f"{out_dir} holds an unfinished preparation with other settings; starting clean")
        return None
    try:
        for split in SPLITS:
            for sh in state["splits"][split]["shards"]:
                if shardlib.read_header(out_dir / sh["file"]) != sh["tokens"]:
                    raise ValueError(sh["file"])
    except (KeyError, OSError, ValueError) as e:
        log(f"completed shards in {out_dir} do not match progress.json ({e}); starting clean")
        return None
    return state


# ----------------------------------------------------------------------------- main routine

def load_tokenizer(tokenizer=None):
    """-> (the encoding, its record for meta.json): GPT-2's for None or "gpt2", else the trained
    tokenizer at that path (data/tokenizer.py train). More than 65,536 tokens: ValueError."""
    if tokenizer in (None, "", toklib.NAME):
        enc = toklib.get_encoding()  # fail early (and clearly) if the rank file is missing
        return enc, toklib.record(enc)
    enc = toklib.load_bpe(tokenizer)
    if enc.n_vocab > toklib.UINT16_VOCAB:
        raise ValueError(f"--tokenizer {tokenizer}: {enc.n_vocab:,} tokens do not fit the uint16 shards (ids below "
                         f"{toklib.UINT16_VOCAB:,}); train one with --vocab-size {toklib.UINT16_VOCAB} or less")
    return enc, {**toklib.record(enc, tokenizer), "file": toklib.DATA_RANK_FILE}


def default_out_dir(dataset: str, tok_record: dict) -> Path:
    """data/<dataset> (GPT-2's BPE), data/<dataset>-<tokenizer name> (a trained tokenizer; its name
    alone when it starts with the dataset's, as data/tokenizer.py names them: fineweb_edu-65536)."""
    if toklib.is_gpt2(tok_record):
        return DATA_ROOT / dataset
    name = tok_record["name"]
    return DATA_ROOT / (name if name.startswith(f"{dataset}-") else f"{dataset}-{name}")


def prepare(dataset: str, out_dir=None, data_files=None, subset=None, revision=None,
            val_fraction=None, seed=None, shard_tokens=shardlib.DEFAULT_SHARD_TOKENS, workers=None,
            chunk_docs=None, cache_dir=None, max_docs=None, restart=False, progress=True,
            on_shard=None, log=print, tokenizer=None) -> dict:
    """Prepare ``dataset`` into ``out_dir``; returns the meta dict. See the module docstring.

    ``tokenizer``: None (GPT-2's BPE) or the path of a trained tokenizer's rank file.
    ``on_shard(split, index, path)`` is called after each shard is committed.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    cfg = DATASETS[dataset]
    val_fraction = cfg["val_fraction"] if val_fraction is None else float(val_fraction)
    own_split = val_fraction is None  # the dataset's published train / validation splits
    if own_split and seed is not None:
        raise ValueError(f"--seed: {dataset} keeps its own validation split, so there is no random split to seed; "
                         f"pass --val-fraction too to split its documents at random")
    seed = None if own_split else cfg["seed"] if seed is None else int(seed)
    if not own_split and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
    shard_tokens = int(shard_tokens)
    if not 1 <= shard_tokens < 2**31:
        raise ValueError(f"--shard-tokens must be in [1, 2**31), got {shard_tokens}")
    if max_docs is not None and int(max_docs) < 1:
        raise ValueError(f"--max-docs must be >= 1 (leave it out for all documents), got {max_docs}")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    workers = int(workers if workers is not None else (os.cpu_count() or 1))
    enc, tok_record = load_tokenizer(tokenizer)  # before out_dir is touched
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(dataset, tok_record)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir}: cannot create it ({e}); pass a writable directory") from None
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out-dir {out_dir}: not writable; pass a writable directory")

    token_bytes = toklib.token_byte_lengths(enc)
    source = source_spec(dataset, data_files, subset, revision, max_docs, own_split)
    fingerprint = {"format": shardlib.META_FORMAT, "dataset": dataset, "source": source,
                   "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
                   "tokenizer_sha256": tok_record["rank_file_sha256"]}
    if not toklib.is_gpt2(tok_record):  # GPT-2's datasets keep the fingerprint they always had
        fingerprint["tokenizer"] = {k: tok_record[k] for k in ("pattern", "special_tokens", "bos")}

    kw = dict(data_files=data_files, subset=subset, revision=revision, val_fraction=val_fraction, seed=seed,
              shard_tokens=shard_tokens, workers=workers, chunk_docs=chunk_docs, cache_dir=cache_dir,
              max_docs=max_docs, progress=progress, on_shard=on_shard, log=log, tokenizer=tokenizer)
    with shardlib.dir_lock(out_dir, ".prepare.lock", "`prepare.py`"):
        meta_path = out_dir / "meta.json"
        meta = _read_meta(meta_path, restart)
        if meta is not None and not restart:
            if meta.get("fingerprint") == fingerprint:
                log(f"{out_dir} is already prepared with these settings (use --restart to rebuild)")
                return meta
            raise ValueError(f"{out_dir} already holds a dataset prepared with other settings; "
                             f"pass --restart to replace it, or --out-dir to write elsewhere")
        if meta is not None:  # --restart over a complete dataset: keep it until the new one is complete
            staging = out_dir / STAGING
            old = _read_meta(staging / "meta.json", restart=True)
            if old is not None and old.get("fingerprint") != fingerprint:
                shutil.rmtree(staging)  # a finished rebuild with yet other settings, never swapped in
            log(f"building the new dataset in {staging}; {out_dir} keeps the previous one until it is complete")
            meta = prepare(dataset, out_dir=staging, **kw)
            _swap_in(staging, out_dir)
            log(f"replaced the previous dataset in {out_dir}")
            return meta
        state = None if restart else _resume_state(out_dir, fingerprint, log)
        if state is None:
            _clean_dir(out_dir)
            shutil.rmtree(out_dir / STAGING, ignore_errors=True)  # a rebuild whose swap was cut short
            state = _fresh_state(fingerprint)
        else:
            done = sum(len(state["splits"][s]["shards"]) for s in SPLITS)
            log(f"resuming {out_dir}: {done} shards already complete")
            keep = {sh["file"] for s in SPLITS for sh in state["splits"][s]["shards"]}
            for p in out_dir.iterdir():  # leftovers of the killed run
                if _SHARD_RE.match(p.name) and p.name not in keep:
                    p.unlink()

        t0 = time.time()
        splits, skipped = load_splits(source, val_fraction, seed, cache_dir, workers, progress)
        if skipped:
            log(f"skipped {skipped:,} of {skipped + sum(map(len, splits.values())):,} documents whose text is null "
                f"(recorded in meta.json as skipped_docs)")
        sizes = {s: len(splits[s]) for s in SPLITS}
        if state.setdefault("num_docs", sizes) != sizes:  # the source changed under a resume
            log("the source now has other documents than the unfinished run saw; starting clean")
            _clean_dir(out_dir)
            state = _fresh_state(fingerprint)
            state["num_docs"] = sizes
        n_tok_new = 0
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(splits, enc)) if workers > 1 else None
        if pool is None:
            _worker_init(splits, enc)
        t1 = time.time()
        try:
            for split in SPLITS:
                n_tok_new += _prepare_split(split, splits[split], state, out_dir, shard_tokens,
                                            token_bytes, enc.bos_token, pool, workers, chunk_docs, progress,
                                            on_shard)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        dt = time.time() - t1

        meta = _build_meta(state, token_bytes, skipped, tok_record)
        if not toklib.is_gpt2(tok_record):  # the dataset carries its tokenizer; meta.json comes last
            shardlib.write_atomic(out_dir / toklib.DATA_RANK_FILE, toklib.rank_file_bytes(enc))
        _atomic_json(meta_path, meta)
        (out_dir / "progress.json").unlink(missing_ok=True)
    rate = n_tok_new / max(dt, 1e-9)
    log(f"prepared {dataset} in {out_dir} ({time.time() - t0:.1f}s total, tokenizing "
        f"{n_tok_new:,} tokens in {dt:.1f}s = {rate / 1e6:.2f} M tokens/s with {workers} workers)")
    for s in SPLITS:
        c = meta["splits"][s]
        log(f"  {s:5s}: {c['documents']:>12,} documents {c['tokens']:>15,} tokens "
            f"{c['bytes']:>16,} bytes in {len(c['shards'])} shards")
    if meta["skipped_docs"]:
        log(f"  skipped: {meta['skipped_docs']:,} documents whose text is null")
    return meta


def _read_meta(path: Path, restart: bool) -> dict | None:
    """meta.json of a complete preparation, or None. A damaged one is an error (it may be a dataset
    someone uses) unless restart says to rebuild anyway."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict):
            return meta
    except (OSError, ValueError):
        pass
    if restart:
        return None
    raise ValueError(f"{path} is damaged (not a JSON object); pass --restart to rebuild the dataset in "
                     f"{path.parent}, or --out-dir to write elsewhere")


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir's dataset by the complete one in staging. meta.json goes first and comes back
    last, so a kill in between leaves a directory the loader refuses, never a mix of the two."""
    (out_dir / "meta.json").unlink()
    _clean_dir(out_dir)
    for p in sorted(staging.iterdir()):
        if (_SHARD_RE.match(p.name) and not p.name.endswith(".tmp")) or p.name == toklib.DATA_RANK_FILE:
            os.replace(p, out_dir / p.name)
    os.replace(staging / "meta.json", out_dir / "meta.json")
    shutil.rmtree(staging)


def _prepare_split(split, ds, state, out_dir, shard_tokens, token_bytes, bos, pool, workers,
                   chunk_docs, progress, on_shard) -> int:
    st = state["splits"][split]
    if st["done"]:
        return 0
    n_docs = len(ds)
    if n_docs == 0:
        raise ValueError(f"the {split} split is empty; use more documents or another val fraction")
    chunk = int(chunk_docs) if chunk_docs else max(1, min(1024, math.ceil(n_docs / (8 * workers))))
    start, skip = int(st["next_doc"]), int(st["skip_tokens"])
    tasks = [(split, a, min(a + chunk, n_docs)) for a in range(start, n_docs, chunk)]
    results = pool.imap(_tokenize_range, tasks) if pool is not None else map(_tokenize_range, tasks)

    buf = np.empty(shard_tokens, dtype=np.uint16)
    fill = written = 0

    def commit(nd: int, sk: int) -> None:
        nonlocal fill, written
        tokens = buf[:fill]
        index = len(st["shards"])
        name = shardlib.shard_name(split, index)
        shardlib.write_shard(out_dir / name, tokens)
        counts = np.bincount(tokens, minlength=token_bytes.size)
        st["shards"].append({"file": name, "tokens": int(fill), "documents": int(counts[bos]),
                             "bytes": int(counts[: token_bytes.size] @ token_bytes)})
        st["next_doc"], st["skip_tokens"] = int(nd), int(sk)
        _atomic_json(out_dir / "progress.json", state)
        written += fill
        fill = 0
        if on_shard is not None:
            on_shard(split, index, out_dir / name)

    from tqdm.auto import tqdm
    tty = progress and sys.stderr.isatty()  # a log file gets plain lines (below), not carriage returns
    bar = tqdm(total=n_docs, initial=start, desc=f"{split}", unit="doc", disable=not tty,
               dynamic_ncols=True, smoothing=0.05)
    ntok, t0 = 0, time.time()
    last = t0
    try:
        for (_, a, b), (toks, lens) in zip(tasks, results):
            pos = skip if a == start else 0
            ends = np.cumsum(lens)  # where each document of the chunk ends
            while pos < toks.size:
                take = min(shard_tokens - fill, toks.size - pos)
                buf[fill:fill + take] = toks[pos:pos + take]
                fill += take
                pos += take
                if fill == shard_tokens:
                    if pos == toks.size:
                        commit(b, 0)
                    else:  # shard ends inside document j of this chunk
                        j = int(np.searchsorted(ends, pos, side="right"))
                        commit(a + j, pos - (int(ends[j - 1]) if j else 0))
            ntok += toks.size
            bar.update(b - a)
            if tty:
                bar.set_postfix_str(f"{ntok / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.2f}M tok/s",
                                    refresh=False)
            elif progress and (time.time() - last >= PROGRESS_EVERY_S or b == n_docs):
                last = time.time()
                print(f"{split}: {b:,}/{n_docs:,} documents ({100 * b / n_docs:.0f}%), "
                      f"{ntok / max(last - t0, 1e-9) / 1e6:.2f}M tokens/s", flush=True)
        if fill:
            commit(n_docs, 0)
    finally:
        bar.close()
    st["done"] = True
    _atomic_json(out_dir / "progress.json", state)
    return written


def _build_meta(state, token_bytes, skipped_docs, tok_record):
    """meta.json of a complete preparation (its settings: the fingerprint of its state)."""
    fp = state["fingerprint"]
    splits = {}
    for s in SPLITS:
        shards = state["splits"][s]["shards"]
        splits[s] = {k: sum(x[k] for x in shards) for k in ("documents", "tokens", "bytes")}
        splits[s]["shards"] = shards
    return {"format": shardlib.META_FORMAT, "dataset": fp["dataset"], "tokenizer": tok_record,
            "vocab_size": tok_record["n_vocab"],
            "eot": tok_record["bos"],  # the document token (its name from GPT-2's <|endoftext|>)
            "bos": tok_record["bos"],
            "shard_format": {"magic": shardlib.MAGIC, "version": shardlib.VERSION,
                             "header_bytes": shardlib.HEADER_BYTES, "dtype": "uint16"},
            "source": fp["source"],
            "val_split": "own" if fp["val_fraction"] is None else "random",  # own: the dataset's validation split
            "val_fraction": fp["val_fraction"], "seed": fp["seed"], "shard_tokens": fp["shard_tokens"],
            "splits": splits,
            "skipped_docs": skipped_docs,  # rows whose text is null: not documents
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": fp,
            "token_bytes": [int(x) for x in token_bytes]}


def verify(out_dir, dataset=None) -> dict:
    """Full check of a prepared dir (meant to hold dataset): every shard's header, size and token ids;
    counts vs meta."""
    from data.loader import load_meta

    out_dir = Path(out_dir)
    meta = load_meta(out_dir, dataset)
    token_bytes = np.asarray(meta["token_bytes"], dtype=np.int64)
    fix = f"Re-run `{prepare_command(out_dir, meta, restart=True)}`."
    enc = toklib.for_data(out_dir, meta)  # a trained tokenizer's copy is there and is the recorded one
    if not np.array_equal(toklib.token_byte_lengths(enc), token_bytes):
        raise ValueError(f"{out_dir / 'meta.json'}: token_bytes are not the tokenizer's. {fix}")
    for s in SPLITS:
        for sh in meta["splits"][s]["shards"]:
            path = out_dir / sh["file"]
            n = shardlib.verify_shard(path, meta["vocab_size"], fix)
            counts = np.bincount(shardlib.open_shard(path), minlength=meta["vocab_size"])
            got = (n, int(counts[meta["eot"]]), int(counts @ token_bytes))
            want = (sh["tokens"], sh["documents"], sh["bytes"])
            if got != want:
                raise ValueError(f"shard {path}: (tokens, documents, bytes) = {got} but meta.json says {want}. {fix}")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    count = toklib.int_at_least  # argparse type: an integer >= its argument
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("--out-dir", default=None,
                    help="output directory (default: data/<dataset>, with --tokenizer data/<dataset>-<its name>)")
    ap.add_argument("--tokenizer", default=None, metavar="FILE",
                    help="a tokenizer trained by `python data/tokenizer.py train` (its .tiktoken file, the .json "
                         "beside it); default: GPT-2's BPE")
    ap.add_argument("--data-files", nargs="+", default=None, metavar="PATH",
                    help="local parquet/json(l)/txt files (globs, dirs) with a 'text' column, "
                         "instead of the hub download (tinystories: its .txt files too, and a file named "
                         "*valid* / *validation* is the val split)")
    ap.add_argument("--subset", default=None,
                    help="hub config (fineweb_edu: sample-10BT, sample-100BT, ...; default: the dataset's)")
    ap.add_argument("--revision", default=None,
                    help="hub revision (openwebtext: refs/convert/parquet; default: the dataset's)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="override the dataset's val fraction (tinystories: split all its documents at random "
                         "instead of keeping its own validation split; default: the dataset's)")
    ap.add_argument("--seed", type=count(0), default=None,
                    help="override the dataset's split seed (default: the dataset's)")
    ap.add_argument("--shard-tokens", type=count(1), default=shardlib.DEFAULT_SHARD_TOKENS,
                    help=f"tokens per shard (default: {shardlib.DEFAULT_SHARD_TOKENS:,})")
    ap.add_argument("--workers", type=count(1), default=None, help="tokenizer processes (default: all cores)")
    ap.add_argument("--chunk-docs", type=count(1), default=None,
                    help="documents per tokenizer task (default: about 8 tasks per process, at most 1024)")
    ap.add_argument("--max-docs", type=count(1), default=None,
                    help="use only the first N >= 1 documents, of each split for a dataset with its own "
                         "(trials; default: all)")
    ap.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache directory "
                                                      "(default: $HF_DATASETS_CACHE, or ~/.cache/huggingface/datasets)")
    ap.add_argument("--restart", action="store_true", help="discard previous output and start clean")
    ap.add_argument("--verify", action="store_true", help="only check an already prepared directory")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress output (default: a bar on a terminal, plain lines every 30 s otherwise)")
    args = ap.parse_args(argv)

    try:
        if args.verify:
            out = Path(args.out_dir or default_out_dir(args.dataset, load_tokenizer(args.tokenizer)[1]))
            meta = verify(out, args.dataset)
            counts = ", ".join(f"{s}: {meta['splits'][s]['tokens']:,} tokens" for s in SPLITS)
            print(f"{out}: ok ({counts})")
            return 0
        prepare(args.dataset, out_dir=args.out_dir, data_files=args.data_files, subset=args.subset,
                revision=args.revision, val_fraction=args.val_fraction, seed=args.seed,
                shard_tokens=args.shard_tokens, workers=args.workers, chunk_docs=args.chunk_docs,
                cache_dir=args.cache_dir, max_docs=args.max_docs, restart=args.restart,
                progress=not args.no_progress, tokenizer=args.tokenizer)
    except (OSError, ValueError, shardlib.DirLocked) as e:  # bad input, a busy directory: the message says what to do
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare.py: interrupted; rerun the same command to continue after the last complete shard",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from data import prepare as _module  # run the importable copy, so workers can pickle its functions

    sys.exit(_module.main())
