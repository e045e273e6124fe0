"""The d12 reproduction (docs/reproduce-d12.md): a BPE tokenizer trained like nanochat's, through
prepare, train, checkpoints, sampling and the evals; its bad inputs; nanochat's step rule; the fp32
softcap, the bf16 embedding, the 2026-01 init, the train-loss EMA, Muon's weight decay; the configs."""

import functools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import config
import configurator
import evals.core
import numerics
import checkpoint
import train
from common import LossEMA
from conftest import muon, read_log, tiny_args
from errors import CheckpointError, ConfigError
from data import prepare as prep
from data import sources
from data import shards as shardlib
from data import tokenizer as toklib
from model import GPT, GPTConfig
import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLASWAG = os.path.join(REPO, "tests", "fixtures", "hellaswag", "hellaswag_val_sample.jsonl")
BUNDLE = os.path.join(REPO, "tests", "fixtures", "core", "eval_bundle")
V = 4096
QUIET = dict(workers=1, progress=False, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 4,096-token tokenizer trained on pydocs' train split by the command line."""
    path = tmp_path_factory.mktemp("tok") / "pydocs-4096.tiktoken"
    assert toklib.main(["train", "pydocs", "--vocab-size", str(V), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def bpe_data(bpe, tmp_path_factory):
    out = tmp_path_factory.mktemp("pydocs_bpe")
    prep.prepare("pydocs", out_dir=out, tokenizer=str(bpe), **QUIET)
    return out


@functools.lru_cache(maxsize=1)
def pydocs_splits():
    """{"train": [text, ...], "val": [...]}: pydocs split as data/prepare.py splits it."""
    ds = sources.load_documents(sources.source_spec("pydocs"), progress=False)
    parts = sources.split_documents(ds, sources.DATASETS["pydocs"]["val_fraction"], sources.DATASETS["pydocs"]["seed"])
    return {k: list(v["text"]) for k, v in parts.items()}


# ----------------------------------------------------------------------------- the tokenizer

def test_trained_tokenizer_is_nanochats_and_round_trips(bpe):
    """nanochat's pattern and 9 special tokens after the byte pairs; the rank file is tiktoken's;
    every pydocs document (and some odd text) decodes back to itself."""
    from tiktoken.load import load_tiktoken_bpe
    enc = toklib.load_bpe(bpe)
    meta = json.loads(bpe.with_suffix(".json").read_text())
    assert enc.n_vocab == V and enc._pat_str == toklib.NANOCHAT_PATTERN
    assert enc._special_tokens == {s: V - 9 + i for i, s in enumerate(toklib.NANOCHAT_SPECIALS)}
    assert enc.bos_token == enc.eot_token == V - 9 == meta["bos"]
    assert load_tiktoken_bpe(str(bpe)) == enc._mergeable_ranks and len(enc._mergeable_ranks) == V - 9
    trained = meta["trained_on"]
    assert (trained["dataset"], trained["split"], trained["doc_cap"]) == ("pydocs", "train", 10_000)
    assert trained["documents"] == len(pydocs_splits()["train"])
    odd = ["Unicode: 你好世界 🌍 naïve", "Numbers: 123, 4567, 89", "  \n\n\tx = 1  # <|bos|> as text\r\n"]
    for text in pydocs_splits()["val"] + odd:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_trainer_encodes_as_tiktoken(bpe):
    """rustbpe's own encoder and the tiktoken encoding prepare.py uses give the same ids, and a
    second training on the same text gives the same ranks."""
    import rustbpe
    texts = list(toklib.capped_texts(pydocs_splits()["train"]))
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), V - 9, pattern=toklib.NANOCHAT_PATTERN)
    enc = toklib.load_bpe(bpe)
    assert {bytes(k): v for k, v in trainer.get_mergeable_ranks()} == enc._mergeable_ranks
    corpus = pydocs_splits()["val"] + ["Unicode: 你好世界 🌍", "x=1234567; y = 'it''s'"]
    assert trainer.batch_encode(corpus) == enc.encode_ordinary_batch(corpus)


def test_doc_cap_and_char_budget():
    """nanochat's tok_train iterator: each document cut to doc_cap characters; the document that
    takes the total past max_chars is the last one."""
    stats = {}
    out = list(toklib.capped_texts(["abcdef", "gh", "ijklmn", "op"], doc_cap=4, max_chars=7, stats=stats))
    assert out == ["abcd", "gh", "ijkl"] and stats == {"documents": 3, "chars": 10}
    assert list(toklib.capped_texts(["ab", "cd"], doc_cap=10, max_chars=100)) == ["ab", "cd"]


def test_prepare_with_bos_and_exact_bytes(bpe, bpe_data):
    """uint16 shards; every document after <|bos|>; meta.json's bytes are exactly the UTF-8 bytes of
    the texts (special tokens 0), so BPB is exact; the dataset carries its tokenizer."""
    meta = json.loads((bpe_data / "meta.json").read_text())
    enc = toklib.load_bpe(bpe)
    assert meta["vocab_size"] == V and meta["bos"] == meta["eot"] == V - 9
    assert toklib.same_tokenizer(meta["tokenizer"], toklib.record(enc))
    assert (bpe_data / "tokenizer.tiktoken").read_bytes() == bpe.read_bytes()
    tb = np.asarray(meta["token_bytes"])
    assert tb[V - 9:].sum() == 0 and (tb[:V - 9] > 0).all()
    texts = pydocs_splits()["val"]
    tokens = np.concatenate([shardlib.open_shard(bpe_data / s["file"]) for s in meta["splits"]["val"]["shards"]])
    assert tokens.dtype == np.uint16 and tokens[0] == V - 9
    starts = np.flatnonzero(tokens == V - 9)
    docs = [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]
    assert docs == texts
    assert meta["splits"]["val"]["bytes"] == int(tb[tokens].sum()) == sum(len(t.encode()) for t in texts)
    assert meta["splits"]["val"]["documents"] == len(texts)
    assert prep.verify(bpe_data)["splits"] == meta["splits"]


def test_bad_tokenizer_files_are_refused(bpe, tmp_path):
    """A damaged or mismatched rank file, a missing .json, a vocabulary above uint16's: a clear
    error before anything is written; an existing dataset stays as it was."""
    bad = tmp_path / "bad.tiktoken"
    shutil.copy(bpe.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bpe.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bad\.tiktoken: sha256 .* does not match .*train"):
        prep.prepare("pydocs", out_dir=out, tokenizer=str(bad), **QUIET)
    assert not out.exists()
    bad.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match=r"bad\.json not found"):
        toklib.load_bpe(bad)
    # 65,537 tokens do not fit uint16 shards
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({bytes([a, b]): 256 + 256 * a + b for a in range(255) for b in range(256)})
    ranks = dict(list(ranks.items())[:65_537 - 9])
    specials = {s: len(ranks) + i for i, s in enumerate(toklib.NANOCHAT_SPECIALS)}
    big = toklib.Tokenizer("big", toklib.NANOCHAT_PATTERN, ranks, specials, bos_token=len(ranks))
    toklib.save_bpe(big, tmp_path / "big.tiktoken")
    with pytest.raises(ValueError, match="65,537 tokens do not fit the uint16 shards.*--vocab-size 65536"):
        prep.prepare("pydocs", out_dir=out, tokenizer=str(tmp_path / "big.tiktoken"), **QUIET)
    assert not out.exists()
    with pytest.raises(ValueError, match="already exists.*--force"):
        toklib.save_bpe(big, tmp_path / "big.tiktoken")


def test_prepare_keeps_a_dataset_of_another_tokenizer(bpe, data_dir, tmp_path):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(data_dir, gpt2)
    before = {p.name: p.read_bytes() for p in gpt2.iterdir()}
    with pytest.raises(ValueError, match="already holds a dataset prepared with other settings"):
        prep.prepare("pydocs", out_dir=gpt2, tokenizer=str(bpe), **QUIET)
    assert {p.name: p.read_bytes() for p in gpt2.iterdir()} == before


# ----------------------------------------------------------------------------- train, checkpoints, evals

def test_train_sample_and_evals_with_the_trained_tokenizer(bpe_data, tmp_path):
    """vocab from meta.json; the checkpoint carries the tokenizer, so sampling and the evals use it
    without the data directory; CORE prompts start with <|bos|>; the end-of-run CORE equals a
    rescoring with the checkpoint's tokenizer."""
    import scripts.sample as sample
    data = tmp_path / "data"
    shutil.copytree(bpe_data, data)
    out = tmp_path / "run"
    train.main(tiny_args(data, out, "--arch=nanochat", "--bias=False", "--n_layer=1", "--max_iters=4",
                         "--final_core=True", f"--core_bundle_dir={BUNDLE}", "--final_hellaswag=True",
                         f"--hellaswag_file={HELLASWAG}"))
    log = read_log(out)
    assert log[0]["vocab_size"] == V
    shutil.rmtree(data)
    model, meta = checkpoint.load_model(out)
    enc = checkpoint.load_tokenizer(meta)
    assert (enc.n_vocab, enc.bos_token, enc.eot_token, enc.name) == (V, V - 9, V - 9, "pydocs-4096")
    assert evals.core.encode(enc, ["The cat"])[0] == [V - 9] + enc.encode_ordinary("The cat")
    text = sample.sample(model, enc, "def ", num_samples=1, max_new_tokens=5, temperature=0, top_k=200,
                         seed=1337, device="cpu")[0]
    ids = model.generate(torch.tensor([enc.encode_ordinary("def ")]), 5, temperature=0)[0, -5:].tolist()
    assert text == enc.decode(ids)
    core = evals.core.evaluate_core(model, enc, "cpu", BUNDLE, log=None)
    final = [r for r in log if r["type"] == "final"][0]
    assert final["core"] == core["core"] and final["hellaswag_n"] == 7
    assert "x100: " in evals.core.core_line(core)


def test_tokenizer_from_checkpoint_is_checked(bpe, bpe_data, tmp_path):
    """A checkpoint's tokenizer record without its rank file, or with another one: a clear error,
    never GPT-2's BPE; a data directory whose tokenizer copy was replaced: refused before out_dir."""
    out = tmp_path / "run"
    train.main(tiny_args(bpe_data, out, "--max_iters=2", "--eval_interval=2"))
    _, meta = checkpoint.load_model(out)
    rec = dict(meta["tokenizer"])
    assert checkpoint.load_tokenizer({"tokenizer": rec}).encode_ordinary("hello") == \
        toklib.load_bpe(bpe).encode_ordinary("hello")
    with pytest.raises(ValueError, match="carries no rank file"):
        checkpoint.load_tokenizer({"tokenizer": {k: v for k, v in rec.items() if k != "rank_file"}})
    rec["rank_file"] = rec["rank_file"].replace(b"\n", b"\n\n", 1) + b"QUFB 9999\n"
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        checkpoint.load_tokenizer({"tokenizer": rec})
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    ckpt["tokenizer"] = rec
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: .*sha256"):
        checkpoint.load_model(tmp_path / "bad.pt")
    data = tmp_path / "data"
    shutil.copytree(bpe_data, data)
    (data / "tokenizer.tiktoken").write_bytes(b"AAAA 0\n")
    with pytest.raises(ConfigError, match=r"tokenizer\.tiktoken: sha256 .*--tokenizer \S+pydocs-4096\.tiktoken --out-dir \S+ --restart"):
        train.main(tiny_args(data, tmp_path / "new", "--max_iters=2"))
    assert not (tmp_path / "new").exists()


def test_resume_with_another_tokenizer_is_refused(bpe_data, data_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(bpe_data, out, "--max_iters=2", "--eval_interval=2", "--vocab_size=50304"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"trained with pydocs-4096 \(4,096 tokens.*tokenized with GPT-2's BPE"):
        train.main(tiny_args(data_dir, out, "--max_iters=4", "--resume", "--vocab_size=50304"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------- the recipe

def d12(scheme, vocab=65_536):
    with torch.device("meta"):
        return GPT(GPTConfig(arch="nanochat", n_layer=12, n_embd=768, n_head=6, block_size=2048, bias=False,
                             vocab_size=vocab, scheme=scheme, n_streams=1 if scheme == "plain" else 4))


@pytest.mark.parametrize("scheme, params, steps", [
    ("plain", 185_597_952, 7080), ("hc", 185_727_600, 7084), ("mhc", 187_441_800, 7150),
    ("mhc_lite", 188_031_816, 7172), ("kromhc", 186_556_776, 7116)])
def test_d12_step_rule(scheme, params, steps):
    """nanochat's base_train.py: num_iterations = 20 x every parameter // 524,288 (the numbers in
    configs/nanochat_d12.py); the connections' parameters are the KromHC table's extra params."""
    n = d12(scheme).num_params(non_embedding=False)
    assert n == params and optim.ratio_steps(n, 20, 524_288) == steps
    assert n - 185_597_952 == {"plain": 0, "hc": 129_648, "mhc": 1_843_848, "mhc_lite": 2_433_864,
                               "kromhc": 958_824}[scheme]
    if scheme == "plain":
        assert n == 2 * 65_536 * 768 + 12 * 12 * 768 ** 2
        assert optim.ratio_steps(d12(scheme, 50_304).num_params(non_embedding=False), 20, 524_288) == 6187


def test_max_iters_from_param_data_ratio(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train.main(tiny_args(data_dir, out, "--arch=nanochat", "--bias=False", "--max_iters=-1",
                                  "--param_data_ratio=0.0005", "--eval_interval=100"))
    n = read_log(out)[0]["num_params"]  # without the embedding lookup: not what nanochat's rule counts
    n_all = sum(p.numel() for p in checkpoint.load_model(out)[0].parameters())
    assert read_log(out)[0]["max_iters"] == result["step"] == int(0.0005 * n_all) // 128 == 12
    assert int(0.0005 * n) // 128 < 12
    with pytest.raises(ConfigError, match="'max_iters' is -1.*'param_data_ratio' is 0"):
        config.build({**config.DEFAULTS, "max_iters": -1, "param_data_ratio": 0})
    with pytest.raises(ConfigError, match="'max_iters' must be an integer >= 0 .*or -1"):
        config.build({**config.DEFAULTS, "max_iters": -2})


def tiny(**kw):
    return GPTConfig(**{**dict(arch="nanochat", block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32,
                               bias=False), **kw})


def test_softcap_in_fp32_under_bf16_autocast():
    """The unembedding's bf16 output is cast up before 15 tanh(z / 15), as nanochat: the logits equal
    the fp32 cap of that output bit for bit; a cap in bf16 is off by up to bf16's rounding."""
    torch.manual_seed(0)
    model = GPT(tiny(scheme="kromhc", n_streams=4))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    captured = {}
    model.lm_head.register_forward_hook(lambda m, i, o: captured.update(z=o))
    idx = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)[0]
    z = captured["z"]
    assert z.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.equal(logits, 15 * torch.tanh(z.float() / 15))
    in_bf16 = (15 * torch.tanh(z / 15)).float()
    assert (in_bf16 - logits).abs().max() > 1e-3


def test_bf16_embedding_and_2026_init():
    torch.manual_seed(0)
    model = GPT(tiny(embedding_dtype="bfloat16", n_embd=256, nanochat_init="48abd7d"))
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "wte" not in n)
    b = model.transformer.h[0]
    # sampling, not rounding: the std of N >= 65,536 draws is within a few 1 / sqrt(2 N) = 0.3% of its value
    for w in (b.attn.c_q.weight, b.mlp.c_fc.weight):  # uniform, std 1/sqrt(n_embd), bound sqrt(3) x that
        assert w.abs().max() <= 3 ** 0.5 / 16 and w.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert not b.attn.c_proj.weight.any() and not b.mlp.c_proj.weight.any()
    opt = muon(model)
    idx = torch.randint(0, 128, (2, 16))
    loss = model(idx, idx)[1]
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item()) and model.transformer.wte.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="embedding_dtype 'bfloat16' is nanochat's"):
        GPT(tiny(arch="gpt2", bias=True, embedding_dtype="bfloat16"))


@pytest.mark.numerics
def test_muon_weight_decay_is_decoupled():
    """muon_weight_decay: p <- p (1 - lr wd) besides the same update (torch's Muon)."""
    torch.manual_seed(0)
    m0 = GPT(tiny())
    m1 = GPT(tiny())
    m1.load_state_dict(m0.state_dict())
    idx = torch.randint(0, 128, (2, 16))
    for m, wd in ((m0, 0.0), (m1, 0.2)):
        opt = muon(m, muon_weight_decay=wd)
        assert [g["weight_decay"] for g in opt.muon.param_groups] == [wd]
        torch.manual_seed(1)  # a weight the decay can be seen on, the same in both
        m.transformer.h[0].attn.c_q.weight.data.normal_()
        m(idx, idx)[1].backward()
        w = m.transformer.h[0].attn.c_q.weight.detach().clone()
        opt.step()
        m.step_delta = m.transformer.h[0].attn.c_q.weight.detach() - w
        m.before = w
    # the same update on both sides, bit for bit (the same weights and gradient); the decay's product, the new
    # weight and its delta round once on each side, and their difference once: 6 roundings of values at most
    # |w| + |delta|
    scale = (m1.before.abs().max() + m1.step_delta.abs().max()).item()
    numerics.assert_close(m1.step_delta - m0.step_delta, -0.02 * 0.2 * m1.before, 6 * numerics.u(), "decay",
                          scale=scale)


def test_loss_ema_is_nanochats():
    """smooth = 0.9 smooth + 0.1 loss; reported smooth / (1 - 0.9^(step + 1)) (base_train.py)."""
    losses = [5.0, 4.0, 4.5, 3.0]
    ema = LossEMA("cpu")
    smooth = 0.0
    for step, x in enumerate(losses):
        ema.update(torch.tensor(x))
        smooth = 0.9 * smooth + 0.1 * x
        # float64 on both sides, a few operations on losses ~5: 1e-15
        assert ema.value().item() == pytest.approx(smooth / (1 - 0.9 ** (step + 1)), abs=1e-12)
    assert ema.value().item() != pytest.approx(sum(losses) / len(losses))


def test_loss_ema_in_the_log(data_dir, tmp_path):
    """One process, one micro-step: the last micro-batch is the step's batch, so the logged EMA is
    nanochat's EMA of the logged losses."""
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_iters=6", "--eval_interval=6"))
    trains = [r for r in read_log(out) if r["type"] == "train"]
    smooth = 0.0
    for k, r in enumerate(trains, 1):
        smooth = 0.9 * smooth + 0.1 * r["loss"]
        # float64 EMAs of the same (logged) losses on both sides: a few u = 1e-16
        assert r["loss_ema"] == pytest.approx(smooth / (1 - 0.9 ** k), rel=1e-12)


def test_d12_configs():
    def load(name):
        cfg = configurator.load(config.KEYS, [os.path.join(REPO, "configs", name)])
        config.build(cfg)
        return cfg
    nano, krom = load("nanochat_d12.py"), load("kromhc_d12.py")
    for cfg in (nano, krom):
        assert (cfg["dataset"], cfg["max_iters"], cfg["param_data_ratio"], cfg["embedding_dtype"]) == \
            ("fineweb_edu-65536", -1, 20, "bfloat16")
        assert (cfg["arch"], cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["total_batch_tokens"]) == \
            ("nanochat", 12, 768, 2048, 524_288)
        assert (cfg["beta1"], cfg["beta2"], cfg["adam_eps"], cfg["grad_clip"], cfg["warmup_iters"]) == \
            (0.8, 0.95, 1e-10, 1.0, 0)
    assert (nano["nanochat_init"], nano["muon_weight_decay"], nano["embedding_lr"], nano["warmdown_frac"]) == \
        ("e1770a3", 0.0, 0.2, 0.2)
    assert (krom["nanochat_init"], krom["muon_weight_decay"], krom["embedding_lr"], krom["warmdown_frac"]) == \
        ("48abd7d", 0.2, 0.3, 0.4)
    assert (krom["learning_rate"], krom["hc_optimizer"], krom["matrix_lr"]) == (0.005, "adamw", 0.02)


def test_d12_budget_script(data_dir, bpe_data, capsys):
    import scripts.d12_budget as budget
    budget.main([str(data_dir), str(bpe_data), "--schemes", "plain", "kromhc"])
    out = capsys.readouterr().out
    meta = json.loads((bpe_data / "meta.json").read_text())["splits"]["train"]
    assert f"{meta['bytes'] / meta['tokens']:.3f} |" in out
    assert "| GPT-2's BPE (50,257) | plain | 162,201,600 | 6,187 | 3.244 B |" in out
    assert "| pydocs-4096 (4,096) | kromhc | 92,184,936 | 3,516 | 1.843 B |" in out
