"""TinyStories: preparation of local copies in both published layouts (parquet / JSON lines with a text
column, and the TinyStoriesV2 .txt files split at <|endoftext|>), the hub path's files and splits, the
config and sweep preset. CPU only, no network."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import prepare as prep  # noqa: E402
from data import sources  # noqa: E402
from data import shards  # noqa: E402
from data.loader import load_meta  # noqa: E402

TRAIN = ["Once upon a time, there was a cat named Tom.\nTom liked milk.\n\nThe end.",
         "Lily had a red ball. \"Look!\" she said. 東京 🙂",
         "A dog barked at the moon.",
         "Ben found a stick. He was happy."]
VAL = ["The sun was hot. Sam ate ice cream.", "Mia and her mom baked a cake."]


def write_v2_txt(path, stories, trailing=True):
    """TinyStoriesV2-GPT4-*.txt layout: a story, a line <|endoftext|>, the next story (blank lines in between)."""
    sep = "\n<|endoftext|>\n"
    path.write_text(sep.join(stories) + (sep + "\n" if trailing else "\n"), encoding="utf-8")
    return path


def write_jsonl(path, stories):
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    return path


def write_parquet(path, stories):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": stories}), path)
    return path


def stream(out, split):
    meta = load_meta(out)
    return np.concatenate([shards.open_shard(Path(out) / s["file"]) for s in meta["splits"][split]["shards"]])


def expected(enc, stories):
    return np.array([t for s in stories for t in [enc.eot_token] + enc.encode_ordinary(s)], dtype=np.uint16)


def run(tmp_path, files, out="out", **kw):
    kw = {"workers": 1, "shard_tokens": 16, "progress": False, "log": lambda *a: None,
          "cache_dir": str(tmp_path / "hf_cache"), **kw}
    return prep.prepare("tinystories", out_dir=tmp_path / out, data_files=[str(f) for f in files], **kw)


@pytest.mark.parametrize("layout", ["v2_txt", "jsonl", "parquet"])
def test_local_copies_keep_the_published_validation_split(tmp_path, enc, layout):
    if layout == "v2_txt":
        files = [write_v2_txt(tmp_path / "TinyStoriesV2-GPT4-train.txt", TRAIN),
                 write_v2_txt(tmp_path / "TinyStoriesV2-GPT4-valid.txt", VAL, trailing=False)]
    elif layout == "jsonl":
        files = [write_jsonl(tmp_path / "train.jsonl", TRAIN), write_jsonl(tmp_path / "validation.jsonl", VAL)]
    else:  # the hub's own file names
        files = [write_parquet(tmp_path / "train-00000-of-00001.parquet", TRAIN),
                 write_parquet(tmp_path / "validation-00000-of-00001-869c.parquet", VAL)]
    meta = run(tmp_path, files)
    assert meta["val_split"] == "own" and meta["val_fraction"] is None and meta["seed"] is None
    assert [e["split"] for e in meta["source"]["data_files"]] == ["train", "val"]
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (4, 2)
    assert len(meta["splits"]["train"]["shards"]) > 1  # 16-token shards: stories run across shard boundaries
    np.testing.assert_array_equal(stream(tmp_path / "out", "train"), expected(enc, TRAIN))
    np.testing.assert_array_equal(stream(tmp_path / "out", "val"), expected(enc, VAL))
    assert prep.verify(tmp_path / "out")["splits"]["val"]["tokens"] == expected(enc, VAL).size
    logs = []
    run(tmp_path, files, log=logs.append)  # a rerun with the same settings leaves it as it is
    assert any("already prepared" in line for line in logs)


def test_txt_stories_split_across_reads(tmp_path, enc, monkeypatch):
    """The separator cut by a read boundary, blank blocks and a file without a final separator."""
    monkeypatch.setattr(sources, "READ_CHARS", 5)
    train = tmp_path / "TinyStories-train.txt"
    train.write_text("\n\n" + "<|endoftext|>\n".join(s + "\n" for s in TRAIN) + "<|endoftext|>\n\n<|endoftext|>\n",
                     encoding="utf-8")
    val = write_v2_txt(tmp_path / "TinyStories-valid.txt", VAL, trailing=False)
    assert list(sources._read_stories([str(train)], "<|endoftext|>")) == [{"text": s} for s in TRAIN]
    run(tmp_path, [train, val])
    np.testing.assert_array_equal(stream(tmp_path / "out", "train"), expected(enc, TRAIN))


def test_resume_after_a_kill(tmp_path, enc):
    files = [write_v2_txt(tmp_path / "TinyStoriesV2-GPT4-train.txt", TRAIN * 5),
             write_v2_txt(tmp_path / "TinyStoriesV2-GPT4-valid.txt", VAL)]

    def kill_after_3(split, index, path):
        if split == "train" and index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, files, on_shard=kill_after_3)
    assert not (tmp_path / "out" / "meta.json").exists()
    logs = []
    run(tmp_path, files, log=logs.append)
    assert any("resuming" in line for line in logs)
    np.testing.assert_array_equal(stream(tmp_path / "out", "train"), expected(enc, TRAIN * 5))


def test_split_errors_and_random_split(tmp_path, enc):
    only_train = write_v2_txt(tmp_path / "TinyStoriesV2-GPT4-train.txt", TRAIN)
    with pytest.raises(ValueError, match=r"no val file .*validation.*--val-fraction"):
        run(tmp_path, [only_train])
    with pytest.raises(ValueError, match=r"--seed: tinystories keeps its own validation split"):
        run(tmp_path, [only_train], seed=3)
    meta = run(tmp_path, [only_train], val_fraction=0.25, seed=3)  # an explicit random split of all the stories
    assert meta["val_split"] == "random" and meta["seed"] == 3
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(TRAIN)
    bad = tmp_path / "TinyStoriesV2-GPT4-valid.txt"
    bad.write_bytes(b"A story.\n<|endoftext|>\nBad \xff byte.\n")
    with pytest.raises(ValueError, match=r"TinyStoriesV2-GPT4-valid.txt:3: not UTF-8"):
        run(tmp_path, [only_train, bad], out="o2")


def test_hub_path_reads_the_published_parquet_splits(tmp_path, enc, monkeypatch):
    """Without network: load_dataset is stood in for, to check what the hub path asks for and where it goes."""
    import datasets

    asked = []

    def fake_load_dataset(name, split=None, data_files=None, **kw):
        asked.append((name, data_files, split))
        return datasets.Dataset.from_dict({"text": VAL if "validation" in data_files else TRAIN})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    meta = prep.prepare("tinystories", out_dir=tmp_path / "out", workers=1, progress=False, log=lambda *a: None)
    assert sorted(asked) == [("roneneldan/TinyStories", "data/train-*.parquet", "train"),
                             ("roneneldan/TinyStories", "data/validation-*.parquet", "train")]
    assert meta["source"]["kind"] == "hub" and meta["source"]["files"]["val"] == "data/validation-*.parquet"
    np.testing.assert_array_equal(stream(tmp_path / "out", "val"), expected(enc, VAL))
    np.testing.assert_array_equal(stream(tmp_path / "out", "train"), expected(enc, TRAIN))


def test_tokenizer_trains_on_the_train_split_only(tmp_path, monkeypatch, capsys):
    """`tokenizer.py train tinystories` reads the published train split, none of the validation stories."""
    import datasets
    from data import tokenizer as tok

    def fake_load_dataset(name, split=None, data_files=None, **kw):
        return datasets.Dataset.from_dict({"text": VAL if "validation" in data_files else TRAIN})

    def texts_only(texts, vocab_size, name):
        seen.extend(texts)
        raise ValueError("the texts are all this test needs")

    seen = []
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(tok, "train_bpe", texts_only)
    assert tok.main(["train", "tinystories", "--out", str(tmp_path / "t.tiktoken")]) == 1
    assert "the texts are all this test needs" in capsys.readouterr().err and seen == TRAIN


def test_hub_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"cannot load roneneldan/TinyStories from the Hugging Face hub.*--data-files"):
        prep.prepare("tinystories", out_dir=tmp_path / "out", workers=1, progress=False, log=lambda *a: None)


def test_config_and_sweep_preset(capsys, tmp_path):
    import config
    import configurator
    import hc
    from scripts import sweep

    cfg = configurator.load(config.KEYS, [str(REPO / "configs" / "tinystories.py")])
    assert (cfg["dataset"], cfg["block_size"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"]) == \
        ("tinystories", 512, 8, 512, 16)
    assert cfg["total_batch_tokens"] % (cfg["batch_size"] * cfg["block_size"] * 8) == 0  # 1 to 8 GPUs
    assert sweep.main(["--preset", "tinystories", "--nproc", "1", "--out_root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(hc.SCHEMES) and all("configs/tinystories.py" in line for line in lines)
    assert {line.split("--scheme=")[1].split()[0] for line in lines} == set(hc.SCHEMES)
    with pytest.raises(SystemExit):
        sweep.main(["--preset", "schemes"])  # a preset without configs still needs --configs
