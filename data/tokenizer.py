r"""Tokenizers: GPT-2's BPE (offline), and BPE tokenizers trained like nanochat's.

Every tokenizer hcgpt hands out is a ``Tokenizer``: a ``tiktoken.Encoding`` (``encode_ordinary``,
``encode``, ``decode``, ``n_vocab``, ...) plus ``bos_token``, the token that starts every document
in hcgpt's shards (``data/prepare.py``). ``eot_token`` is the same token, so code written for
GPT-2's ``<|endoftext|>`` delimiter works unchanged: GPT-2: ``<|endoftext|>`` = 50256 for both;
a trained tokenizer: nanochat's ``<|bos|>``.

GPT-2
-----
``tiktoken.get_encoding("gpt2")`` downloads its vocabulary on first use, which fails on
compute nodes without internet. This module builds the identical encoding from a local
copy of the GPT-2 rank file (``gpt2.tiktoken``, the same file as tiktoken's ``r50k_base``:
same merges, same split pattern, ``<|endoftext|>`` = 50256), so ``"hello world"`` encodes
to ``[31373, 995]`` exactly as with ``tiktoken.get_encoding("gpt2")``.

Where the rank file is looked up
    ``$HCGPT_TIKTOKEN_FILE`` if set, else ``~/.cache/hcgpt/gpt2.tiktoken``. Its sha256 is
    always checked against ``306cd27f...930`` before use.

Getting the rank file
    On a machine that can reach PyPI::

        python data/tokenizer.py fetch

    downloads the ``openai-whisper`` source distribution with ``pip download`` (about 0.8 MB;
    nothing is installed), extracts only ``whisper/assets/gpt2.tiktoken``, verifies its sha256
    and installs it at the path above.

    On an air-gapped node, copy the file over from any machine that has it (for example
    ``~/.cache/hcgpt/gpt2.tiktoken`` after a fetch there) and install it with::

        python data/tokenizer.py fetch --from /path/to/gpt2.tiktoken

    or point ``HCGPT_TIKTOKEN_FILE`` at the copied file. ``python data/tokenizer.py check``
    prints the path in use and verifies it.

Trained BPE (nanochat's tokenizer)
----------------------------------
::

    python data/tokenizer.py train fineweb_edu --max-chars 2000000000        # nanochat's speedrun
    python data/tokenizer.py train pydocs --vocab-size 4096                 # seconds
    python data/tokenizer.py info data/tokenizers/fineweb_edu-65536.tiktoken

trains a byte-level BPE as nanochat's ``scripts/tok_train.py`` does (karpathy/nanochat at
e1770a3 .. ae0bf52): ``rustbpe`` on the train split of a dataset (``data/prepare.py``'s sources
and split, or ``--data-files``), each document cut to ``--doc-cap`` characters (10,000), until
``--max-chars`` characters (nanochat's default 10 B; its speedrun passes 2 B); nanochat's split
pattern (GPT-4's with ``\p{N}{1,2}``); ``--vocab-size`` (65,536) including nanochat's 9 special
tokens, which take the last ids (``<|bos|>`` = vocab - 9). Output: ``FILE`` (tiktoken's rank
format: ``tiktoken.load.load_tiktoken_bpe`` reads it) and ``FILE`` with ``.json`` (the pattern,
the special tokens, the rank file's sha256, the data it was trained on). ``load_bpe(FILE)`` reads
the pair back and checks the one against the other.

Public API: ``Tokenizer``, ``get_encoding()``, ``EOT``, ``VOCAB_SIZE``, ``NAME``, ``rank_file_path()``,
``fetch_rank_file()``, ``install_rank_file()``, ``token_byte_lengths()``, ``train_bpe()``, ``save_bpe()``,
``load_bpe()``, ``record()``, ``from_record()``, ``same_tokenizer()``, ``for_data()``, ``checkpoint_record()``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import tiktoken

NAME = "gpt2"
EOT = 50256
VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"
RANK_FILE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENV_VAR = "HCGPT_TIKTOKEN_FILE"
FETCH_COMMAND = "python data/tokenizer.py fetch"
# The sdist that ships the rank file, and the member inside it.
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"

try:  # the exact pattern tiktoken uses for gpt2 / r50k_base
    from tiktoken_ext.openai_public import r50k_pat_str as PAT_STR
except Exception:  # pragma: no cover - older/newer tiktoken layouts
    PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer(tiktoken.Encoding):
    """A tiktoken.Encoding that also names the token starting every document (``bos_token``).
    ``eot_token`` returns the same token: hcgpt's shards put it before every document, and the
    evals and samplers use it as the document delimiter."""

    def __init__(self, name, pat_str, mergeable_ranks, special_tokens, bos_token, explicit_n_vocab=None):
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens,
                         explicit_n_vocab=explicit_n_vocab)
        if bos_token not in special_tokens.values():
            raise ValueError(f"tokenizer {name}: bos_token {bos_token} is not one of its special tokens")
        self.bos_token = int(bos_token)

    @property
    def eot_token(self) -> int:
        return self.bos_token

    def __getstate__(self):  # pickled by value (tiktoken's own would drop bos_token)
        return {"name": self.name, "pat_str": self._pat_str, "mergeable_ranks": self._mergeable_ranks,
                "special_tokens": self._special_tokens, "bos_token": self.bos_token}

    def __setstate__(self, state):
        self.__init__(**state)


def default_rank_file() -> Path:
    return Path.home() / ".cache" / "hcgpt" / "gpt2.tiktoken"


def rank_file_path() -> Path:
    """The rank file in use: ``$HCGPT_TIKTOKEN_FILE`` or ``~/.cache/hcgpt/gpt2.tiktoken``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else default_rank_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


REFETCH = (f"Delete it and run `{FETCH_COMMAND}` (or `{FETCH_COMMAND} --from FILE` with a good copy)")
FROM_FIX = (f"Pass a good copy of gpt2.tiktoken (sha256 {RANK_FILE_SHA256[:12]}...) or of the {WHISPER_SDIST} "
            f"sdist to --from, or run `{FETCH_COMMAND}` without --from where PyPI is reachable")


def read_verified(path: str | os.PathLike, fix: str = REFETCH) -> bytes:
    """Read a rank file and check its sha256; ValueError naming the file and ``fix`` if it cannot be
    read or does not match (random bytes, a truncated copy, another file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the GPT-2 rank file ({e.strerror or e}). {fix}.") from None
    digest = _sha256(data)
    if digest != RANK_FILE_SHA256:
        raise ValueError(
            f"{path}: sha256 {digest} does not match the GPT-2 rank file "
            f"({RANK_FILE_SHA256}); the file is corrupt, truncated or not gpt2.tiktoken. {fix}."
        )
    return data


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except Exception as e:  # pragma: no cover - excluded by the sha256 check
            raise ValueError(f"{path}: cannot parse line {line!r}") from e
    return ranks


@functools.lru_cache(maxsize=4)
def _load_encoding(path: str) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"GPT-2 tokenizer rank file not found at {p}. Fetch it (from PyPI, ~1 MB) with "
            f"`{FETCH_COMMAND}`; on a node without network copy gpt2.tiktoken from another machine "
            f"and run `{FETCH_COMMAND} --from /path/to/gpt2.tiktoken`, or set {ENV_VAR}=/path/to/gpt2.tiktoken."
        )
    ranks = _parse_ranks(read_verified(p), p)
    enc = Tokenizer(NAME, PAT_STR, ranks, {ENDOFTEXT: EOT}, bos_token=EOT, explicit_n_vocab=VOCAB_SIZE)
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT
    return enc


def get_encoding() -> Tokenizer:
    """The GPT-2 encoding (cached), built offline from the verified local rank file; its
    ``bos_token`` and ``eot_token`` are ``<|endoftext|>`` (50256)."""
    return _load_encoding(str(rank_file_path()))


def token_byte_lengths(enc: tiktoken.Encoding | None = None) -> np.ndarray:
    """int64 array (n_vocab,): UTF-8 byte length of each token's decoding, 0 for special tokens."""
    enc = enc or get_encoding()
    special = set(enc._special_tokens.values())
    out = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i not in special:
            out[i] = len(enc.decode_single_token_bytes(i))
    return out


def install_rank_file(src: str | os.PathLike, dest: str | os.PathLike | None = None,
                      fix: str = FROM_FIX) -> Path:
    """Verify ``src`` and copy it atomically to ``dest`` (default: ``rank_file_path()``); a bad
    ``src`` leaves ``dest`` as it was."""
    data = read_verified(src, fix)
    dest = Path(dest) if dest is not None else rank_file_path()
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot install the rank file at {dest} ({e.strerror or e}); pass a writable --dest "
                         f"(and point {ENV_VAR} at it)") from None
    _load_encoding.cache_clear()
    return dest


def extract_from_sdist(sdist: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Extract only ``whisper/assets/gpt2.tiktoken`` from an openai-whisper sdist."""
    sdist = Path(sdist)
    try:
        with tarfile.open(sdist, "r:*") as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(WHISPER_MEMBER_SUFFIX)]
            if not members:
                raise ValueError(f"{sdist}: no {WHISPER_MEMBER_SUFFIX} inside this archive. {FROM_FIX}.")
            data = tf.extractfile(members[0]).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # truncated or not a .tar.gz
        raise ValueError(f"{sdist}: not a readable .tar.gz ({type(e).__name__}: {e}). {FROM_FIX}.") from None
    if _sha256(data) != RANK_FILE_SHA256:
        raise ValueError(f"{sdist}: its {WHISPER_MEMBER_SUFFIX} is not the GPT-2 rank file (sha256 mismatch). "
                         f"{FROM_FIX}.")
    out = Path(out_dir) / "gpt2.tiktoken"
    out.write_bytes(data)
    return out


def _pip_download(spec: str, dest_dir: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", dest_dir, spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr[-2000:]}\n"
            f"Without network, copy gpt2.tiktoken from another machine and run "
            f"`{FETCH_COMMAND} --from /path/to/gpt2.tiktoken`."
        )
    found = sorted(Path(dest_dir).glob("openai[-_]whisper-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download of {spec} left no openai-whisper sdist in {dest_dir}")
    return found[0]


def fetch_rank_file(dest: str | os.PathLike | None = None, src: str | os.PathLike | None = None,
                    spec: str = WHISPER_SDIST, downloader=_pip_download) -> Path:
    """Install the verified rank file at ``dest`` (default ``rank_file_path()``).

    ``src``: a local ``gpt2.tiktoken`` or an openai-whisper ``.tar.gz`` (no network used).
    Otherwise the sdist is fetched from PyPI with pip.
    """
    with tempfile.TemporaryDirectory(prefix="hcgpt-tok-") as tmp:
        if src is not None:
            src = Path(src)
            if not src.is_file():
                raise FileNotFoundError(f"--from {src}: no such file. {FROM_FIX}.")
            if src.name.endswith((".tar.gz", ".tgz")):
                src = extract_from_sdist(src, tmp)
        else:
            src = extract_from_sdist(downloader(spec, tmp), tmp)
        return install_rank_file(src, dest)


# ----------------------------------------------------------------------------- trained BPE (nanochat's)

# nanochat/tokenizer.py (e1770a3 .. ae0bf52): GPT-4's split pattern with \p{N}{1,2} instead of \p{N}{1,3}
NANOCHAT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                    r"""\s*[\r\n]|\s+(?!\S)|\s+""")
NANOCHAT_SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
BOS = "<|bos|>"
NANOCHAT_VOCAB = 65_536  # scripts/tok_train.py --vocab_size until 2026-01-07 (ccf4b7f: 32,768)
DOC_CAP = 10_000  # --doc_cap: characters kept of each document
MAX_CHARS = 10_000_000_000  # --max_chars default; nanochat's speedrun.sh passes 2,000,000,000
UINT16_VOCAB = 65_536  # the most token ids uint16 shards hold
BPE_FORMAT = "hcgpt-bpe/1"
TRAIN_COMMAND = "python data/tokenizer.py train"


def capped_texts(texts, doc_cap=DOC_CAP, max_chars=MAX_CHARS, stats=None):
    """nanochat's tok_train text iterator: each text cut to doc_cap characters, stopping after the
    text that takes the total past max_chars. stats (a dict) receives "documents" and "chars"."""
    stats = stats if stats is not None else {}
    stats.update(documents=0, chars=0)
    for text in texts:
        text = text[:doc_cap]
        stats["documents"] += 1
        stats["chars"] += len(text)
        yield text
        if stats["chars"] > max_chars:
            return


def train_bpe(texts, vocab_size=NANOCHAT_VOCAB, pattern=NANOCHAT_PATTERN, specials=NANOCHAT_SPECIALS,
              name="bpe") -> Tokenizer:
    """Train a byte-level BPE with rustbpe on an iterable of texts, as nanochat's
    RustBPETokenizer.train_from_iterator: vocab_size - len(specials) byte-pair ranks, then the
    special tokens; bos_token = specials[0]."""
    import rustbpe  # only training needs it

    n_ranks = vocab_size - len(specials)
    if n_ranks < 256:
        raise ValueError(f"--vocab-size {vocab_size} leaves {n_ranks} byte-pair tokens; it must be at least "
                         f"256 + {len(specials)} special tokens = {256 + len(specials)}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_ranks, pattern=pattern)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    if len(ranks) != n_ranks:  # rustbpe stops when no pair occurs twice: too little text
        raise ValueError(f"the training text yields only {len(ranks)} byte-pair tokens, not {n_ranks}: use more text "
                         f"(--max-chars, more documents) or a smaller --vocab-size")
    special_tokens = {s: n_ranks + i for i, s in enumerate(specials)}
    return Tokenizer(name, trainer.get_pattern(), ranks, special_tokens, bos_token=special_tokens[specials[0]])


def rank_file_bytes(enc: tiktoken.Encoding) -> bytes:
    """The encoding's byte-pair ranks in tiktoken's rank-file format (base64 token, rank; by rank)."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for tok, rank in ranks)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_bpe(enc: Tokenizer, path, info: dict | None = None, replace=False) -> dict:
    """Write enc's rank file to path and its metadata to path with .json -> the metadata.
    An existing file is an error unless overwrite (each file is written to a temporary name and
    renamed)."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"--out {path}: name the rank file (e.g. .tiktoken); its metadata goes to a .json beside it")
    for p in (path, _sidecar(path)):
        if p.exists() and not replace:
            raise ValueError(f"{p} already exists; pass another --out, or --force to replace it")
    data = rank_file_bytes(enc)
    meta = {"format": BPE_FORMAT, "name": enc.name, "rank_file": path.name, "rank_file_sha256": _sha256(data),
            "n_vocab": enc.n_vocab, "pattern": enc._pat_str, "special_tokens": dict(enc._special_tokens),
            "bos": enc.bos_token, **(info or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    for p, content in ((path, data), (_sidecar(path), (json.dumps(meta, indent=1) + "\n").encode())):
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, p)
    return meta


def _bpe_fix(path) -> str:
    return (f"use the .tiktoken and .json pair `{TRAIN_COMMAND}` wrote (copy both files), or train it again with "
            f"`{TRAIN_COMMAND} DATASET --out {path}`")


def _parse_bpe_ranks(data: bytes, where) -> dict[bytes, int]:
    ranks = {}
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except Exception:
        raise ValueError(f"{where}: not a tiktoken rank file (bad line {line[:60]!r})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: the ranks are not 0 .. {len(ranks) - 1} without gaps or repeats")
    return ranks


def from_record(rec: dict, data: bytes, where="tokenizer") -> Tokenizer:
    """The Tokenizer a record (``record()``: meta.json's or a checkpoint's "tokenizer") describes,
    from its rank-file bytes; ValueError if the bytes are not the recorded ones."""
    if _sha256(data) != rec["rank_file_sha256"]:
        raise ValueError(f"{where}: sha256 {_sha256(data)[:16]}... of the rank file does not match the recorded "
                         f"{rec['rank_file_sha256'][:16]}...: it is another tokenizer's or damaged")
    ranks = _parse_bpe_ranks(data, where)
    specials = {str(k): int(v) for k, v in rec["special_tokens"].items()}
    enc = Tokenizer(rec["name"], rec["pattern"], ranks, specials, bos_token=int(rec["bos"]))
    if enc.n_vocab != rec["n_vocab"]:
        raise ValueError(f"{where}: {enc.n_vocab} tokens, but the record says {rec['n_vocab']}")
    return enc


def load_bpe(path) -> Tokenizer:
    """A trained tokenizer from its rank file and the .json beside it (save_bpe), checked against
    each other. A missing, damaged or mismatched file is a ValueError naming it and the fix."""
    path = Path(path)
    side = _sidecar(path)
    for p in (path, side):
        if not p.is_file():
            raise ValueError(f"tokenizer file {p} not found; {_bpe_fix(path)}")
    try:
        meta = json.loads(side.read_text())
        if meta.get("format") != BPE_FORMAT:
            raise ValueError
        missing = [k for k in ("name", "rank_file_sha256", "n_vocab", "pattern", "special_tokens", "bos")
                   if k not in meta]
        if missing:
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"{side}: not the metadata of a tokenizer trained by data/tokenizer.py; {_bpe_fix(path)}") \
            from None
    try:
        return from_record(meta, path.read_bytes(), where=str(path))
    except ValueError as e:
        raise ValueError(f"{e}; {_bpe_fix(path)}") from None


GPT2_RECORD = {"name": NAME, "encoding": "tiktoken gpt2 (r50k_base ranks)", "rank_file_sha256": RANK_FILE_SHA256,
               "eot": EOT, "bos": EOT, "n_vocab": VOCAB_SIZE}


def record(enc: Tokenizer, rank_file=None) -> dict:
    """What identifies a tokenizer (meta.json's and a checkpoint's "tokenizer"): enough, with its
    rank file's bytes, to rebuild it (from_record)."""
    if enc.name == NAME and enc._pat_str == PAT_STR and enc.n_vocab == VOCAB_SIZE:
        return dict(GPT2_RECORD)
    rec = {"name": enc.name, "rank_file_sha256": _sha256(rank_file_bytes(enc)), "n_vocab": enc.n_vocab,
           "pattern": enc._pat_str, "special_tokens": dict(enc._special_tokens), "bos": enc.bos_token}
    if rank_file is not None:
        rec["source"] = str(Path(rank_file).resolve())
    return rec


def is_gpt2(rec: dict | None) -> bool:
    """A record of GPT-2's tokenizer; None (data and checkpoints from before records named it) is GPT-2's."""
    return rec is None or (rec.get("name") == NAME and rec.get("rank_file_sha256") == RANK_FILE_SHA256)


def same_tokenizer(a: dict | None, b: dict | None) -> bool:
    """Do two records describe the same tokenizer (ranks, pattern, special tokens, BOS)?"""
    if is_gpt2(a) or is_gpt2(b):
        return is_gpt2(a) and is_gpt2(b)
    keys = ("rank_file_sha256", "pattern", "special_tokens", "bos")
    return all(a.get(k) == b.get(k) for k in keys)


def describe(rec: dict | None) -> str:
    if is_gpt2(rec):
        return "GPT-2's BPE (50,257 tokens)"
    return f"{rec['name']} ({rec['n_vocab']:,} tokens, rank file sha256 {rec['rank_file_sha256'][:12]}...)"


DATA_RANK_FILE = "tokenizer.tiktoken"  # a prepared dataset's copy of its trained tokenizer


def _data_rank_bytes(data_dir, rec: dict) -> bytes:
    path = Path(data_dir) / rec.get("file", DATA_RANK_FILE)
    try:
        return path.read_bytes()
    except OSError:
        raise ValueError(f"{path}: the dataset's tokenizer file is missing (meta.json names {describe(rec)}); "
                         f"prepare the dataset again with `python data/prepare.py ... --tokenizer FILE --restart`") \
            from None


def for_data(data_dir, meta: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was tokenized with (its meta.json's "tokenizer"); a
    missing or mismatched copy of a trained one is a ValueError naming the file and the fix."""
    rec = meta.get("tokenizer")
    if is_gpt2(rec):
        return get_encoding()
    try:
        return from_record(rec, _data_rank_bytes(data_dir, rec), where=str(Path(data_dir) / rec.get("file", "")))
    except ValueError as e:
        raise ValueError(f"{e}; prepare the dataset again with `python data/prepare.py ... --tokenizer FILE "
                         f"--restart`") from None


def checkpoint_record(data_dir, meta: dict) -> dict:
    """The tokenizer a checkpoint carries: its record, and for a trained tokenizer also its rank
    file (about 1 MB at 65,536 tokens), so the checkpoint decodes and evaluates anywhere."""
    rec = dict(meta.get("tokenizer") or GPT2_RECORD)
    if not is_gpt2(rec):
        for_data(data_dir, meta)  # verified before it is written anywhere
        rec["rank_file"] = _data_rank_bytes(data_dir, rec)
    return rec


def _train_main(args) -> int:
    from data import sources  # the documents and the train/val split

    cfg = sources.DATASETS[args.dataset]
    val_fraction = cfg["val_fraction"] if args.val_fraction is None else args.val_fraction
    seed = cfg["seed"] if args.seed is None else args.seed
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "tokenizers"
                                           / f"{args.dataset}-{args.vocab_size}.tiktoken")
    if args.vocab_size > UINT16_VOCAB:
        print(f"note: --vocab-size {args.vocab_size:,} > {UINT16_VOCAB:,}: data/prepare.py's uint16 shards cannot "
              f"hold it", file=sys.stderr)
    for p in (out, _sidecar(out)):  # before minutes of work
        if p.exists() and not args.force:
            raise ValueError(f"{p} already exists; pass another --out, or --force to replace it")
    source = sources.source_spec(args.dataset, args.data_files, args.subset, args.revision)
    ds = sources.load_documents(source, progress=False)
    ds, _ = sources.drop_null_texts(ds)
    train = sources.split_documents(ds, val_fraction, seed)["train"]
    stats = {}
    texts = (t for batch in train.iter(batch_size=1024) for t in batch["text"])
    t0 = time.time()
    enc = train_bpe(capped_texts(texts, args.doc_cap, args.max_chars, stats), args.vocab_size, name=out.stem)
    dt = time.time() - t0
    info = {"trainer": f"rustbpe {_version('rustbpe')}", "recipe": "nanochat scripts/tok_train.py (e1770a3 .. ae0bf52)",
            "trained_on": {"dataset": args.dataset, "source": source, "split": "train", "val_fraction": val_fraction,
                           "seed": seed, "doc_cap": args.doc_cap, "max_chars": args.max_chars, **stats},
            "train_seconds": round(dt, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta = save_bpe(enc, out, info, replace=args.force)
    print(f"trained {enc.n_vocab:,} tokens on {stats['documents']:,} documents ({stats['chars']:,} characters) of "
          f"{args.dataset} in {dt:.1f}s -> {out} (sha256 {meta['rank_file_sha256'][:12]}...) and {_sidecar(out)}")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def _info_main(args) -> int:
    enc = load_bpe(args.file)
    meta = json.loads(_sidecar(Path(args.file)).read_text())
    tb = token_byte_lengths(enc)
    trained = meta.get("trained_on", {})
    print(f"{args.file}: {enc.n_vocab:,} tokens ({enc.n_vocab - len(enc._special_tokens):,} byte-pair + "
          f"{len(enc._special_tokens)} special), bos {enc.bos_token}, sha256 {meta['rank_file_sha256'][:12]}... ok")
    print(f"  trained on {trained.get('documents', '?'):,} documents, {trained.get('chars', '?'):,} characters of "
          f"{trained.get('dataset', '?')} ({meta.get('trainer', '?')})")
    print(f"  bytes per byte-pair token: mean {tb[tb > 0].mean():.2f}, max {tb.max()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPT-2's rank file offline (fetch, check); BPE tokenizers trained like "
                                             "nanochat's (train, info).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="install gpt2.tiktoken (from PyPI, or --from a local copy)")
    f.add_argument("--from", dest="src", default=None,
                   help="local gpt2.tiktoken (or openai-whisper .tar.gz) to install; no network")
    f.add_argument("--dest", default=None, help=f"install here (default: ${ENV_VAR} or {default_rank_file()})")
    f.add_argument("--force", action="store_true", help="re-fetch even if a verified file is present")
    sub.add_parser("check", help="verify the rank file in use and print its path")
    t = sub.add_parser("train", help="train a BPE tokenizer as nanochat's tok_train.py (rustbpe)")
    t.add_argument("dataset", help="a data/prepare.py dataset: its train split is the training text")
    t.add_argument("--data-files", nargs="+", default=None, metavar="PATH",
                   help="local parquet/json(l)/txt files with a 'text' column, instead of the hub download")
    t.add_argument("--subset", default=None, help="hub config (as data/prepare.py; default: the dataset's)")
    t.add_argument("--revision", default=None, help="hub revision (as data/prepare.py; default: the dataset's)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="the dataset's val fraction (left out of training; default: the dataset's)")
    t.add_argument("--seed", type=int, default=None, help="the dataset's split seed (default: the dataset's)")
    t.add_argument("--vocab-size", type=int_at_least(256 + len(NANOCHAT_SPECIALS)), default=NANOCHAT_VOCAB,
                   help=f"tokens including the {len(NANOCHAT_SPECIALS)} special ones "
                        f"(default: nanochat's {NANOCHAT_VOCAB:,})")
    t.add_argument("--doc-cap", type=int_at_least(1), default=DOC_CAP,
                   help=f"characters kept of each document (default: {DOC_CAP:,})")
    t.add_argument("--max-chars", type=int_at_least(1), default=MAX_CHARS,
                   help=f"stop after this many characters (default: nanochat's, {MAX_CHARS:,}; its speedrun "
                        f"passes 2000000000)")
    t.add_argument("--out", default=None, help="rank file to write (default: data/tokenizers/DATASET-VOCAB.tiktoken); "
                                               "its metadata goes beside it as .json")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    i = sub.add_parser("info", help="check a trained tokenizer's files and print what it is")
    i.add_argument("file", help="the .tiktoken rank file (its .json beside it)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, RuntimeError) as e:  # the messages name the file and the fix
        print(f"tokenizer.py: error: {e}", file=sys.stderr)
        return 1


def int_at_least(min_value):
    """argparse type of the data tools: an integer >= min_value, also as 2e9 (a count of 0 or less would
    silently mean something else; 2.5e0 is no integer)."""
    def parse(text):
        try:
            v = float(text) if "e" in text.lower() else int(text)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v == int(v)):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        v = int(v)
        if v < min_value:
            raise argparse.ArgumentTypeError(f"must be >= {min_value}, got {v}")
        return v
    return parse


def _run(args) -> int:
    if args.cmd == "train":
        return _train_main(args)
    if args.cmd == "info":
        return _info_main(args)
    if args.cmd == "fetch":
        dest = Path(args.dest) if args.dest else rank_file_path()
        if args.src is None and not args.force and dest.is_file():
            try:
                read_verified(dest)
                print(f"{dest}: already present, sha256 ok")
                return 0
            except ValueError:
                pass
        path = fetch_rank_file(dest=dest, src=args.src)
        print(f"installed {path} (sha256 {RANK_FILE_SHA256[:12]}... ok)")
        return 0
    if args.cmd == "check":
        enc = get_encoding()
        ids = enc.encode_ordinary("hello world")
        print(f"{rank_file_path()}: sha256 ok, n_vocab={enc.n_vocab}, 'hello world' -> {ids}")
        if ids != [31373, 995]:  # the file is right: tiktoken itself disagrees
            print("tokenizer.py: error: 'hello world' should encode to [31373, 995]; check the tiktoken "
                  "version (requirements.txt)", file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import data.x` from a script
    from data import tokenizer as _module  # one copy of the module (its Tokenizer class) for the whole run

    sys.exit(_module.main())
