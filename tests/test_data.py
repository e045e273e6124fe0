"""Data path: tokenizer, shard format, preparation (local parquet through the real code paths),
train/val loaders and the errors on bad input. CPU only, no network."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import prepare as prep  # noqa: E402
from data import sources  # noqa: E402
from data import shards  # noqa: E402
from data import tokenizer as tok  # noqa: E402
from data.loader import TrainLoader, ValLoader, load_meta, load_token_bytes  # noqa: E402

SHARD_TOKENS = 2500


# ----------------------------------------------------------------------------- fixtures

def make_docs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the of and to in is was for on that with as by at from his her an were are which "
             "this be or has had not but data model token shard loader python train val "
             "naïve café Zürich 東京 🙂 \n \t , . ; ( ) 42 3.14 <|endoftext|>").split(" ")
    docs = []
    for _ in range(n):
        k = int(rng.integers(1, 120))
        docs.append(" ".join(rng.choice(words, size=k)))
    docs[3] = ""
    docs[7] = "   \n  "
    docs[11] = "a literal <|endoftext|> inside a document is ordinary text"
    docs[13] = " ".join(rng.choice(words, size=3000))  # spans several shards
    docs[17] = "emoji 🙂🙃 and CJK 東京 and accents é"
    return docs


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "text": docs, "score": [0.5] * len(docs)})
    pq.write_table(table, path, row_group_size=64)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    return {"docs": docs, "parquet": write_parquet(d / "docs.parquet", docs),
            "cache": tmp_path_factory.mktemp("hf_cache")}


def run_prepare(dataset, out_dir, corpus, **kw):
    kw.setdefault("shard_tokens", SHARD_TOKENS)
    kw.setdefault("workers", 2)
    kw.setdefault("log", lambda *a: None)
    return prep.prepare(dataset, out_dir=out_dir, data_files=[str(corpus["parquet"])],
                        cache_dir=str(corpus["cache"]), progress=False, **kw)


@pytest.fixture(scope="session")
def fineweb_dir(enc, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fineweb") / "fineweb_edu"
    run_prepare("fineweb_edu", out, corpus, val_fraction=0.05)
    return out


def split_stream(data_dir, split):
    meta = load_meta(data_dir)
    parts = [shards.open_shard(Path(data_dir) / s["file"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64)


def expected_split_docs(dataset, corpus, val_fraction, seed):
    source = sources.source_spec(dataset, [str(corpus["parquet"])])
    ds = sources.load_documents(source, cache_dir=str(corpus["cache"]), progress=False)
    parts = sources.split_documents(ds, val_fraction, seed)
    return {s: [t or "" for t in parts[s]["text"]] for s in ("train", "val")}


def shard_bytes(data_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(data_dir).glob("*.bin"))}


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_gpt2(enc):
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert enc.n_vocab == tok.VOCAB_SIZE == 50257
    assert enc.eot_token == tok.EOT == 50256
    assert enc.decode([tok.EOT]) == "<|endoftext|>"
    assert tok.EOT not in enc.encode_ordinary("x <|endoftext|> y")
    tb = tok.token_byte_lengths(enc)
    assert tb.shape == (50257,) and tb[tok.EOT] == 0 and tb[31373] == 5 and tb[995] == 6


def test_missing_rank_file_names_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv(tok.ENV_VAR, str(tmp_path / "nope.tiktoken"))
    with pytest.raises(FileNotFoundError, match=r"python data/tokenizer.py fetch") as e:
        tok.get_encoding()
    assert "nope.tiktoken" in str(e.value)


def _fake_sdist(path, payload: bytes):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("openai_whisper-0/whisper/assets/gpt2.tiktoken")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return path


def test_rank_file_sha256_is_verified(monkeypatch, tmp_path, enc):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setenv(tok.ENV_VAR, str(fake))
    with pytest.raises(ValueError, match="sha256"):
        tok.get_encoding()
    dest = tmp_path / "cache" / "gpt2.tiktoken"
    with pytest.raises(ValueError, match="sha256"):
        tok.install_rank_file(fake, dest)
    assert not dest.exists()
    # the download path, with pip replaced by a fake sdist (no network)
    bad = lambda spec, d: _fake_sdist(Path(d) / "openai_whisper-0.tar.gz", b"not the ranks\n")  # noqa: E731
    with pytest.raises(ValueError, match="sha256"):
        tok.fetch_rank_file(dest=dest, downloader=bad)
    assert not dest.exists()
    real = tok.default_rank_file()
    if not real.is_file():  # rank file came from HCGPT_TIKTOKEN_FILE on this machine
        monkeypatch.delenv(tok.ENV_VAR)
        real = tok.rank_file_path()
    good = lambda spec, d: _fake_sdist(Path(d) / "openai_whisper-0.tar.gz", real.read_bytes())  # noqa: E731
    assert tok.fetch_rank_file(dest=dest, downloader=good) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == tok.RANK_FILE_SHA256
    dest2 = tmp_path / "copied" / "gpt2.tiktoken"
    tok.fetch_rank_file(dest=dest2, src=dest)  # `fetch --from FILE`
    monkeypatch.setenv(tok.ENV_VAR, str(dest2))
    assert tok.get_encoding().encode_ordinary("hello world") == [31373, 995]


# ----------------------------------------------------------------------------- shard format

def test_header_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.uint16)
    p = tmp_path / "train_000000.bin"
    shards.write_shard(p, tokens)
    assert p.stat().st_size == 1024 + 2 * tokens.size
    header = np.fromfile(p, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 5 and not header[3:].any()
    assert shards.read_header(p) == 5
    np.testing.assert_array_equal(shards.open_shard(p), tokens)
    assert not list(tmp_path.glob("*.tmp"))
    shards.write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.int64))
    assert shards.read_header(tmp_path / "empty.bin") == 0


@pytest.mark.parametrize("damage,error,match", [
    ("missing", FileNotFoundError, "missing"),
    ("truncated", ValueError, "truncated"),
    ("short_header", ValueError, "truncated"),
    ("longer", ValueError, "longer"),
    ("magic", ValueError, "magic"),
    ("version", ValueError, "version"),
])
def test_bad_shard_headers(tmp_path, damage, error, match):
    p = tmp_path / "val_000000.bin"
    shards.write_shard(p, np.arange(100, dtype=np.uint16))
    raw = bytearray(p.read_bytes())
    if damage == "missing":
        p.unlink()
    elif damage == "truncated":
        p.write_bytes(raw[:-3])
    elif damage == "short_header":
        p.write_bytes(raw[:100])
    elif damage == "longer":
        p.write_bytes(raw + b"\0\0")
    elif damage == "magic":
        raw[0:4] = np.array([12345], "<i4").tobytes()
        p.write_bytes(raw)
    elif damage == "version":
        raw[4:8] = np.array([7], "<i4").tobytes()
        p.write_bytes(raw)
    with pytest.raises(error, match=match) as e:
        shards.read_header(p, fix="FIX-HINT")
    assert str(p) in str(e.value) and "FIX-HINT" in str(e.value)


# ----------------------------------------------------------------------------- preparation

def test_prepare_fineweb_edu_local_parquet(enc, corpus, fineweb_dir):
    meta = load_meta(fineweb_dir)
    assert meta["dataset"] == "fineweb_edu" and meta["seed"] == 42 and meta["vocab_size"] == 50257
    assert meta["tokenizer"]["name"] == "gpt2" and meta["source"]["kind"] == "data_files"
    expected = expected_split_docs("fineweb_edu", corpus, 0.05, 42)
    assert sorted(expected["train"] + expected["val"]) == sorted(corpus["docs"])
    token_bytes = load_token_bytes(fineweb_dir)
    assert token_bytes.dtype == torch.int64 and token_bytes.shape == (50257,) and token_bytes[50256] == 0
    for split in ("train", "val"):
        docs, info = expected[split], meta["splits"][split]
        stream = split_stream(fineweb_dir, split)
        # documents cross shard boundaries and nothing is lost: the concatenation decodes back
        assert enc.decode(stream.tolist()) == "".join("<|endoftext|>" + d for d in docs)
        assert stream[0] == tok.EOT and (stream == tok.EOT).sum() == len(docs) == info["documents"]
        assert info["tokens"] == stream.size
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        assert info["bytes"] == nbytes == int(token_bytes[torch.from_numpy(stream)].sum())
        sizes = [s["tokens"] for s in info["shards"]]
        assert all(n == SHARD_TOKENS for n in sizes[:-1]) and 0 < sizes[-1] <= SHARD_TOKENS
        assert [s["file"] for s in info["shards"]] == [f"{split}_{i:06d}.bin" for i in range(len(sizes))]
    assert len(meta["splits"]["train"]["shards"]) >= 5
    starts = [shards.open_shard(fineweb_dir / s["file"])[0] for s in meta["splits"]["train"]["shards"]]
    assert any(t != tok.EOT for t in starts)  # some shard begins mid-document
    assert not (fineweb_dir / "progress.json").exists()
    assert prep.verify(fineweb_dir)["splits"] == meta["splits"]


def test_prepare_openwebtext_local_parquet_is_deterministic(enc, corpus, tmp_path):
    a = tmp_path / "a"
    meta = run_prepare("openwebtext", a, corpus, workers=2)
    assert meta["dataset"] == "openwebtext" and meta["val_fraction"] == 0.0005 and meta["seed"] == 2357
    assert meta["splits"]["val"]["documents"] == 1  # ceil(0.05% of 240)
    expected = expected_split_docs("openwebtext", corpus, 0.0005, 2357)
    for split in ("train", "val"):
        assert enc.decode(split_stream(a, split).tolist()) == "".join("<|endoftext|>" + d for d in expected[split])
    b = tmp_path / "b"
    run_prepare("openwebtext", b, corpus, workers=1, chunk_docs=7)
    assert shard_bytes(a) == shard_bytes(b)  # independent of workers and chunking


def test_prepare_jsonl_and_text_files(enc, corpus, tmp_path):
    docs = corpus["docs"][:30]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prep.prepare("fineweb_edu", out_dir=tmp_path / "j", data_files=[str(jl)], shard_tokens=500,
                        workers=1, cache_dir=str(corpus["cache"]), progress=False, log=lambda *a: None)
    assert meta["source"]["format"] == "json"
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    for i, d in enumerate(docs[:4]):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i}.txt").write_text(d + "\nsecond line\n")
    meta = prep.prepare("pydocs", out_dir=tmp_path / "t", data_files=[str(tmp_path / "txt")],
                        workers=1, cache_dir=str(corpus["cache"]), progress=False, log=lambda *a: None)
    assert meta["source"]["format"] == "text"
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 4
    bad = tmp_path / "bad.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", "b", "c"]}), bad)
    with pytest.raises(ValueError, match="'text' column"):
        prep.prepare("fineweb_edu", out_dir=tmp_path / "x", data_files=[str(bad)], workers=1,
                     cache_dir=str(corpus["cache"]), progress=False, log=lambda *a: None)


class Killed(Exception):
    pass


def test_prepare_resumes_after_kill_and_restarts_on_new_settings(enc, corpus, tmp_path):
    clean = tmp_path / "clean"
    run_prepare("fineweb_edu", clean, corpus, val_fraction=0.05)
    out = tmp_path / "out"

    def kill_after(n):
        seen = []

        def hook(split, index, path):
            seen.append(path)
            if len(seen) == n:
                raise Killed
        return hook

    with pytest.raises(Killed):
        run_prepare("fineweb_edu", out, corpus, val_fraction=0.05, on_shard=kill_after(4))
    assert not (out / "meta.json").exists() and (out / "progress.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_meta(out)
    # what a kill at an unlucky moment leaves behind: a half-written tmp, an unrecorded shard
    (out / "train_000003.bin.tmp").write_bytes(b"\0" * 100)
    shards.write_shard(out / "train_000099.bin", np.arange(10, dtype=np.uint16))
    logs = []
    run_prepare("fineweb_edu", out, corpus, val_fraction=0.05, log=logs.append)
    assert any("resuming" in str(m) for m in logs)
    assert shard_bytes(out) == shard_bytes(clean)
    assert not list(out.glob("*.tmp")) and not (out / "progress.json").exists()
    assert load_meta(out)["splits"] == load_meta(clean)["splits"]

    # a second kill, then a rerun with other settings: starts clean, no stale shards
    with pytest.raises(Killed):
        run_prepare("fineweb_edu", tmp_path / "o2", corpus, val_fraction=0.05, on_shard=kill_after(2))
    meta = run_prepare("fineweb_edu", tmp_path / "o2", corpus, val_fraction=0.05, shard_tokens=4000)
    names = {p.name for p in (tmp_path / "o2").glob("*.bin")}
    assert names == {s["file"] for sp in ("train", "val") for s in meta["splits"][sp]["shards"]}
    assert all(s["tokens"] <= 4000 for s in meta["splits"]["train"]["shards"])

    # completed: a rerun is a no-op; other settings need --restart
    mtime = (out / "meta.json").stat().st_mtime_ns
    run_prepare("fineweb_edu", out, corpus, val_fraction=0.05)
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="--restart"):
        run_prepare("fineweb_edu", out, corpus, val_fraction=0.1)
    run_prepare("fineweb_edu", out, corpus, val_fraction=0.1, restart=True)
    assert load_meta(out)["val_fraction"] == 0.1


def test_prepare_pydocs_script(enc, tmp_path, monkeypatch):
    from data import pydocs

    docs = pydocs.documents()
    assert len(docs) > 200 and docs == pydocs.documents()
    # the same corpus whatever the interpreter is called (python, python3, a venv's link to it)
    other = tmp_path / "another-python"
    other.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(other))
    assert pydocs.documents() == docs and any("executable=sys.executable" in d for d in docs)
    monkeypatch.undo()
    out = tmp_path / "pydocs"
    res = subprocess.run([sys.executable, "data/prepare.py", "pydocs", "--out-dir", str(out),
                          "--no-progress", "--workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    meta = load_meta(out)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
    assert meta["splits"]["train"]["tokens"] > 300_000 and meta["splits"]["val"]["tokens"] > 20_000
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == \
        sum(len(d.encode()) for d in docs)


# ----------------------------------------------------------------------------- train loader

def all_windows(data_dir, T):
    stream = split_stream(data_dir, "train")
    W = (stream.size - 1) // T
    return {tuple(stream[w * T: w * T + T + 1]): w for w in range(W)}, W


def batch_windows(index, x, y):
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    return [index[tuple(r)] for r in rows]


def test_train_loader_batches_are_shifted_windows_and_deterministic(fineweb_dir):
    B, T = 4, 16
    index, W = all_windows(fineweb_dir, T)
    assert len(index) == W  # windows are distinguishable
    a, b = TrainLoader(fineweb_dir, B, T, seed=3), TrainLoader(fineweb_dir, B, T, seed=3)
    c = TrainLoader(fineweb_dir, B, T, seed=4)
    same_as_c = True
    for _ in range(20):
        (xa, ya), (xb, yb), (xc, _) = a.next_batch(), b.next_batch(), c.next_batch()
        assert xa.shape == ya.shape == (B, T) and xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        batch_windows(index, xa, ya)  # every row is a window of the stream
        same_as_c &= torch.equal(xa, xc)
    assert not same_as_c


def test_train_loader_ranks_are_disjoint_and_epochs_cover_everything(fineweb_dir):
    B, T, ws = 3, 16, 3
    index, W = all_windows(fineweb_dir, T)
    loaders = [TrainLoader(fineweb_dir, B, T, rank=r, world_size=ws, seed=0) for r in range(ws)]
    single = TrainLoader(fineweb_dir, B * ws, T, seed=0)
    steps = -(-W // (B * ws)) + 2  # past the end of the first epoch
    seen = []
    for _ in range(steps):
        per_rank = [batch_windows(index, *ld.next_batch()) for ld in loaders]
        # the ranks together read exactly what one process with the global batch reads
        assert sum(per_rank, []) == batch_windows(index, *single.next_batch())
        seen.extend(sum(per_rank, []))
    first_epoch = seen[:W]
    assert sorted(first_epoch) == list(range(W))  # disjoint, nothing skipped
    assert sorted(seen[W:2 * W]) == sorted(set(seen[W:2 * W]))  # next epoch starts fresh
    assert seen[W:] != first_epoch[: len(seen) - W]  # and is reshuffled
    assert all(ld.state_dict() == loaders[0].state_dict() for ld in loaders)


def test_train_loader_resume_is_exact(fineweb_dir):
    B, T = 4, 16
    ref = TrainLoader(fineweb_dir, B, T, rank=1, world_size=2, seed=7)
    W = ref.num_windows
    for _ in range(W // (2 * B) - 1):  # stop just before an epoch boundary
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [ref.next_batch() for _ in range(5)]
    resumed = TrainLoader(fineweb_dir, B, T, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expected, (resumed.next_batch() for _ in range(5))):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # resuming on another number of ranks continues the same window stream
    ranks = [TrainLoader(fineweb_dir, B, T, rank=r, world_size=2, seed=7) for r in range(2)]
    for ld in ranks:
        ld.load_state_dict(state)
    one = TrainLoader(fineweb_dir, 2 * B, T, seed=7)
    one.load_state_dict(state)
    for _ in range(3):
        x1, y1 = one.next_batch()
        x2, y2 = zip(*(ld.next_batch() for ld in ranks))
        assert torch.equal(x1, torch.cat(x2)) and torch.equal(y1, torch.cat(y2))
    with pytest.raises(ValueError, match="seq_len"):
        TrainLoader(fineweb_dir, B, 32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TrainLoader(fineweb_dir, B, T, seed=8).load_state_dict(state)


# ----------------------------------------------------------------------------- val loader

def test_val_loader_is_fixed_for_any_world_size(fineweb_dir):
    T, B = 16, 3
    stream = split_stream(fineweb_dir, "val")
    n_windows = (stream.size - 1) // T
    num_tokens = (n_windows - 1) * T + 5  # not a multiple of T
    want = torch.stack([torch.from_numpy(stream[w * T: w * T + T + 1]) for w in range(n_windows - 1)])
    for ws in (1, 2, 3, 5):
        rows = []
        for r in range(ws):
            vl = ValLoader(fineweb_dir, B, T, num_tokens, rank=r, world_size=ws)
            batches = list(vl)
            assert len(batches) == len(vl)
            assert all(x.shape[0] <= B and x.shape[1] == T for x, _ in batches)
            rows += [torch.cat([x, y[:, -1:]], 1) for x, y in batches]
        assert torch.equal(torch.cat(rows), want)
    assert list(ValLoader(fineweb_dir, B, T, num_tokens))[-1][0].shape[0] == ((n_windows - 1) % B or B)
    again = [x for x, _ in ValLoader(fineweb_dir, B, T, num_tokens)]
    assert all(torch.equal(a, b) for a, b in zip(again, (x for x, _ in ValLoader(fineweb_dir, B, T, num_tokens))))


def test_val_loader_errors_when_val_split_is_too_small(fineweb_dir):
    n = load_meta(fineweb_dir)["splits"]["val"]["tokens"]
    with pytest.raises(ValueError, match=r"val_000000\.bin.*prepare\.py") as e:
        ValLoader(fineweb_dir, 4, 16, n + 16)
    assert "requested" in str(e.value)
    fits = (n - 1) // 16  # windows of 16 + 1 tokens: the message names the largest value that fits
    assert f"at most {fits} windows = {fits * 16} tokens fit" in str(e.value)
    ValLoader(fineweb_dir, 4, 16, fits * 16)  # ... and it does
    with pytest.raises(ValueError, match=r"fewer than one window.*prepare\.py"):
        ValLoader(fineweb_dir, 4, n, n)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def damaged(fineweb_dir, tmp_path):
    out = tmp_path / "fineweb_edu"
    shutil.copytree(fineweb_dir, out)
    return out


def test_never_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"never prepared.*python data/prepare.py openwebtext"):
        load_meta(tmp_path / "openwebtext")
    (tmp_path / "fineweb_edu").mkdir()
    with pytest.raises(FileNotFoundError, match=r"python data/prepare.py fineweb_edu"):
        TrainLoader(tmp_path / "fineweb_edu", 2, 8)
    with pytest.raises(FileNotFoundError, match=r"python data/prepare.py fineweb_edu"):
        load_token_bytes(tmp_path / "fineweb_edu")


def test_missing_shard(damaged):
    (damaged / "train_000002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=rf"train_000002\.bin.*prepare\.py fineweb_edu .*--out-dir {damaged} "
                                                r"--restart"):
        TrainLoader(damaged, 2, 8)


@pytest.mark.parametrize("damage,match", [("truncate", "truncated"), ("magic", "magic"),
                                          ("version", "version")])
def test_damaged_shard(damaged, damage, match):
    p = damaged / "train_000001.bin"
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    else:
        raw[0 if damage == "magic" else 4: 4 if damage == "magic" else 8] = b"\x09\0\0\0"
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"train_000001\.bin.*{match}|{match}.*train_000001\.bin") as e:
        TrainLoader(damaged, 2, 8)
    assert f"--out-dir {damaged} --restart" in str(e.value) and "prepare.py fineweb_edu " in str(e.value)


def test_meta_and_shard_disagree(damaged):
    meta = json.loads((damaged / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["tokens"] += 1
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train_000000\.bin.*meta\.json"):
        TrainLoader(damaged, 2, 8)


def test_token_id_out_of_vocab(damaged):
    for split in ("train", "val"):
        p = damaged / f"{split}_000000.bin"
        arr = np.memmap(p, dtype=np.uint16, mode="r+", offset=1024)
        arr[5] = 60000
        arr.flush()
        del arr
    with pytest.raises(ValueError, match=r"val_000000\.bin: token id 60000 >= vocab_size 50257"):
        ValLoader(damaged, 2, 8, 64)
    loader = TrainLoader(damaged, 8, 8, seed=0)
    with pytest.raises(ValueError, match=r"train_000000\.bin: token id 60000 >= vocab_size.*--restart"):
        for _ in range(loader.num_windows // 8 + 1):
            loader.next_batch()
    with pytest.raises(ValueError, match="60000"):
        prep.verify(damaged)
