r"""Tokenizers: GPT-2's BPE (offline), and BPE tokenizers trained like nanochat's.

Every tokenizer hcgpt hands out is a ``Tokenizer``: a ``tiktoken.Encoding`` that also names its
``bos_token`` (GPT-2: ``<|endoftext|>`` = 50256; a trained tokenizer: nanochat's ``<|bos|>``).

GPT-2
-----
``tiktoken.get_encoding("gpt2")`` downloads its vocabulary on first use, which fails on compute
nodes without internet. This module builds the identical encoding (``"hello world"`` ->
``[31373, 995]``) from a local copy of the GPT-2 rank file ``gpt2.tiktoken`` (tiktoken's
``r50k_base``), read from ``$HCGPT_TIKTOKEN_FILE`` or ``~/.cache/hcgpt/gpt2.tiktoken`` and always
checked against its sha256. ``python data/tokenizer.py fetch`` installs it from the
``openai-whisper`` sdist on PyPI (``pip download``, about 0.8 MB, nothing installed); on an
air-gapped node copy the file from a machine that has it and run
``python data/tokenizer.py fetch --from /path/to/gpt2.tiktoken``. ``python data/tokenizer.py check``
verifies the file in use.

Trained BPE (nanochat's tokenizer)
----------------------------------
::

    python data/tokenizer.py train fineweb_edu --max-chars 2000000000        # nanochat's speedrun
    python data/tokenizer.py train pydocs --vocab-size 4096                 # seconds
    python data/tokenizer.py info data/tokenizers/fineweb_edu-65536.tiktoken

trains a byte-level BPE as nanochat's ``scripts/tok_train.py`` does (karpathy/nanochat at
e1770a3 .. ae0bf52): ``rustbpe`` on the train split of a dataset (``data/prepare.py``'s sources
and split, or ``--data-files``), each document cut to ``--doc-cap`` characters, until
``--max-chars`` characters; nanochat's split pattern (GPT-4's with ``\p{N}{1,2}``); ``--vocab-size``
includes nanochat's 9 special tokens, which take the last ids (``<|bos|>`` = vocab - 9). Output:
``FILE.tiktoken`` (tiktoken's rank format) and ``FILE.json`` (the pattern, the special tokens, the rank
file's sha256, the data it was trained on); ``load_bpe`` reads the pair back and checks one against the other.
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

# tiktoken's pattern of gpt2 / r50k_base (tiktoken_ext.openai_public.r50k_pat_str)
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
        raise ValueError(f"{path}: sha256 {digest} does not match the GPT-2 rank file ({RANK_FILE_SHA256}); "
                         f"the file is corrupt, truncated or not gpt2.tiktoken. {fix}.")
    return data


@functools.lru_cache(maxsize=4)
def _load_encoding(path: str) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GPT-2 tokenizer rank file not found at {p}. Fetch it (from PyPI, ~1 MB) with "
                                f"`{FETCH_COMMAND}`; on a node without network copy gpt2.tiktoken from another machine "
                                f"and run `{FETCH_COMMAND} --from /path/to/gpt2.tiktoken`, or set "
                                f"{ENV_VAR}=/path/to/gpt2.tiktoken.")
    ranks = _parse_ranks(read_verified(p), p)
    return Tokenizer(NAME, PAT_STR, ranks, {ENDOFTEXT: EOT}, bos_token=EOT, explicit_n_vocab=VOCAB_SIZE)


def get_encoding() -> Tokenizer:
    """The GPT-2 encoding (cached), built offline from the verified local rank file; its
    ``bos_token`` and ``eot_token`` are ``<|endoftext|>`` (50256)."""
    return _load_encoding(str(rank_file_path()))


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """int64 array (n_vocab,): UTF-8 byte length of each token's decoding, 0 for special tokens."""
    special = set(enc._special_tokens.values())
    out = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i not in special:
            out[i] = len(enc.decode_single_token_bytes(i))
    return out


def install_rank_file(src: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Verify ``src`` and copy it atomically to ``dest`` (default: ``rank_file_path()``); a bad
    ``src`` leaves ``dest`` as it was."""
    data = read_verified(src, FROM_FIX)
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
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr[-2000:]}\nWithout "
                           f"network, copy gpt2.tiktoken from another machine and run "
                           f"`{FETCH_COMMAND} --from /path/to/gpt2.tiktoken`.")
    found = sorted(Path(dest_dir).glob("openai[-_]whisper-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download of {spec} left no openai-whisper sdist in {dest_dir}")
    return found[0]


def fetch_rank_file(dest: str | os.PathLike | None = None, src: str | os.PathLike | None = None,
                    downloader=_pip_download) -> Path:
    """Install the verified rank file at ``dest`` (default ``rank_file_path()``) from ``src``, a local
    ``gpt2.tiktoken`` or openai-whisper ``.tar.gz`` (no network used), else from the sdist on PyPI."""
    with tempfile.TemporaryDirectory(prefix="hcgpt-tok-") as tmp:
        if src is not None:
            src = Path(src)
            if not src.is_file():
                raise FileNotFoundError(f"--from {src}: no such file. {FROM_FIX}.")
            if src.name.endswith((".tar.gz", ".tgz")):
                src = extract_from_sdist(src, tmp)
        else:
            src = extract_from_sdist(downloader(WHISPER_SDIST, tmp), tmp)
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


def train_bpe(texts, vocab_size=NANOCHAT_VOCAB, name="bpe") -> Tokenizer:
    """Train a byte-level BPE with rustbpe on an iterable of texts, as nanochat's
    RustBPETokenizer.train_from_iterator: vocab_size - 9 byte-pair ranks (at least 256: --vocab-size's
    minimum), then nanochat's special tokens; bos_token = <|bos|>."""
    import rustbpe  # only training needs it

    specials = NANOCHAT_SPECIALS
    n_ranks = vocab_size - len(specials)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_ranks, pattern=NANOCHAT_PATTERN)
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


def _is_gpt2_rank_file(path) -> bool:
    try:
        return _sha256(Path(path).read_bytes()) == RANK_FILE_SHA256
    except OSError:  # missing, a folder, unreadable
        return False


def _check_out(path: Path, replace: bool, name: str) -> None:
    """Refuse, before the training, an --out where a trained tokenizer must not go: a folder (name: the file to
    suggest in it), a name without .tiktoken (its .json could be another file's), GPT-2's rank file, files
    `train` did not write, a folder that cannot be written; an existing tokenizer unless replace."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; pass a file in it: --out {path / name}")
    if path.suffix != ".tiktoken":
        raise ValueError(f"--out {path}: a tokenizer's rank file ends in .tiktoken (its metadata goes beside it as "
                         f".json); pass --out {path.with_suffix('.tiktoken')}")
    if path.resolve() == rank_file_path().resolve() or _is_gpt2_rank_file(path):
        raise ValueError(f"--out {path} is GPT-2's rank file, or where hcgpt reads it from; pass another --out")
    existing = [p for p in (path, _sidecar(path)) if p.exists()]
    if existing:
        try:
            load_bpe(path)
        except ValueError:
            raise ValueError(f"{existing[0]} exists and is not part of a tokenizer `{TRAIN_COMMAND}` wrote; pass "
                             f"another --out (--force replaces only such a tokenizer)") from None
        if not replace:
            raise ValueError(f"{path} already exists (a tokenizer `{TRAIN_COMMAND}` wrote); pass another --out, or "
                             f"--force to replace it")
    folder = next(p for p in path.resolve().parents if p.exists())  # save_bpe creates the folders below it
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise ValueError(f"--out {path}: cannot write in {folder}; pass an --out in a folder you can write to")


def save_bpe(enc: Tokenizer, path, info: dict | None = None, replace=False) -> dict:
    """Write enc's rank file to path and its metadata to path with .json -> the metadata. Refused as
    _check_out refuses; each file is written to a temporary name and renamed."""
    path = Path(path)
    _check_out(path, replace, f"{enc.name}.tiktoken")
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


BPE_FIX = (f"pass a .tiktoken file `{TRAIN_COMMAND}` wrote, with the .json written beside it, or train one with "
           f"`{TRAIN_COMMAND} DATASET` (it prints where it wrote them)")


def _parse_ranks(data: bytes, where) -> dict[bytes, int]:
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
    ranks = _parse_ranks(data, where)
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
    if not side.is_file() and _is_gpt2_rank_file(path):  # `prepare.py --tokenizer gpt2.tiktoken`
        install = "" if _is_gpt2_rank_file(rank_file_path()) else \
            f", after installing this copy with `{FETCH_COMMAND} --from {path}`"
        raise ValueError(f"{path} is GPT-2's rank file, not a tokenizer trained by `{TRAIN_COMMAND}`: for GPT-2's BPE "
                         f"leave --tokenizer out (data/prepare.py's default){install}")
    for p in (path, side):
        if not p.is_file():
            raise ValueError(f"tokenizer file {p} {'is a folder' if p.is_dir() else 'not found'}; {BPE_FIX}")
    try:
        meta = json.loads(side.read_text())
        ok = meta.get("format") == BPE_FORMAT and all(
            k in meta for k in ("name", "rank_file_sha256", "n_vocab", "pattern", "special_tokens", "bos"))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{side}: not the metadata of a tokenizer trained by data/tokenizer.py; {BPE_FIX}")
    try:
        return from_record(meta, path.read_bytes(), where=str(path))
    except ValueError as e:
        raise ValueError(f"{e}; {BPE_FIX}") from None


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
    return all(a.get(k) == b.get(k) for k in ("rank_file_sha256", "pattern", "special_tokens", "bos"))


def describe(rec: dict | None) -> str:
    if is_gpt2(rec):
        return "GPT-2's BPE (50,257 tokens)"
    return f"{rec['name']} ({rec['n_vocab']:,} tokens, rank file sha256 {rec['rank_file_sha256'][:12]}...)"


DATA_RANK_FILE = "tokenizer.tiktoken"  # a prepared dataset's copy of its trained tokenizer


def for_data(data_dir, meta: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was tokenized with (its meta.json's "tokenizer"); a
    missing or mismatched copy of a trained one is a ValueError naming the file and the fix."""
    rec = meta.get("tokenizer")
    if is_gpt2(rec):
        return get_encoding()
    path = Path(data_dir) / rec.get("file", DATA_RANK_FILE)
    try:
        return from_record(rec, path.read_bytes(), where=str(path))
    except OSError as e:
        cause = f"{path}: cannot read the dataset's copy of its tokenizer, {describe(rec)} ({e.strerror})"
    except ValueError as e:
        cause = e
    from data.sources import prepare_command
    raise ValueError(f"{cause}; prepare the dataset again with `{prepare_command(data_dir, meta, restart=True)}`")


def checkpoint_record(data_dir, meta: dict) -> dict:
    """The tokenizer a checkpoint carries: its record, and for a trained tokenizer also its rank
    file (about 1 MB at 65,536 tokens), so the checkpoint decodes and evaluates anywhere."""
    rec = dict(meta.get("tokenizer") or GPT2_RECORD)
    if not is_gpt2(rec):
        for_data(data_dir, meta)  # verified before it is written anywhere
        rec["rank_file"] = (Path(data_dir) / rec.get("file", DATA_RANK_FILE)).read_bytes()
    return rec


def _train_main(args) -> int:
    from importlib.metadata import version
    from data import sources  # the documents and the train/val split

    cfg = sources.DATASETS[args.dataset]
    val_fraction = cfg["val_fraction"] if args.val_fraction is None else args.val_fraction
    seed = cfg["seed"] if args.seed is None else args.seed
    name = f"{args.dataset}-{args.vocab_size}.tiktoken"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "tokenizers" / name
    if args.vocab_size > UINT16_VOCAB:
        print(f"note: --vocab-size {args.vocab_size:,} > {UINT16_VOCAB:,}: data/prepare.py's uint16 shards cannot "
              f"hold it", file=sys.stderr)
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    _check_out(out, args.force, name)  # before minutes of work
    # val_fraction None: the dataset's own train split (its validation documents are left out too)
    source = sources.source_spec(args.dataset, args.data_files, args.subset, args.revision,
                                 own_split=val_fraction is None)
    train = sources.load_splits(source, val_fraction, seed, progress=False)[0]["train"]
    stats = {}
    texts = (t for batch in train.iter(batch_size=1024) for t in batch["text"])
    t0 = time.time()
    enc = train_bpe(capped_texts(texts, args.doc_cap, args.max_chars, stats), args.vocab_size, name=out.stem)
    dt = time.time() - t0
    info = {"trainer": f"rustbpe {version('rustbpe')}", "recipe": "nanochat scripts/tok_train.py (e1770a3 .. ae0bf52)",
            "trained_on": {"dataset": args.dataset, "source": source, "split": "train", "val_fraction": val_fraction,
                           "seed": seed, "doc_cap": args.doc_cap, "max_chars": args.max_chars, **stats},
            "train_seconds": round(dt, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta = save_bpe(enc, out, info, replace=args.force)
    print(f"trained {enc.n_vocab:,} tokens on {stats['documents']:,} documents ({stats['chars']:,} characters) of "
          f"{args.dataset} in {dt:.1f}s -> {out} (sha256 {meta['rank_file_sha256'][:12]}...) and {_sidecar(out)}")
    return 0


def _info_main(args) -> int:
    enc = load_bpe(args.file)
    meta = json.loads(_sidecar(Path(args.file)).read_text())
    tb = token_byte_lengths(enc)
    trained = meta.get("trained_on", {})
    print(f"{args.file}: {enc.n_vocab:,} tokens ({enc.n_vocab - len(enc._special_tokens):,} byte-pair + "
          f"{len(enc._special_tokens)} special), bos {enc.bos_token}, sha256 {meta['rank_file_sha256'][:12]}... ok")
    if trained:  # save_bpe's callers other than `train` may record none
        print(f"  trained on {trained['documents']:,} documents, {trained['chars']:,} characters of "
              f"{trained['dataset']} ({meta.get('trainer', '?')})")
    print(f"  bytes per byte-pair token: mean {tb[tb > 0].mean():.2f}, max {tb.max()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data.sources import DATASETS
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
    t.add_argument("dataset", choices=sorted(DATASETS),
                   help="a data/prepare.py dataset: its train split is the training text")
    t.add_argument("--data-files", nargs="+", default=None, metavar="PATH",
                   help="local parquet/json(l)/txt files with a 'text' column, instead of the hub download")
    t.add_argument("--subset", default=None, help="hub config (as data/prepare.py; default: the dataset's)")
    t.add_argument("--revision", default=None, help="hub revision (as data/prepare.py; default: the dataset's)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="the dataset's val fraction (left out of training; default: the dataset's)")
    t.add_argument("--seed", type=int_at_least(0), default=None,
                   help="the dataset's split seed (default: the dataset's)")
    t.add_argument("--vocab-size", type=int_at_least(256 + len(NANOCHAT_SPECIALS)), default=NANOCHAT_VOCAB,
                   help=f"tokens including the {len(NANOCHAT_SPECIALS)} special ones "
                        f"(default: nanochat's {NANOCHAT_VOCAB:,})")
    t.add_argument("--doc-cap", type=int_at_least(1), default=DOC_CAP,
                   help=f"characters kept of each document (default: {DOC_CAP:,})")
    t.add_argument("--max-chars", type=int_at_least(1), default=MAX_CHARS,
                   help=f"stop after this many characters (default: nanochat's, {MAX_CHARS:,}; its speedrun "
                        f"passes 2000000000)")
    t.add_argument("--out", default=None, help="rank file to write, NAME.tiktoken (default: "
                                               "data/tokenizers/DATASET-VOCAB.tiktoken); its metadata goes beside it "
                                               "as NAME.json")
    t.add_argument("--force", action="store_true", help="replace the tokenizer an earlier `train` wrote at --out")
    i = sub.add_parser("info", help="check a trained tokenizer's files and print what it is")
    i.add_argument("file", help="the .tiktoken rank file (its .json beside it)")
    args = ap.parse_args(argv)
    run = {"fetch": _fetch_main, "check": _check_main, "train": _train_main, "info": _info_main}[args.cmd]
    try:
        return run(args)
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


def _fetch_main(args) -> int:
    dest = Path(args.dest) if args.dest else rank_file_path()
    if args.src is None and not args.force and _is_gpt2_rank_file(dest):
        print(f"{dest}: already present, sha256 ok")
        return 0
    path = fetch_rank_file(dest=dest, src=args.src)
    print(f"installed {path} (sha256 {RANK_FILE_SHA256[:12]}... ok)")
    return 0


def _check_main(args) -> int:
    enc = get_encoding()
    ids = enc.encode_ordinary("hello world")
    print(f"{rank_file_path()}: sha256 ok, n_vocab={enc.n_vocab}, 'hello world' -> {ids}")
    if ids != [31373, 995]:  # the file is right: tiktoken itself disagrees
        raise RuntimeError("'hello world' should encode to [31373, 995]; check the tiktoken version (requirements.txt)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import data.x` from a script
    from data import tokenizer as _module  # one copy of the module (its Tokenizer class) for the whole run

    sys.exit(_module.main())
