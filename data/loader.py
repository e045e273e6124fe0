"""Batches from prepared token shards (see ``data/prepare.py``).

Training stream: the train shards, concatenated, are cut into ``W = (N - 1) // T``
non-overlapping windows of ``T + 1`` tokens (window ``w`` covers tokens ``[w*T, w*T + T]``; x is its
first ``T`` tokens, y its last ``T``). Epoch ``e`` visits all ``W`` windows in a permutation seeded
by ``(seed, e)``; epochs follow each other without a gap, so the stream of windows is infinite.
A global step takes the next ``world_size * batch_size`` windows of that stream and rank ``r``
takes slots ``[r*B, (r+1)*B)`` of them: ranks read disjoint windows, nothing is skipped or
repeated within an epoch (except the last ``< T`` tokens of the split), and the position is one
integer (windows consumed), identical on every rank. ``state_dict()`` saves it;
``load_state_dict()`` resumes with exactly the batches the run would have seen next (also with a
different ``world_size`` or ``batch_size``: the stream continues at the same window).

Validation: the first ``num_tokens // T`` non-overlapping windows of the val split, always the
same set whatever the number of ranks; each rank gets a contiguous share of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import shards as shardlib
from data.shards import META_FORMAT
from data.sources import DATA_ROOT, prepare_command
from errors import ConfigError
from keys import check, key


def _data_seed(v):
    return None if -1 <= v < 2**31 else f"in [0, 2**31), or -1 for the seed, got {v}"


@dataclass
class DataConfig:
    """What a run trains on and how its batches are made (the config keys of data/loader.py)."""
    SECTION = "data (data/loader.py)"
    dataset: str = key("pydocs", "data/<dataset>, made by `python data/prepare.py <dataset>`")
    data_dir: str = key("", "overrides the dataset's directory", path=True, setting="a path (the data enter by data_id)")
    batch_size: int = key(16, "sequences per GPU per micro-step", above=0)
    total_batch_tokens: int = key(524_288, "tokens per optimizer step, all GPUs and micro-steps together", above=0)
    data_seed: int = key(-1, "data order seed (the train windows' shuffle), in [0, 2**31); -1 -> seed",
                         check=_data_seed, setting="varies within a group with --vary-data: the data order")

    def __post_init__(self):
        check(self)
        if not (self.dataset or self.data_dir):
            raise ConfigError("config key 'dataset' is empty; name a prepared dataset (--dataset=pydocs) or set "
                              "'data_dir'")
        self.data_dir = self.data_dir or str(DATA_ROOT / self.dataset)


def load_meta(data_dir, dataset=None) -> dict:
    """meta.json of a prepared dataset directory; FileNotFoundError with the fix otherwise (dataset: the one
    the directory is meant to hold, for the command in the fix)."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    meant = {"dataset": dataset} if dataset else None
    if not path.is_file():
        if (data_dir / "progress.json").is_file():
            why = (f"{data_dir} holds an unfinished preparation (progress.json, no meta.json); "
                   f"re-run the same `{prepare_command(data_dir, meant)} ...` command to finish it")
        else:
            what = f"{data_dir} has no meta.json" if data_dir.is_dir() else f"folder {data_dir} does not exist"
            why = f"{what}: the dataset was never prepared there; run `{prepare_command(data_dir, meant)}`"
        raise FileNotFoundError(why + " (or pass --out-dir to prepare.py to choose the directory)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `{prepare_command(data_dir, meant, restart=True)}`")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object (it holds a {type(meta).__name__}): not a meta.json written "
                         f"by data/prepare.py; re-run `{prepare_command(data_dir, meant, restart=True)}`")
    missing = [k for k in ("vocab_size", "token_bytes", "splits") if k not in meta]
    if meta.get("format") != META_FORMAT or missing:
        raise ValueError(f"{path}: not a meta.json written by data/prepare.py (format "
                         f"{meta.get('format')!r}, missing {missing}); re-run "
                         f"`{prepare_command(data_dir, meta, restart=True)}`")
    return meta


def prepared(data_dir, dataset):
    """(meta.json, the tokenizer a checkpoint of it carries) of the dataset a run trains on; a ConfigError
    with the command that prepares it when it is not there, or naming what is wrong with it."""
    from data import tokenizer as toklib
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        base = dataset.split("-")[0]  # fineweb_edu-65536: fineweb_edu with tokenizer fineweb_edu-65536
        if base == dataset:
            how = f"`{prepare_command(data_dir, {'dataset': dataset})}`"
        else:
            how = (f"`python data/prepare.py {base} --tokenizer data/tokenizers/{dataset}.tiktoken`, after "
                   f"`python data/tokenizer.py train {base} ...` (docs/reproduce-d12.md)")
        raise ConfigError(f"config key 'dataset': {data_dir} has no meta.json; prepare it with {how} (or "
                          f"point 'data_dir' at a prepared directory)")
    try:
        meta = load_meta(data_dir)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config key 'data_dir': {e}") from None
    try:  # a trained tokenizer's copy is there and is the recorded one
        return meta, toklib.checkpoint_record(data_dir, meta)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def load_token_bytes(data_dir) -> torch.Tensor:
    """int64 (vocab_size,): UTF-8 bytes of each token id's decoding, 0 for special tokens."""
    meta = load_meta(data_dir)
    tb = torch.tensor(meta["token_bytes"], dtype=torch.int64)
    if tb.numel() != meta["vocab_size"]:
        raise ValueError(f"{Path(data_dir) / 'meta.json'}: token_bytes has {tb.numel()} entries, "
                         f"vocab_size is {meta['vocab_size']}; re-run "
                         f"`{prepare_command(data_dir, meta, restart=True)}`")
    return tb


def verify_shards(data_dir, meta: dict) -> None:
    """Every token id below the vocabulary, checked now (a numpy max over the memory-mapped shards: 0.1 s per GB
    from the page cache, else the disk's read speed), so a corrupt or foreign shard is an error naming it and
    the fix rather than a crash mid-run. Raises ValueError or FileNotFoundError."""
    fix = f"Re-run `{prepare_command(data_dir, meta, restart=True)}`."
    for split in meta["splits"].values():
        for e in split["shards"]:
            shardlib.verify_shard(os.path.join(data_dir, e["file"]), meta["vocab_size"], fix)


def data_id(meta: dict) -> str:
    """What a checkpoint's data position depends on: the preparation settings and the shard list."""
    blob = json.dumps([meta.get("fingerprint"), meta["splits"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _TokenStream:
    """The shards of one split as one random-access token sequence (memory-mapped)."""

    def __init__(self, data_dir, split: str):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self.split = split
        self.vocab_size = int(self.meta["vocab_size"])
        self.fix = f"Re-run `{prepare_command(self.data_dir, self.meta, restart=True)}`."
        entries = self.meta["splits"][split]["shards"]
        if not entries:
            raise ValueError(f"{self.data_dir / 'meta.json'} lists no {split} shards. {self.fix}")
        self.paths = [self.data_dir / e["file"] for e in entries]
        self.arrays = [shardlib.open_shard(p, e["tokens"], self.fix) for p, e in zip(self.paths, entries)]
        sizes = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(sizes)))  # shard k = [starts[k], starts[k+1])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + length) into ``out`` and check their ids."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            arr = self.arrays[k]
            lo = start + done - int(self.starts[k])
            n = min(length - done, arr.size - lo)
            piece = arr[lo:lo + n]
            if piece.size and int(piece.max()) >= self.vocab_size:
                shardlib.check_token_range(piece, self.vocab_size, self.paths[k], self.fix, offset=lo)
            out[done:done + n] = piece
            done += n
            k += 1


class TrainLoader:
    """Deterministic, resumable, rank-disjoint batches of the train split."""

    def __init__(self, data_dir, batch_size, seq_len, rank=0, world_size=1, seed=0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.stream = _TokenStream(data_dir, "train")
        self.B, self.T = int(batch_size), int(seq_len)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_windows = (self.stream.num_tokens - 1) // self.T
        if self.num_windows < 1:
            raise ValueError(
                f"train split of {self.stream.data_dir} has {self.stream.num_tokens} tokens, fewer than "
                f"one window of seq_len + 1 = {self.T + 1} ({self.stream.paths[0]}); use a smaller seq_len, or "
                f"prepare more documents (a larger --max-docs, more --data-files) with "
                f"`{prepare_command(self.stream.data_dir, self.stream.meta, restart=True)}`")
        self.consumed = 0  # windows of the global stream used so far (by all ranks together)
        self._perm_epoch, self._perm = -1, None  # the permutation of the windows of one epoch, cached
        self._buf = np.empty((self.B, self.T + 1), dtype=np.uint16)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            dtype = np.int32 if self.num_windows < 2**31 else np.int64
            perm = np.arange(self.num_windows, dtype=dtype)
            rng.shuffle(perm)
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def _windows(self, first: int, count: int) -> np.ndarray:
        """Window ids at positions [first, first + count) of the infinite window stream."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, i = divmod(first + done, self.num_windows)
            n = min(count - done, self.num_windows - i)
            out[done:done + n] = self._permutation(epoch)[i:i + n]
            done += n
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.consumed + self.rank * self.B
        for row, w in enumerate(self._windows(first, self.B)):
            self.stream.read(int(w) * self.T, self.T + 1, self._buf[row])
        self.consumed += self.world_size * self.B
        t = torch.from_numpy(self._buf.astype(np.int64))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """Position in the window stream (the same on every rank) and what it depends on."""
        return {"consumed_windows": int(self.consumed), "seed": self.seed, "seq_len": self.T,
                "num_windows": int(self.num_windows)}

    def load_state_dict(self, state: dict) -> None:
        for name, mine in (("seed", self.seed), ("seq_len", self.T), ("num_windows", self.num_windows)):
            if int(state[name]) != mine:
                raise ValueError(
                    f"cannot resume the train loader: checkpoint has {name}={state[name]}, this run has "
                    f"{mine} (data dir {self.stream.data_dir}); resume with the same data, seq_len and seed")
        self.consumed = int(state["consumed_windows"])


class ValLoader:
    """The fixed validation windows; each rank iterates over its contiguous share."""

    def __init__(self, data_dir, batch_size, seq_len, num_tokens, rank=0, world_size=1, knob="the eval tokens"):
        """knob: what sets num_tokens, named in the fix of a val split that is too small."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        stream = _TokenStream(data_dir, "val")
        self.B, self.T, self.rank, self.world_size = int(batch_size), int(seq_len), int(rank), int(world_size)
        available = (stream.num_tokens - 1) // self.T
        where = ", ".join(str(p) for p in stream.paths[:3]) + (" ..." if len(stream.paths) > 3 else "")
        fix = (f"lower {knob} or seq_len, or prepare a larger val split "
               f"(`{prepare_command(stream.data_dir, stream.meta, val_fraction='F', restart=True)}`)")
        if available < 1:
            raise ValueError(f"val split ({where}) has {stream.num_tokens} tokens, fewer than one "
                             f"window of seq_len + 1 = {self.T + 1}; {fix}")
        if num_tokens is None:
            num_tokens = available * self.T
        self.num_windows = int(num_tokens) // self.T
        if self.num_windows < 1:
            raise ValueError(f"{knob} ({num_tokens}) is less than one window of seq_len={self.T}")
        if self.num_windows > available:
            raise ValueError(f"requested {num_tokens} val tokens ({self.num_windows} windows of {self.T}) "
                             f"but the val split ({where}) has {stream.num_tokens} tokens: at most "
                             f"{available} windows = {available * self.T} tokens fit; {fix}")
        self.num_tokens = self.num_windows * self.T
        lo = self.num_windows * rank // world_size
        hi = self.num_windows * (rank + 1) // world_size
        self.window_range = (lo, hi)
        self._tokens = np.empty((hi - lo) * self.T + 1, dtype=np.uint16)
        if hi > lo:
            stream.read(lo * self.T, self._tokens.size, self._tokens)  # small: keep it in memory

    def __len__(self) -> int:
        n = self.window_range[1] - self.window_range[0]
        return -(-n // self.B)

    def __iter__(self):
        n = self.window_range[1] - self.window_range[0]
        cols = np.arange(self.T + 1)
        for i in range(0, n, self.B):
            b = min(self.B, n - i)
            idx = ((np.arange(b) + i) * self.T)[:, None] + cols
            w = torch.from_numpy(self._tokens[idx].astype(np.int64))
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
