"""data/loader.py's window count at the edges: a split of k*T tokens holds k - 1 windows of T + 1
tokens, one of k*T + 1 tokens holds k; every window is read whole, across shard boundaries."""

import json

import numpy as np
import pytest

from data import shards
from data.loader import META_FORMAT, TrainLoader, ValLoader

T = 8


def make_dataset(path, train_tokens, val_tokens, vocab=1000):
    """A prepared-dataset directory whose token i is i % vocab; train split in two shards."""
    path.mkdir()
    splits = {}
    for split, n, cuts in (("train", train_tokens, (0, train_tokens // 2 + 3, train_tokens)),
                           ("val", val_tokens, (0, val_tokens))):
        entries = []
        for k, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
            name = shards.shard_name(split, k)
            shards.write_shard(path / name, np.arange(lo, hi) % vocab, fsync=False)
            entries.append({"file": name, "tokens": hi - lo})
        splits[split] = {"tokens": n, "shards": entries}
    meta = {"format": META_FORMAT, "vocab_size": vocab, "token_bytes": [1] * vocab, "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("k,extra", [(10, 0), (10, 1), (10, T - 1), (11, 0)])
def test_window_count_and_contents(k, extra, tmp_path):
    n = k * T + extra
    d = make_dataset(tmp_path / "d", n, n)
    expected = k - 1 if extra == 0 else k          # window w needs tokens w*T .. w*T + T
    loader = TrainLoader(d, 1, T, seed=3)
    assert loader.num_windows == expected
    seen = []
    for _ in range(expected):                      # one epoch, one window per batch
        x, y = loader.next_batch()
        start = int(x[0, 0])
        assert x[0].tolist() == list(range(start, start + T)) and y[0].tolist() == list(range(start + 1, start + T + 1))
        seen.append(start)
    assert sorted(seen) == [w * T for w in range(expected)]   # each window once, none past the end
    val = ValLoader(d, 2, T, None)
    assert val.num_windows == expected and val.num_tokens == expected * T
    assert sum(x.shape[0] for x, _ in val) == expected
    with pytest.raises(ValueError, match="val"):
        ValLoader(d, 2, T, (expected + 1) * T)
