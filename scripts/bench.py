"""Step time, throughput, MFU and peak memory of each residual scheme against plain, in one process.

    python scripts/bench.py                                    # GPT-2 small, B 16, T 1024, n 4, bf16, compiled
    python scripts/bench.py --schemes kromhc mhc --model d2048 --batch-size 8
    python scripts/bench.py --fused off                        # the torch reference path of hc.py
    python scripts/bench.py --device cpu --json                # CPU: tiny model, fp32, eager (tests the code path)
    python scripts/bench.py --schemes kromhc --recompute none connections blocks   # activation memory
    python scripts/bench.py --sync-compare                     # also time train.py's old per-step host sync
    python scripts/bench.py --peers                            # beside Liger-Kernel's and lucidrains' HC / mHC
    python scripts/bench.py --peers --tiny                     # the same rows at toy sizes on the CPU

Method (docs/speed.md): plain and every scheme are built from model.py with the same size,
batch, sequence length and compile mode, trained on the same random tokens with AdamW (fused
on CUDA), warmed up (compile, autotune), then timed over --steps optimizer steps with the device
synchronized around the timed region. Ratios to plain come from this one run; absolute times
only mean something on the GPU. MFU = (6 x parameters except position embeddings + 12 x layers
x d_model x seq_len) x tokens/s / the device's dense bf16 peak, printed only for known devices.
Peak memory is torch.cuda.max_memory_allocated; on CPU it is not measured (n/a).
Each step is train.py's: backward, gradient clipping, the device-side NaN/inf flag, AdamW.
Before timing, the fused kernels are checked against the torch path (hc_verify.verify_fused), so the
path column says what ran. --sync-compare also times each model with the host synchronized
every step (train.py's former loss.item() / grad_norm.item()): column "ms +sync" (both timed
three times, alternating, medians reported). Forward and backward ms are timed inside the timed
steps (CUDA events, no host sync); the rest of a step is clipping, the flag and AdamW.

--peers (docs/peers.md): one run times plain; hcgpt's torch path (fused "off") and fused path
("on") for every scheme; Liger-Kernel's LigerMHC and lucidrains' HC and mHC wired into the same
model (scripts/peers.py). A peer that is not installed is a row that says so. --tiny: those rows
(or the scheme rows) at toy sizes on the CPU, the fused kernels and Liger's in Triton's interpreter:
it proves every row runs, its times mean nothing.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hc  # noqa: E402
import hc_verify  # noqa: E402
import optim  # noqa: E402
from scripts import peers  # noqa: E402  (imports no peer until a row needs it)
from common import HelpFormatter, bf16_peak, flag_nonfinite, positive_int  # noqa: E402
from errors import ConfigError  # noqa: E402
from model import GPT, GPTConfig, RECOMPUTE  # noqa: E402
from optim import OptimConfig  # noqa: E402

MODELS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512),      # CPU, tests
    "toy": dict(n_layer=1, n_head=2, n_embd=32, vocab_size=256),       # --tiny: the interpreter's kernels
    "S": dict(n_layer=6, n_head=8, n_embd=512),                         # mHC-lite paper's S
    "M": dict(n_layer=12, n_head=12, n_embd=768),                       # GPT-2 small
    "L": dict(n_layer=24, n_head=16, n_embd=1024),                      # GPT-2 medium
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1.5B": dict(n_layer=48, n_head=25, n_embd=1600),
    "d2048": dict(n_layer=24, n_head=16, n_embd=2048),                  # the d_model 2048, 24-layer target
}
MODELS.update({"124M": MODELS["M"], "350M": MODELS["L"]})

def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device):
    """Free a row's memory and compiled graphs: the next row compiles afresh, as a separate run would."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


class Marks:
    """Time stamps inside the timed steps without a host sync: CUDA events on a GPU, the host clock on a
    CPU (which runs synchronously)."""

    def __init__(self, device):
        self.cuda, self.steps = device.type == "cuda", []

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mean_ms(self, i, j):
        """Mean ms from stamp i to stamp j of each step (read after the device is synchronized)."""
        ms = [a.elapsed_time(b) if self.cuda else 1e3 * (b - a) for a, b in ((s[i], s[j]) for s in self.steps)]
        return sum(ms) / len(ms)


def model_config(scheme, args, recompute, fused=None):
    """The GPTConfig of one row: --model's shape at --seq-len, the scheme at --n-streams, fused (--fused)."""
    return GPTConfig(**MODELS[args.model], block_size=args.seq_len, scheme=scheme, recompute=recompute,
                     n_streams=1 if scheme == "plain" else args.n_streams, stream_dtype=args.stream_dtype,
                     sinkhorn_iters=args.sinkhorn_iters, fused=fused or args.fused)


def bench_one(scheme, recompute, args, device, peer=None, fused=None):
    """One model's row; peer: a key of peers.PEERS whose connections replace hcgpt's; fused: the row's path."""
    torch.manual_seed(args.seed)
    cfg = model_config(scheme, args, recompute, fused)
    model = GPT(cfg).to(device)
    if peer:
        peers.wire(model, peer)
    optimizer = optim.build(model, OptimConfig(weight_decay=0.1, learning_rate=6e-4), device.type)
    check = hc_verify.verify_fused(model, tokens=args.verify_tokens,
                                   autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None)
    if peer:
        check = dict(path="peer", reason=None)
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    nonfinite = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=device)

    def step(host_sync=False, marks=None):   # train.py's step: no host sync unless asked (its former NaN check)
        nonlocal nonfinite
        stamps = [marks.now()] if marks else None
        with autocast:
            _, loss = forward(x, y)
        if marks:
            stamps.append(marks.now())
        loss.backward()
        if marks:
            stamps.append(marks.now())
            marks.steps.append(stamps)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if host_sync:
            loss.item(), norm.item()
        nonfinite = flag_nonfinite(nonfinite, 1, loss.detach(), norm, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(host_sync, marks=None):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(host_sync, marks)
        sync(device)
        return (time.perf_counter() - t0) / args.steps, loss

    result = dict(scheme=scheme, n_streams=cfg.n_streams, recompute=recompute, path=check["path"],
                  path_reason=check["reason"], params=model.num_params(non_embedding=False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    marks = Marks(device)
    dt, loss = timed(False, marks)
    if args.sync_compare:   # alternate the two, three times each, and take the medians: fair on a noisy machine
        times = {False: [dt], True: []}
        for host_sync in (True, False, True, False, True):
            times[host_sync].append(timed(host_sync)[0])
        dt, sync_dt = (sorted(times[k])[1] for k in (False, True))
        result["ms_per_step_sync"] = 1e3 * sync_dt
    tokens_per_s = args.batch_size * args.seq_len / dt
    peak = bf16_peak(device_name(device))
    flops_per_token = model.estimate_flops_per_token(args.seq_len)
    result.update(ms_per_step=1e3 * dt, fwd_ms=marks.mean_ms(0, 1), bwd_ms=marks.mean_ms(1, 2),
                  tokens_per_s=tokens_per_s, mfu=flops_per_token * tokens_per_s / peak if peak else None,
                  peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  loss=loss.item())
    del model, optimizer, forward
    release(device)
    return result


def run(args):
    device = torch.device(args.device)
    results = []
    runs = [("plain", "none")] + [(s, r) for s in args.schemes for r in args.recompute if (s, r) != ("plain", "none")]
    for scheme, recompute in runs:   # plain without recomputation first: the baseline of every ratio
        try:
            results.append(bench_one(scheme, recompute, args, device))
        except torch.cuda.OutOfMemoryError:
            release(device)
            results.append(dict(scheme=scheme, n_streams=args.n_streams, recompute=recompute, error="out of memory"))
    base = results[0]
    for r in results:
        if "error" in r or "error" in base:
            continue
        r["x_plain"] = r["ms_per_step"] / base["ms_per_step"]
        r["mem_x_plain"] = r["peak_mem_gib"] / base["peak_mem_gib"] if base["peak_mem_gib"] else None
    config = dict(device=device_name(device), torch=torch.__version__, model=args.model, **MODELS[args.model],
                  batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, stream_dtype=args.stream_dtype,
                  compile=args.compile, fused=args.fused, recompute=args.recompute, sync_compare=args.sync_compare,
                  sinkhorn_iters=args.sinkhorn_iters, warmup=args.warmup, steps=args.steps,
                  peak_bf16_flops=bf16_peak(device_name(device)))
    return dict(config=config, results=results)


def run_peers(args):
    """plain; hcgpt torch and fused per scheme; each peer: rows named as the table prints them."""
    device = torch.device(args.device)
    plan = [("plain", "plain", "off", None)]
    plan += [(f"hcgpt {s} {path}", s, fused, None) for s in args.schemes if s != "plain"
             for path, fused in (("torch", "off"), ("fused", "on"))]
    plan += [(name, scheme, "off", name) for name, (_, scheme, _) in peers.PEERS.items()]
    rows = []
    for name, scheme, fused, peer in plan:
        row = dict(name=name, scheme=scheme, n_streams=1 if scheme == "plain" else args.n_streams)
        why = peer and peers.missing(peer)
        if why:
            rows.append(dict(row, note=why))
            continue
        try:
            r = bench_one(scheme, "none", args, device, peer=peer, fused=fused)
            rows.append(dict(row, path=r["path"], ms=r["ms_per_step"], fwd_ms=r["fwd_ms"], bwd_ms=r["bwd_ms"],
                             peak_gib=r["peak_mem_gib"], params=r["params"], loss=r["loss"]))
        except Exception as e:   # one row's failure (out of memory, a peer that does not compile) is that row's
            release(device)
            msg = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"
            rows.append(dict(row, error=msg.strip().splitlines()[0][:300]))
    base = rows[0]
    for r in rows:
        ok = "ms" in r and "ms" in base
        r["step_x"] = r["ms"] / base["ms"] if ok else None
        r["mem_x"] = r["peak_gib"] / base["peak_gib"] if ok and base["peak_gib"] else None
    config = dict(device=device_name(device), torch=torch.__version__, model=args.model, **MODELS[args.model],
                  n_streams=args.n_streams, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                  stream_dtype=args.stream_dtype, compile=args.compile, warmup=args.warmup, steps=args.steps,
                  sinkhorn_iters=args.sinkhorn_iters, versions=peer_versions())
    return dict(config=config, rows=rows)


def peer_versions():
    out = {}
    for dist in ("liger-kernel", "hyper-connections", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


CPU_NOTE = ("CPU times check the code path; they do not predict the ratios on a GPU, where the stream operations are "
            "memory-bound, the fused kernels run and bf16 and torch.compile apply: measure on the GPU itself")


def cpu_note(report):
    return [CPU_NOTE] if report["config"]["device"].startswith("cpu") else []


def peer_table(report):
    c = report["config"]
    v = ", ".join(f"{k} {ver or 'not installed'}" for k, ver in c["versions"].items())
    lines = [f"{c['device']}, torch {c['torch']}, {v}: model {c['model']} ({c['n_layer']} layers, d_model "
             f"{c['n_embd']}), n {c['n_streams']}, B {c['batch_size']}, T {c['seq_len']}, {c['dtype']} compute, "
             f"{c['stream_dtype']} streams, {'compiled' if c['compile'] else 'eager'}, Sinkhorn {c['sinkhorn_iters']} "
             f"iterations, {c['warmup']} warmup + {c['steps']} timed steps", "",
             "| row | path | ms/step | x plain | fwd ms | bwd ms | peak GiB | mem x plain |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for r in report["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['name']} | | {r.get('error') or r.get('note')} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['path']} | {r['ms']:.1f} | {fmt(r['step_x'], '.2f')} | {r['fwd_ms']:.1f} | "
                     f"{r['bwd_ms']:.1f} | {fmt(r['peak_gib'], '.2f')} | {fmt(r['mem_x'], '.2f')} |")
    return "\n".join(lines + cpu_note(report))


def table(report):
    c = report["config"]
    lines = [f"{c['device']}, torch {c['torch']}: model {c['model']} ({c['n_layer']} layers, d_model {c['n_embd']}), "
             f"B {c['batch_size']}, T {c['seq_len']}, {c['dtype']} compute, {c['stream_dtype']} streams, "
             f"{'compiled' if c['compile'] else 'eager'}, fused={c['fused']}, "
             f"{c['warmup']} warmup + {c['steps']} timed steps", "",
             "| scheme | n | path | ms/step | x plain | tokens/s | MFU | peak GiB | mem x plain |"
             + (" ms +sync |" if c.get("sync_compare") else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if c.get("sync_compare") else "")]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    rate = lambda v: f"{v / 1e3:,.1f}k" if v >= 1e3 else f"{v:.1f}"  # noqa: E731
    for r in report["results"]:
        name = r["scheme"] + ("" if r.get("recompute", "none") == "none" else f" +{r['recompute']}")
        if "error" in r:
            lines.append(f"| {name} | {r['n_streams']} | | {r['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {r['n_streams']} | {r['path']} | {r['ms_per_step']:.1f} | "
                     f"{fmt(r.get('x_plain'), '.2f')} | {rate(r['tokens_per_s'])} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['peak_mem_gib'], '.2f')} | {fmt(r.get('mem_x_plain'), '.2f')} |"
                     + (f" {r['ms_per_step_sync']:.1f} |" if "ms_per_step_sync" in r else ""))
    reasons = {r["path_reason"] for r in report["results"] if r.get("path") in ("torch", "mixed")}
    lines += [f"torch path: {why}" for why in sorted(reasons)]
    return "\n".join(lines + cpu_note(report))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--schemes", nargs="+", default=["hc", "mhc", "mhc_lite", "kromhc"], choices=hc.SCHEMES,
                    help="schemes to compare with plain (always run first)")
    ap.add_argument("--n-streams", type=positive_int, default=4)
    ap.add_argument("--model", default=None, choices=sorted(MODELS), help="default: 124M on CUDA, tiny on CPU")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="default: 16 on CUDA, 4 on CPU")
    ap.add_argument("--seq-len", type=positive_int, default=None, help="default: 1024 on CUDA, 64 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 20 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on CUDA only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="compute: bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--stream-dtype", choices=["bfloat16", "float32"], default=None,
                    help="residual stream dtype, plain and n-stream alike (default: the compute dtype)")
    ap.add_argument("--fused", choices=["auto", "on", "off"], default="auto", help="the connections' fused path (train.py's fused key)")
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=["none"],
                    help="activation recomputation (train.py's recompute key); several: one row each")
    ap.add_argument("--sync-compare", action="store_true",
                    help="also time each model with a host sync every step (train.py's former NaN check)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    ap.add_argument("--peers", action="store_true",
                    help="rows for plain, hcgpt's torch and fused path per scheme, Liger's and lucidrains' HC / mHC "
                         "(docs/peers.md; recompute none, --fused and --sync-compare do not apply)")
    ap.add_argument("--sinkhorn-iters", type=int, default=None,
                    help="Sinkhorn iterations of mhc and of the peers' mHC alike (default 20, all three's default)")
    ap.add_argument("--tiny", action="store_true",
                    help="toy sizes on the CPU (model toy, B 2, T 16, 4 Sinkhorn iterations, 1 step; the kernels "
                         "in Triton's interpreter): proves every row runs")
    args = ap.parse_args(argv)
    if args.tiny:
        if args.model or args.batch_size or args.seq_len or args.device not in ("cpu", ap.get_default("device")):
            ap.error("--tiny sets the device, model, batch size and sequence length itself; drop those arguments")
        args.device, args.model, args.batch_size, args.seq_len = "cpu", "toy", 2, 16
        args.steps, args.warmup = args.steps or 1, 0 if args.warmup is None else args.warmup
        args.sinkhorn_iters = args.sinkhorn_iters or 4
    args.sinkhorn_iters = args.sinkhorn_iters or 20
    if args.sinkhorn_iters < 1:
        ap.error(f"argument --sinkhorn-iters: must be >= 1, got {args.sinkhorn_iters}")
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError:
        ap.error(f"argument --device: {args.device!r} is not a device name; use cpu, cuda or cuda:N")
    if cuda and not torch.cuda.is_available():
        ap.error(f"argument --device: {args.device}: this machine has no CUDA device; use --device cpu")
    if cuda:  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    defaults = dict(model="124M" if cuda else "tiny", batch_size=16 if cuda else 4, seq_len=1024 if cuda else 64,
                    steps=20 if cuda else 3, warmup=5 if cuda else 1, compile=cuda,
                    dtype="bfloat16" if cuda else "float32")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.stream_dtype = args.stream_dtype or args.dtype
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    args.verify_tokens = 4096 if cuda else 32   # the fused path's start check (32 tokens: the CPU's interpreter)
    if not cuda and (args.peers or args.tiny):
        # the fused kernels and Liger's run on a CPU only in Triton's interpreter, chosen at Triton's first import
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("Triton was imported before TRITON_INTERPRET=1 could be set; run bench.py as its own process")
        os.environ["TRITON_INTERPRET"] = "1"
    stream_dtype = torch.bfloat16 if args.stream_dtype == "bfloat16" else torch.float32
    for scheme in args.schemes:  # train.py's refusals, before anything is built or timed
        try:
            why = hc_verify.setup_error(model_config(scheme, args, "none"), MODELS[args.model]["n_embd"],
                                        torch.device(args.device).type, stream_dtype)
        except ConfigError as e:   # a scheme that cannot take this n, ...
            why = str(e)
        if why:
            ap.error(f"--schemes {scheme} --n-streams {args.n_streams} --fused {args.fused}: {why}")
    report = run_peers(args) if args.peers else run(args)
    print(json.dumps(report, indent=2) if args.json else (peer_table if args.peers else table)(report))
    return report


if __name__ == "__main__":
    main()
