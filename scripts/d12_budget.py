"""The d12 training budget with each prepared dataset's tokenizer: bytes per token measured on the
data, and nanochat's step rule (20 x every parameter // 524,288 tokens per step) for every scheme.

    python scripts/d12_budget.py data/pydocs data/pydocs-4096
    python scripts/d12_budget.py data/fineweb_edu data/fineweb_edu-65536 --ratio 20

Bytes per token: the UTF-8 bytes of a split's text over its tokens, without the document tokens
(<|endoftext|> / <|bos|>, one per document) and with them (what a training window holds). The
byte budget is the token budget times the train split's bytes per token (with document tokens).
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import hc  # noqa: E402
from common import HelpFormatter, positive_int, run_cli  # noqa: E402
from data import tokenizer as toklib  # noqa: E402
from errors import ConfigError  # noqa: E402
from data.loader import load_meta  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optim import ratio_steps  # noqa: E402


def bytes_per_token(split):
    """(without, with) the document tokens."""
    return split["bytes"] / (split["tokens"] - split["documents"]), split["bytes"] / split["tokens"]


def d12_params(vocab_size, scheme):
    """Every parameter of hcgpt's nanochat d12 (n = 4 streams but plain) at a vocabulary padded to x64."""
    with torch.device("meta"):
        model = GPT(GPTConfig(arch="nanochat", n_layer=12, n_embd=768, n_head=6, block_size=2048, bias=False,
                              vocab_size=(vocab_size + 63) // 64 * 64, scheme=scheme,
                              n_streams=1 if scheme == "plain" else 4))
    return model.num_params(non_embedding=False)


def positive_number(text):
    """argparse type: a finite number > 0 (a ratio of 0, a negative or inf one gives no budget)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def read_meta(d):
    """A prepared dataset's meta.json; a ConfigError naming the directory and the fix."""
    if os.path.isfile(d):
        raise ConfigError(f"{d} is a file; pass prepared dataset directories (data/prepare.py's --out-dir, e.g. "
                          f"data/pydocs)")
    try:
        return load_meta(d)
    except ValueError as e:  # a damaged or foreign meta.json: its message says how to prepare it again
        raise ConfigError(str(e)) from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("data_dirs", nargs="+", help="prepared dataset directories (data/prepare.py)")
    ap.add_argument("--ratio", type=positive_number, default=20.0, help="tokens per parameter (nanochat: 20)")
    ap.add_argument("--batch-tokens", type=positive_int, default=524_288, help="tokens per step (nanochat: 524,288)")
    ap.add_argument("--schemes", nargs="+", default=list(hc.SCHEMES), choices=hc.SCHEMES)
    args = ap.parse_args(argv)

    def body():
        metas = [(d, read_meta(d)) for d in args.data_dirs]  # every directory checked before the table starts
        print("| data | tokenizer | vocab | val bytes/token (w/o, with BOS) | train bytes/token (w/o, with) |")
        print("|---|---|---:|---|---|")
        rows = []
        for d, meta in metas:
            name = toklib.describe(meta.get("tokenizer")).split(" (")[0]
            v, t = bytes_per_token(meta["splits"]["val"]), bytes_per_token(meta["splits"]["train"])
            print(f"| {d} | {name} | {meta['vocab_size']:,} | {v[0]:.3f}, {v[1]:.3f} | {t[0]:.3f}, {t[1]:.3f} |")
            rows.append((d, name, meta["vocab_size"], t[1]))
        print(f"\nd12 budget: {args.ratio:g} x parameters // {args.batch_tokens:,} tokens per step; bytes at the "
              f"train split's bytes per token\n")
        print("| tokenizer | scheme | parameters | steps | tokens | bytes |")
        print("|---|---|---:|---:|---:|---:|")
        for d, name, vocab, bpt in rows:
            for scheme in args.schemes:
                n = d12_params(vocab, scheme)
                steps = ratio_steps(n, args.ratio, args.batch_tokens)
                tokens = steps * args.batch_tokens
                print(f"| {name} ({vocab:,}) | {scheme} | {n:,} | {steps:,} | {tokens / 1e9:.3f} B | "
                      f"{tokens * bpt / 1e9:.2f} GB |")

    return run_cli(body, "d12_budget.py")


if __name__ == "__main__":
    main()
