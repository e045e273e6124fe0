"""Where a dataset's documents come from: the named datasets, local files, and the train/val split.

    DATASETS           the datasets data/prepare.py knows: hub name, revision, subset, val split
    source_spec        what one preparation reads (hub, local files or the embedded corpus), recorded in meta.json
    load_documents     the documents (a datasets.Dataset with a "text" column) through one code path
    split_documents    the val / train split, seeded (or the dataset's own validation split)
    prepare_command    the command that prepares a dataset again, as its meta.json records it

data/prepare.py tokenizes them into shards; data/tokenizer.py trains a tokenizer on them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from pathlib import Path

DATA_ROOT = Path(__file__).resolve().parent  # data/<dataset> is where a dataset is prepared by default
SPLITS = ("val", "train")  # order of preparation (val is small and ready first)
READ_CHARS = 1 << 24  # characters per read of a text file split into documents at a separator
DATASETS = {
    "openwebtext": dict(hub="Skylion007/openwebtext", revision="refs/convert/parquet", subset=None,
                        val_fraction=0.0005, seed=2357),
    "fineweb_edu": dict(hub="HuggingFaceFW/fineweb-edu", revision=None, subset="sample-10BT",
                        val_fraction=0.005, seed=42),
    "pydocs": dict(hub=None, revision=None, subset=None, val_fraction=0.1, seed=1337),
    # Eldan & Li 2023 (arXiv 2305.07759): 2,119,719 train / about 22 K validation stories in the hub's parquet
    # files (GPT-3.5 and GPT-4 stories). val_fraction None: the published validation split is val; the
    # seed only serves an explicit --val-fraction. The .txt files (TinyStoriesV2-GPT4-*.txt: GPT-4 stories
    # only) are one story per <|endoftext|>-separated block.
    "tinystories": dict(hub="roneneldan/TinyStories", revision=None, subset=None, val_fraction=None, seed=1337,
                        hub_files={"train": "data/train-*.parquet", "val": "data/validation-*.parquet"},
                        separator="<|endoftext|>"),
}
_VAL_FILE_RE = re.compile(r"(^|[-_. ])(val|valid|validation)([-_. ]|$)")  # TinyStories-valid.txt, validation-0.parquet
_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json",
            ".txt": "text", ".text": "text", ".md": "text"}
FILES_FIX = ("--data-files takes parquet, JSON-lines or UTF-8 text files with one document per row "
             "in a string column named 'text'")


def _file_format(path: str) -> str | None:
    name = re.sub(r"\.(gz|bz2|xz|zst)$", "", path.lower())  # compressed: the format of what is inside
    return _FORMATS.get(os.path.splitext(name)[1])


def expand_data_files(patterns: list[str]) -> tuple[list[str], str]:
    """Expand globs / directories into a file list (order kept, globs sorted) and its format."""
    files: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(str(p) for p in Path(pat).rglob("*") if p.is_file() and _file_format(str(p)))
        elif any(c in pat for c in "*?["):
            found = sorted(glob.glob(pat, recursive=True))
        else:
            found = [pat]
        if not found:
            raise FileNotFoundError(f"--data-files {pat}: no matching files")
        for f in found:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"--data-files: {f} does not exist")
        files.extend(os.path.abspath(f) for f in found)
    fmts = {_file_format(f) for f in files}
    if None in fmts:
        bad = [f for f in files if _file_format(f) is None]
        raise ValueError(f"--data-files: cannot tell the format of {bad[0]} "
                         f"(use .parquet, .json/.jsonl or .txt files)")
    if len(fmts) != 1:
        raise ValueError(f"--data-files: mixed formats {sorted(fmts)}; pass files of one format")
    return files, fmts.pop()


def source_spec(dataset: str, data_files=None, subset=None, revision=None, max_docs=None,
                own_split=False) -> dict:
    """What will be read: recorded in meta.json and used to decide whether a rerun may resume.
    own_split: the dataset's own train / val splits are kept (each data file gets its split from its name)."""
    cfg = DATASETS[dataset]
    if data_files:
        files, fmt = expand_data_files(list(data_files))
        st = [os.stat(f) for f in files]
        entries = [{"path": f, "bytes": s.st_size, "mtime_ns": s.st_mtime_ns} for f, s in zip(files, st)]
        if own_split:
            for e in entries:  # a file whose name marks it as a validation file is val
                e["split"] = "val" if _VAL_FILE_RE.search(os.path.basename(e["path"]).lower()) else "train"
            missing = [s for s in SPLITS if not any(e["split"] == s for e in entries)]
            if missing:
                raise ValueError(f"--data-files: no {missing[0]} file among {', '.join(files[:3])}"
                                 f"{' ...' if len(files) > 3 else ''}; {dataset} keeps its own validation split: "
                                 f"pass its train and its validation files (a name with 'valid' or 'validation', as "
                                 f"TinyStoriesV2-GPT4-valid.txt or validation-*.parquet), or --val-fraction F to "
                                 f"split the documents at random")
        spec = {"kind": "data_files", "format": fmt, "max_docs": max_docs, "data_files": entries}
        if fmt == "text" and cfg.get("separator"):
            spec["separator"] = cfg["separator"]
        return spec
    if cfg["hub"] is None:
        from data import pydocs
        return {"kind": "embedded", **pydocs.source_info(), "max_docs": max_docs}
    spec = {"kind": "hub", "name": cfg["hub"], "revision": revision if revision is not None else cfg["revision"],
            "subset": subset if subset is not None else cfg["subset"], "max_docs": max_docs}
    if cfg.get("hub_files"):
        spec["files"] = cfg["hub_files"]
    return spec


def diagnose_file(path: str, fmt: str) -> str | None:
    """Why ``path`` cannot be read as ``fmt`` (None if no reason is found): run only after a load
    failed, to name the file (``datasets`` often does not)."""
    if os.path.getsize(path) == 0:
        return f"{path} is empty"
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            return f"{path} is not a readable parquet file ({e})"
        return f"{path} has no rows" if rows == 0 else None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{lineno}: not UTF-8 text ({e}); convert the file to UTF-8"
            if fmt == "json" and text.strip():
                try:
                    json.loads(text)
                except ValueError as e:
                    return f"{path}:{lineno}: not a JSON line ({e})"
    return None


def _read_stories(files, separator):
    """{'text': story} for each block of the text files between separators (TinyStories' .txt layout: a
    story, then a line <|endoftext|>), whitespace stripped; a block of whitespace only is no story."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            rest = ""
            while chunk := f.read(READ_CHARS):
                *stories, rest = (rest + chunk).split(separator)  # a separator cut by the chunk stays in rest
                for story in stories:
                    if story.strip():
                        yield {"text": story.strip()}
            if rest.strip():
                yield {"text": rest.strip()}


def _load_files(datasets, files: list, fmt: str, cache_dir, separator=None):
    for f in files:  # cheap checks first: an empty file is a StopIteration deep inside datasets
        if os.path.getsize(f) == 0 or fmt == "parquet":  # a parquet footer is a few KB
            cause = diagnose_file(f, fmt)
            if cause:
                raise ValueError(f"{cause}; {FILES_FIX}")
    kw = {"sample_by": "document"} if fmt == "text" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error lines would repeat ours below
    try:
        if fmt == "text" and separator:  # many documents per file; cached as Arrow like load_dataset's output
            stamp = json.dumps([[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files] + [separator])
            ds = datasets.Dataset.from_generator(
                _read_stories, features=datasets.Features({"text": datasets.Value("string")}), cache_dir=cache_dir,
                gen_kwargs={"files": files, "separator": separator},
                fingerprint=hashlib.sha256(stamp.encode()).hexdigest()[:16])
        else:
            ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir, **kw)
        if fmt == "json" and "text" in ds.column_names:  # Arrow's JSON reader lets bad UTF-8 through to
            ds.data.column("text").validate(full=True)    # the tokenizer; one pass in C catches it here
        return ds
    except Exception as e:  # datasets raises many kinds (ArrowInvalid, DatasetGenerationError, ...)
        cause = next((d for d in (diagnose_file(f, fmt) for f in files) if d), None)
        raise ValueError(f"{cause or 'cannot read ' + ', '.join(files[:3])} "
                         f"({type(e).__name__}: {str(e)[:200]}); {FILES_FIX}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def load_documents(source: dict, cache_dir=None, num_proc=None, progress=True, split=None):
    """A ``datasets.Dataset`` with one ``text`` column, one row per document: the source's documents of
    ``split`` ('train' or 'val', for a dataset with its own splits), or all of them (split None). An
    unreadable input is a ValueError naming the file and the fix."""
    import datasets

    if not progress or not sys.stderr.isatty():  # tqdm's carriage returns make a log file unreadable
        datasets.disable_progress_bars()
    kind = source["kind"]
    if kind == "embedded":
        from data import pydocs
        ds = datasets.Dataset.from_dict({"text": pydocs.documents()})
        where = "the pydocs corpus"
    elif kind == "data_files":
        files = [d["path"] for d in source["data_files"] if split is None or d.get("split") == split]
        ds = _load_files(datasets, files, source["format"], cache_dir, source.get("separator"))
        where = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
    else:
        kw = {arg: source[key] for arg, key in (("name", "subset"), ("revision", "revision")) if source.get(key)}
        hub_splits = [None] if split is None and not source.get("files") else [split] if split else list(SPLITS)
        parts = []
        for s in hub_splits:  # a dataset with its own splits names their files; all documents: both splits
            if s is not None:
                kw["data_files"] = source["files"][s]
            try:
                parts.append(datasets.load_dataset(source["name"], split="train", cache_dir=cache_dir,
                                                   num_proc=num_proc if num_proc and num_proc > 1 else None, **kw))
            except Exception as e:  # no network, a wrong --subset or --revision, a broken cache
                raise ValueError(f"cannot load {source['name']} from the Hugging Face hub ({type(e).__name__}: "
                                 f"{str(e)[:300]}); check the network, --subset and --revision, or pass local "
                                 f"files with --data-files") from None
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        where = source["name"] + (f" ({split} split)" if split else "")
    if "text" not in ds.column_names:
        raise ValueError(f"{where}: no 'text' column (columns: {ds.column_names}); "
                         f"the input needs one document per row in a column named 'text'")
    feature = ds.features["text"]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"{where}: the 'text' column holds {feature}, not strings; "
                         f"the input needs one document per row as a string in a column named 'text'")
    ds = ds.select_columns(["text"])
    if source.get("max_docs"):
        ds = ds.select(range(min(int(source["max_docs"]), len(ds))))
    return ds


def drop_null_texts(ds, num_proc=None):
    """-> (ds without the rows whose text is null, how many were dropped). A null is no document;
    turning it into an empty one would add a bare EOT and shift the split."""
    if not ds.data.column("text").null_count:  # whole table (past max_docs too): free, no pass over rows
        return ds, 0
    n = len(ds)
    ds = ds.filter(lambda texts: [t is not None for t in texts], batched=True, input_columns="text",
                   num_proc=num_proc if num_proc and num_proc > 1 and n > 100_000 else None)
    return ds, n - len(ds)


def load_splits(source: dict, val_fraction, seed, cache_dir=None, num_proc=None, progress=True):
    """-> ({'train': Dataset, 'val': Dataset}, how many null texts were dropped): the source's own splits
    (val_fraction None), else a fixed-seed random split of all its documents."""
    if val_fraction is None:
        splits, skipped = {}, 0
        for s in SPLITS:
            splits[s], n = drop_null_texts(load_documents(source, cache_dir, num_proc, progress, split=s), num_proc)
            skipped += n
        return splits, skipped
    ds, skipped = drop_null_texts(load_documents(source, cache_dir, num_proc, progress), num_proc)
    return split_documents(ds, val_fraction, seed), skipped


def split_documents(ds, val_fraction: float, seed: int) -> dict:
    """{'train': Dataset, 'val': Dataset}: a fixed-seed shuffled split of the documents."""
    if len(ds) < 2:
        raise ValueError(f"need at least 2 documents to make a train/val split, got {len(ds)}; "
                         f"pass more documents (or a larger --max-docs)")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return {"train": parts["train"], "val": parts["test"]}


def prepare_command(data_dir, meta=None, **flags) -> str:
    """The `python data/prepare.py ...` command that makes the dataset in data_dir again, as its
    meta.json records it (the dataset, --data-files, --subset / --revision / --val-fraction / --seed
    where they differ from the dataset's defaults, --max-docs, --shard-tokens unless the default, a trained
    tokenizer's --tokenizer, and --out-dir unless data/<dataset>);
    without a meta.json the dataset is the folder's name if that names one, else <dataset> (the one it
    was prepared from).
    flags: more options, e.g. restart=True -> --restart, val_fraction="F" -> --val-fraction F."""
    import shlex
    from data.shards import DEFAULT_SHARD_TOKENS
    data_dir, meta = Path(data_dir), meta or {}
    name = meta.get("dataset")
    if name is None and data_dir.name in DATASETS:  # data/<dataset>, or a folder named after it
        name = data_dir.name
    opts, source, defaults = {}, meta.get("source") or {}, DATASETS.get(name, {})
    if source.get("kind") == "data_files":
        files = [d["path"] for d in source.get("data_files", [])]
        folders, exts = {os.path.dirname(f) for f in files}, {os.path.splitext(f)[1] for f in files}
        if len(files) > 3 and len(folders) == 1 and len(exts) == 1:  # what the user most likely typed
            opts["data_files"] = [shlex.quote(folders.pop() or ".") + "/*" + shlex.quote(exts.pop())]
        else:
            opts["data_files"] = [shlex.quote(f) for f in files]
    for key in ("subset", "revision"):
        if source.get("kind") == "hub" and source.get(key) != defaults.get(key):
            opts[key] = source.get(key)
    for key in ("val_fraction", "seed"):
        if key in meta and key in defaults and meta[key] != defaults[key]:
            opts[key] = meta[key]
    if source.get("max_docs") is not None:
        opts["max_docs"] = source["max_docs"]
    if meta.get("shard_tokens", DEFAULT_SHARD_TOKENS) != DEFAULT_SHARD_TOKENS:
        opts["shard_tokens"] = meta["shard_tokens"]
    tokenizer = meta.get("tokenizer") or {}
    if "file" in tokenizer:  # a trained tokenizer (its copy in the dataset): the rank file it was read from
        opts["tokenizer"] = tokenizer.get("source", "FILE")
    if name is None or data_dir.resolve() != (DATA_ROOT / name).resolve():
        opts["out_dir"] = str(data_dir)
    opts.update(flags)
    words = ["python data/prepare.py", name or "<dataset>"]
    for key, value in opts.items():
        if value is True:
            words.append(f"--{key.replace('_', '-')}")
        elif isinstance(value, list):  # already quoted
            words += [f"--{key.replace('_', '-')}", *value]
        elif value is not None:
            words += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(words)
