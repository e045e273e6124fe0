"""Token shard files in the llm.c / modded-nanogpt ``.bin`` format.

Layout: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1,
``[2]`` number of tokens, the rest 0), then the tokens as little-endian uint16.
A shard of ``n`` tokens is exactly ``1024 + 2 * n`` bytes.

Shards are written to ``<name>.tmp`` and renamed into place, so a file under its final
name is always complete.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
DEFAULT_SHARD_TOKENS = 100_000_000  # data/prepare.py's --shard-tokens
META_FORMAT = "hcgpt-token-shards/1"  # a prepared dataset's meta.json (data/prepare.py)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_atomic(path: Path, *chunks: bytes, fsync: bool = True) -> None:
    """Write chunks to path's .tmp and rename it into place: a file under its final name is complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, fsync: bool = True) -> None:
    """Atomically write ``tokens`` (values < 65536) as a shard at ``path``."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype != TOKEN_DTYPE:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ValueError(f"{path}: token ids must fit in uint16")
        tokens = tokens.astype(TOKEN_DTYPE)
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    write_atomic(path, header.tobytes(), tokens.tobytes(), fsync=fsync)


def read_header(path: str | os.PathLike, fix: str = "") -> int:
    """Validate a shard's header and size; return its token count. FileNotFoundError (missing) or
    ValueError (wrong magic/version, truncated or oversized file) naming the file, then ``fix``."""
    path = Path(path)
    hint = f" {fix}" if fix else ""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is missing.{hint}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header.{hint}")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] != MAGIC:
        raise ValueError(f"shard {path}: wrong magic {int(header[0])} (expected {MAGIC}); "
                         f"not a token shard in the llm.c format.{hint}")
    if header[1] != VERSION:
        raise ValueError(f"shard {path}: unsupported version {int(header[1])} (expected {VERSION}).{hint}")
    count = int(header[2])
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * count
    if count < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"shard {path} is {what}: {size} bytes, expected {expected} for the "
                         f"{count} tokens in its header.{hint}")
    return count


def open_shard(path: str | os.PathLike, expected_tokens: int | None = None, fix: str = "") -> np.memmap:
    """Validate the header and memory-map the tokens (read-only uint16 array)."""
    count = read_header(path, fix)
    if expected_tokens is not None and count != expected_tokens:
        hint = f" {fix}" if fix else ""
        raise ValueError(f"shard {path} holds {count} tokens but meta.json lists {expected_tokens}.{hint}")
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def check_token_range(tokens: np.ndarray, vocab_size: int, path, fix: str = "", offset: int = 0) -> None:
    """ValueError naming ``path`` if any token id is >= ``vocab_size``."""
    mx = int(tokens.max()) if tokens.size else 0
    if mx >= vocab_size:
        pos = offset + int(np.argmax(tokens >= vocab_size))
        hint = f" {fix}" if fix else ""
        raise ValueError(f"shard {path}: token id {mx} >= vocab_size {vocab_size} (first bad token at "
                         f"position {pos}); the file is corrupt or was made with another tokenizer.{hint}")


def verify_shard(path: str | os.PathLike, vocab_size: int, fix: str = "", chunk: int = 1 << 24) -> int:
    """Full check of one shard (header, size, every token id); returns its token count."""
    arr = open_shard(path, fix=fix)
    for i in range(0, arr.size, chunk):
        check_token_range(arr[i:i + chunk], vocab_size, path, fix, offset=i)
    return int(arr.size)


class DirLocked(RuntimeError):
    """Another live process holds the directory's lock."""


@contextlib.contextmanager
def dir_lock(directory, lock_name: str, who: str):
    """Hold an exclusive lock on ``directory/lock_name`` for the body (e.g. a whole run).

    flock locks belong to the open file: the OS releases them when the process exits or is
    killed, so a crashed run never leaves a stale lock behind. Raises DirLocked naming the
    directory if another process holds it; ``who`` names that process in the message.
    """
    import fcntl
    with open(Path(directory) / lock_name, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DirLocked(f"another {who} is using {directory} (it holds {Path(directory) / lock_name}); "
                            f"wait for it to finish, or use another directory") from None
        yield
