"""Extra parameters of each residual scheme, counted on the real hc.py modules.

    python scripts/param_table.py                       # GPT-2 small: C = 768, 12 layers, n = 2, 4, 6, 8
    python scripts/param_table.py --dim 1024 --n-layer 24 --n-streams 4

Per connection and per model (two connections per block: attention and MLP), to check
against the papers (KromHC reports 1,843.8 K / 2,433.9 K / 958.8 K extra for mHC / mHC-lite /
KromHC on GPT-2 small at n = 4), and the readout="hc_head" readout (once per model, any n-stream scheme).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import hc  # noqa: E402
from common import HelpFormatter, positive_int, run_cli  # noqa: E402


def count(scheme, dim, n):
    """Parameters of one connection, or None where the scheme refuses this n. Built on the meta device:
    counted without memory (mhc at n = 64 holds 208M parameters per connection)."""
    try:
        with torch.device("meta"):
            conn = hc.make_connection(scheme, dim, n, layer_idx=0)
    except ValueError:
        return None
    return sum(p.numel() for p in conn.parameters())


def head_count(dim, n):
    with torch.device("meta"):
        return sum(p.numel() for p in hc.HCHead(dim, n, hc.SchemeConfig.hc_eps).parameters())


def streams(text):
    """argparse type of --n-streams: an integer >= 2 (n = 1 is the plain residual: nothing extra to count)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {n} (n = 1 is the plain residual, no extra parameters)")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--dim", type=positive_int, default=768, help="model width C")
    ap.add_argument("--n-layer", type=positive_int, default=12, help="transformer blocks (2 connections each)")
    ap.add_argument("--n-streams", type=streams, nargs="+", default=[2, 4, 6, 8])
    args = ap.parse_args(argv)
    args.n_streams = list(dict.fromkeys(args.n_streams))  # each n once
    return run_cli(lambda: table(args), "param_table.py")


def table(args):
    print(f"extra parameters per connection / per model (C = {args.dim}, {args.n_layer} layers, "
          f"{2 * args.n_layer} connections)\n")
    print("| scheme | n | per connection | per model | per model (K) |")
    print("|---|---|---|---|---|")
    for scheme in hc.SCHEMES[1:]:
        for n in args.n_streams:
            c = count(scheme, args.dim, n)
            if c is None:
                print(f"| {scheme} | {n} | refused | refused | - |")
                continue
            total = 2 * args.n_layer * c
            print(f"| {scheme} | {n} | {c:,} | {total:,} | {total / 1e3:,.1f} |")
    print("\nreadout='hc_head' (hc.HCHead, once per model, added to any n-stream scheme's count)\n")
    print("| readout | n | per model |")
    print("|---|---|---|")
    for n in args.n_streams:
        print(f"| hc_head | {n} | {head_count(args.dim, n):,} |")


if __name__ == "__main__":
    main()
