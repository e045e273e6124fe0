"""Step time, throughput, MFU and peak memory of each residual scheme against plain, in one process.

    python scripts/bench.py                                    # GPT-2 small, B 16, T 1024, n 4, bf16, compiled
    python scripts/bench.py --schemes kromhc mhc --model d2048 --batch-size 8
    python scripts/bench.py --fused off                        # the torch reference path of hc.py
    python scripts/bench.py --device cpu --json                # CPU: tiny model, fp32, eager (tests the code path)
    python scripts/bench.py --schemes kromhc --recompute none connections blocks   # activation memory
    python scripts/bench.py --sync-compare                     # also time train.py's old per-step host sync
    python scripts/bench.py --peers                            # beside Liger-Kernel's and lucidrains' HC / mHC
    python scripts/bench.py --peers --tiny                     # the same rows at toy sizes on the CPU
    python scripts/bench.py --memory --device cpu              # activation bytes per token and layer, FLOPs

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

--memory (docs/speed.md): the activation bytes that backward keeps, per token and layer, for plain and each
scheme under each recompute choice, counted rather than timed, so a CPU gives the same numbers as a GPU
(for the same path, torch or fused). Defaults: the width of --model 124M, B 1, T 256, bf16 autocast (on a
CPU too), fp32 streams, eager. A 2k- and a k-layer model (k = 2; k = blocks per group where recompute
groups blocks) run forward + loss while a TorchDispatchMode notes every tensor storage an op creates;
the storages still alive after the forward, each once, are what backward keeps: what autograd saved and
what a checkpoint's selective cache holds (parameters, the inputs, the loss and what is made from
parameters alone, such as autocast's bf16 weight copies, are left out). Per layer per token =
(kept(2k) - kept(k)) / k / (B T): the embeddings and the head drop out. Beside it: the same count
through saved_tensors_hooks (what autograd's pack hook received; a selective checkpoint's cache is not
among it), the extra FLOPs of each recompute choice per layer (FlopCounterMode over forward + backward:
matmuls and attention only, no Triton kernel), and on CUDA the peak memory of a 2k-layer step.
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
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hc  # noqa: E402
import hc_verify  # noqa: E402
import optim  # noqa: E402
from scripts import peers  # noqa: E402  (imports no peer until a row needs it)
from common import HelpFormatter, bf16_peak, flag_nonfinite, positive_int, run_cli  # noqa: E402
from errors import ConfigError  # noqa: E402
from keys import declared  # noqa: E402
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


def model_config(scheme, args, recompute, fused=None, **shape):
    """The GPTConfig of one row: --model's shape (shape: keys to change) at --seq-len, the scheme at
    --n-streams, fused (--fused)."""
    return GPTConfig(**{**MODELS[args.model], **shape}, block_size=args.seq_len, scheme=scheme, recompute=recompute,
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


# ----------------------------------------------------------------------------------------
# --memory: what backward keeps, counted (docs/speed.md)

def storage_key(t):
    return t.untyped_storage()._cdata   # the storage itself: views and in-place results share it


class KeptStorages(TorchDispatchMode):
    """Notes, by weak reference, every tensor storage an op creates under this mode. Those still alive once
    the forward is done are what backward keeps, whoever holds them (autograd, a checkpoint's cache). The
    storages of `frozen` (parameters, buffers), and those ops make from them alone (autocast's bf16 weight
    copies), are not activations and are left out. A weak reference keeps its storage's address from
    being reused, so a key names one storage for the mode's life."""

    def __init__(self, frozen):
        super().__init__()
        self.frozen = {storage_key(t): StorageWeakRef(t.untyped_storage()) for t in frozen}
        self.made = {}   # key -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        from_frozen = bool(ins) and ins <= self.frozen.keys()
        for t in tree_leaves(out):
            key = storage_key(t) if isinstance(t, torch.Tensor) else None
            if key is None or key in ins or key in self.made or key in self.frozen:
                continue   # a view, an in-place result, a storage seen before
            s = t.untyped_storage()
            if from_frozen:
                self.frozen[key] = StorageWeakRef(s)
            else:
                self.made[key] = (StorageWeakRef(s), s.nbytes())
        return out


def kept_for_backward(forward, frozen):
    """Run forward() (-> the loss) and count what it leaves for backward -> (bytes of the storages it made
    that are still alive, each once; the bytes of those among them that autograd's pack hook received, the
    saved_tensors_hooks count; the loss). frozen: parameters and buffers; the loss is not counted."""
    packed = set()

    def pack(t):
        packed.add(storage_key(t))
        return t

    mode = KeptStorages(frozen)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        loss = forward()
    gc.collect()
    alive = {k: n for k, (ref, n) in mode.made.items() if not ref.expired() and k != storage_key(loss)}
    return sum(alive.values()), sum(n for k, n in alive.items() if k in packed), loss


def cpu_attention(query, key, value, *args, out_val=None, **kwargs):
    from torch.utils import flop_counter   # imports Triton: not before main has chosen its mode
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def cpu_attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
    from torch.utils import flop_counter
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# FlopCounterMode counts the GPU's attention kernels only; the CPU's gets the same formulas, so that a
# CPU's FLOPs are a GPU's
cpu_attention._get_raw = cpu_attention_backward._get_raw = True   # they take tensors, not shapes
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward}


def group_size(scheme, args, recompute):
    """Blocks per recompute group that model.py chooses at --model's depth, or None where recompute does not
    group blocks (the choices that GPTConfig's recompute_group applies to do)."""
    grouping = declared(GPTConfig).get("recompute_group")
    cfg = model_config(scheme, args, recompute)
    if grouping is None or not grouping.applies_to(cfg):
        return None
    with torch.device("meta"):   # the full-depth model only for its group size: no memory, no init work
        return GPT(cfg).recompute_group()


def memory_one(scheme, recompute, args, device):
    """One --memory row: a 2k- and a k-layer model (k = 2, or the smallest multiple >= 2 of the blocks per
    group that model.py chooses at --model's depth, set in both), each through one forward (counted by
    kept_for_backward) and backward under FlopCounterMode; on CUDA a second, uncounted step for the peak."""
    from torch.utils.flop_counter import FlopCounterMode   # imports Triton: not before main has chosen its mode
    group = group_size(scheme, args, recompute)
    k = 2 if group is None else group * -(-2 // group)   # whole groups in both models
    shape = {} if group is None else dict(recompute_group=group)   # not the shallow models' own choice
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    runs = {}
    for n_layer in (2 * k, k):
        torch.manual_seed(args.seed)
        cfg = model_config(scheme, args, recompute, n_layer=n_layer, **shape)
        model = GPT(cfg).to(device)
        check = hc_verify.verify_fused(model, tokens=args.verify_tokens,
                                       autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None)
        g = torch.Generator().manual_seed(args.seed)
        x, y = (torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
                for _ in range(2))

        def forward():
            with autocast:
                return model(x, y)[1]

        flops = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
        with flops:
            kept, packed, loss = kept_for_backward(forward, [*model.parameters(), *model.buffers()])
            loss.backward()
        del loss
        peak = None
        if device.type == "cuda" and n_layer == 2 * k:
            model.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats(device)
            forward().backward()
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        runs[n_layer] = dict(kept=kept, packed=packed, flops=flops.get_total_flops(), peak=peak)
        del model
    release(device)
    big, small, tokens = runs[2 * k], runs[k], args.batch_size * args.seq_len
    per_layer = lambda what: (big[what] - small[what]) / k   # noqa: E731
    return dict(scheme=scheme, n_streams=cfg.n_streams, recompute=recompute, group=group, layers=[2 * k, k],
                path=check["path"], path_reason=check["reason"], kept_bytes=[big["kept"], small["kept"]],
                kib_per_token_layer=per_layer("kept") / tokens / 2**10,
                hooks_kib_per_token_layer=per_layer("packed") / tokens / 2**10,
                flops_per_layer=per_layer("flops"), peak_mib=big["peak"])


def run_memory(args):
    """plain with recompute none first (the baseline of every ratio), then every scheme and choice; each
    scheme's none is measured too: its FLOPs are the baseline of the extra FLOPs."""
    device = torch.device(args.device)
    modes = ["none"] + [r for r in args.recompute if r != "none"]
    rows = [memory_one(s, r, args, device) for s in ["plain"] + [s for s in args.schemes if s != "plain"]
            for r in modes]
    base = rows[0]
    for r in rows:
        none = next(o for o in rows if o["scheme"] == r["scheme"] and o["recompute"] == "none")
        r["x_plain"] = r["kib_per_token_layer"] / base["kib_per_token_layer"]
        r["extra_flops"] = r["flops_per_layer"] / none["flops_per_layer"] - 1
    config = dict(device=device_name(device), torch=torch.__version__, model=args.model,
                  n_embd=MODELS[args.model]["n_embd"], n_head=MODELS[args.model]["n_head"],
                  vocab_size=model_config("plain", args, "none").vocab_size, depth=MODELS[args.model]["n_layer"],
                  n_streams=args.n_streams, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                  stream_dtype=args.stream_dtype, fused=args.fused, recompute=modes, sinkhorn_iters=args.sinkhorn_iters)
    return dict(config=config, rows=rows)


def memory_table(report):
    c = report["config"]
    lines = [f"{c['device']}, torch {c['torch']}: the width of model {c['model']} (d_model {c['n_embd']}, "
             f"{c['n_head']} heads, vocab {c['vocab_size']}), n {c['n_streams']}, B {c['batch_size']}, "
             f"T {c['seq_len']}, {c['dtype']} compute, {c['stream_dtype']} streams, eager, fused={c['fused']}. "
             f"Per layer: a 2k- minus a k-layer model, over k (k = 2, or the blocks per group where recompute "
             f"groups them at {c['depth']} layers)", "",
             "| scheme | recompute | path | KiB/token/layer | x plain | extra FLOPs | peak MiB | "
             "saved_tensors_hooks KiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        mode = r["recompute"] + (f" (groups of {r['group']})" if r["group"] else "")
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        lines.append(f"| {r['scheme']} | {mode} | {r['path']} | {r['kib_per_token_layer']:.1f} | {r['x_plain']:.2f} | "
                     f"{r['extra_flops']:+.1%} | {peak} | {r['hooks_kib_per_token_layer']:.1f} |")
    reasons = {r["path_reason"] for r in report["rows"] if r["path"] in ("torch", "mixed")}
    lines += [f"torch path: {why}" for why in sorted(reasons)]
    return "\n".join(lines + [MEMORY_NOTE])


MEMORY_NOTE = ("KiB/token/layer: the storages the forward made that are alive after it, each once (parameters, "
               "the inputs, the loss and what is made from parameters alone left out), the same on any device for "
               "the same path; x plain: against plain without recompute; extra FLOPs: forward + backward per layer "
               "(matmuls and attention, FlopCounterMode) above the scheme's none; peak MiB: a 2k-layer step, CUDA "
               "only; saved_tensors_hooks: the storages among them that autograd's pack hook received (a "
               "selective checkpoint's cache is not among them)")


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
    ap.add_argument("--model", default=None, choices=sorted(MODELS),
                    help="default: 124M on CUDA, tiny on CPU; --memory: 124M's width")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="default: 16 on CUDA, 4 on CPU; --memory: 1")
    ap.add_argument("--seq-len", type=positive_int, default=None,
                    help="default: 1024 on CUDA, 64 on CPU; --memory: 256")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 20 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on CUDA only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="compute: bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU; --memory: bf16)")
    ap.add_argument("--stream-dtype", choices=["bfloat16", "float32"], default=None,
                    help="residual stream dtype, plain and n-stream alike (default: the compute dtype; --memory: "
                         "float32)")
    ap.add_argument("--fused", choices=["auto", "on", "off"], default="auto", help="the connections' fused path (train.py's fused key)")
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=None,
                    help="activation recomputation (train.py's recompute key); several: one row each (default: "
                         "none; --memory: every choice)")
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
    ap.add_argument("--memory", action="store_true",
                    help="activation bytes kept for backward per token and layer, extra FLOPs of each recompute "
                         "choice, peak memory on CUDA: counted, not timed (the same on a CPU)")
    args = ap.parse_args(argv)
    if args.memory and (args.peers or args.sync_compare or args.compile or args.steps is not None
                        or args.warmup is not None):
        ap.error("--memory counts one eager forward and backward: --peers, --sync-compare, --compile, --steps and "
                 "--warmup do not apply to it; drop them")
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
                    dtype="bfloat16" if cuda else "float32", recompute=["none"])
    if args.memory:   # the same sizes on every device: the counts do not depend on it
        defaults.update(model="124M", batch_size=1, seq_len=256, compile=False, dtype="bfloat16",
                        stream_dtype="float32", recompute=list(RECOMPUTE))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.stream_dtype = args.stream_dtype or args.dtype
    if not args.memory and (args.steps < 1 or args.warmup < 0):
        ap.error("--steps must be >= 1 and --warmup >= 0")
    args.verify_tokens = 4096 if cuda else 32   # the fused path's start check (32 tokens: the CPU's interpreter)
    if not cuda and (args.peers or args.tiny or (args.memory and args.fused == "on")):
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
    run_report, show = (run_memory, memory_table) if args.memory else (run_peers, peer_table) if args.peers \
        else (run, table)

    def body():
        report = run_report(args)
        print(json.dumps(report, indent=2) if args.json else show(report))
        return report

    return run_cli(body, "bench.py")


if __name__ == "__main__":
    main()
