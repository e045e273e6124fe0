"""GPT-2 BPE tokenizer that works without network access.

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

Public API: ``get_encoding()``, ``EOT``, ``VOCAB_SIZE``, ``NAME``, ``rank_file_path()``,
``fetch_rank_file()``, ``install_rank_file()``, ``token_byte_lengths()``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
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
def _load_encoding(path: str) -> tiktoken.Encoding:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"GPT-2 tokenizer rank file not found at {p}. Fetch it (from PyPI, ~1 MB) with "
            f"`{FETCH_COMMAND}`; on a node without network copy gpt2.tiktoken from another machine "
            f"and run `{FETCH_COMMAND} --from /path/to/gpt2.tiktoken`, or set {ENV_VAR}=/path/to/gpt2.tiktoken."
        )
    ranks = _parse_ranks(read_verified(p), p)
    enc = tiktoken.Encoding(
        name=NAME,
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT
    return enc


def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (cached), built offline from the verified local rank file."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Offline GPT-2 tokenizer rank file.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="install gpt2.tiktoken (from PyPI, or --from a local copy)")
    f.add_argument("--from", dest="src", default=None,
                   help="local gpt2.tiktoken (or openai-whisper .tar.gz) to install; no network")
    f.add_argument("--dest", default=None, help=f"install here (default: ${ENV_VAR} or {default_rank_file()})")
    f.add_argument("--force", action="store_true", help="re-fetch even if a verified file is present")
    sub.add_parser("check", help="verify the rank file in use and print its path")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, RuntimeError) as e:  # the messages name the file and the fix
        print(f"tokenizer.py: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
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
    sys.exit(main())
