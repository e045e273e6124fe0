"""One command for a GPU node: is the fused path right on this GPU, and how fast is it?

    python scripts/gpu_check.py                      # on a GPU node; about 15-20 minutes on one H100, plus the
                                                     # peer rows (12 more compiled models; not yet timed)
    python scripts/gpu_check.py --out /tmp/gc.json   # where the JSON report goes (default gpu_check.json)
    python scripts/gpu_check.py --interpret          # the same checks, small shapes, Triton's CPU interpreter

Four parts, each PASS or FAIL, then one verdict line (PASS only if all four pass):

  tests     pytest on the CUDA test cases (-k cuda: the kernels compiled, the CUDA training test, the
            safety net at GPT-2 small shapes)
  compare   every scheme's fused connection against the torch path and an fp64 reference at GPT-2
            small shapes (C 768, n 4, 8192 tokens), fp32 and bf16 streams, bf16 autocast, TF32 on:
            the output and every gradient within 4x the torch path's own error + a floor
            (hc_verify.check_connection, the check train.py runs at start)
  training  a small model (4 layers, d 256, n 4, B 16, T 256) trained 200 steps with fused on and
            off, and a third run on the torch path whose initial weights are moved by one bf16
            rounding (relative 2^-9). That third run is the bf16 noise of this training: two
            runs that differ only in rounding drift apart chaotically. Pass: the loss curves'
            20-step window means of fused and torch differ by at most 3x the largest window gap
            between torch and its perturbed copy (or 0.01 nats, whichever is larger), the first
            losses (the same weights, before any update) agree within 0.01, and the model learns.
  bench     scripts/bench.py: GPT-2 small, every scheme against plain, with --sync-compare; kromhc
            with each recompute choice; d_model 2048; --peers: hcgpt's torch and fused paths beside
            Liger-Kernel's and lucidrains' HC / mHC in the same model (docs/peers.md; a peer that is
            not installed or fails is a row that says so and fails nothing). It passes if hcgpt's
            rows ran; the speed and memory targets are reported beside the verdict (they measure
            speed, not correctness), the peer table last before it.

--interpret shrinks everything (C 40, 24 tokens, a 1-layer model for 6 steps, a tiny bench) so
that CI exercises this script on a CPU in well under a minute; its pytest part selects the CUDA
cases of tests/test_gpu_path.py only, which skip there. Without CUDA and without --interpret the
script says so and exits with status 2.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = ("hc", "mhc", "mhc_lite", "kromhc")
# bench.py ratios to plain (the targets of docs/speed.md, GPT-2 small, B 16, T 1024, n 4, one H100)
TARGETS = {"hc": 1.20, "mhc_lite": 1.20, "kromhc": 1.20, "mhc": 1.30}
MEM_TARGET, D2048_TARGET = 1.35, 1.10

GPU = dict(C=768, n=4, tokens=8192, train=dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch=16, steps=200,
                                               window=20, vocab=512, lr=1e-3, warmup=20, batches=None,
                                               schemes=SCHEMES))
INTERPRET = dict(C=40, n=4, tokens=24, train=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch=2, steps=6,
                                                  window=2, vocab=64, lr=1e-2, warmup=1, batches=1,
                                                  schemes=("kromhc",)))   # one batch, memorised: it learns in 6 steps


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------
# the parts

def part_tests(interpret):
    env = dict(os.environ)
    if interpret:
        targets = ["tests/test_gpu_path.py"]
        env["TRITON_INTERPRET"] = "1"
    else:
        targets = ["tests"]
        env.pop("TRITON_INTERPRET", None)   # compiled kernels
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", *targets]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    return {"ok": proc.returncode == 0, "command": " ".join(cmd[1:]), "summary": summary,
            "reason": None if proc.returncode == 0 else f"pytest exit {proc.returncode}: {summary}",
            "output_tail": proc.stdout[-4000:] if proc.returncode else ""}


def part_compare(shapes, autocast_dtype):
    import torch
    import hc
    import hc_verify
    device = "cpu" if shapes is INTERPRET else "cuda"
    cases = []
    for scheme in SCHEMES:
        for stream_dtype in (torch.float32, torch.bfloat16):
            conn = hc.make_connection(scheme, shapes["C"], shapes["n"], 1,
                                      sinkhorn_iters=5 if device == "cpu" else 20).to(device)
            r = hc_verify.check_connection(conn, shapes["tokens"], stream_dtype, autocast_dtype)
            errs = list(r["errors"].values())
            cases.append({"scheme": scheme, "stream_dtype": str(stream_dtype).replace("torch.", ""), "ok": r["ok"],
                          "reason": r["reason"], "max_err_fused": max((e[0] for e in errs), default=None),
                          "max_err_torch": max((e[1] for e in errs), default=None)})
            log(f"  compare {scheme:8s} {cases[-1]['stream_dtype']:8s} {'ok' if r['ok'] else 'FAIL: ' + r['reason']}")
    bad = [f"{c['scheme']}/{c['stream_dtype']}" for c in cases if not c["ok"]]
    return {"ok": not bad, "reason": f"mismatch in {', '.join(bad)}" if bad else None, "cases": cases}


def markov_task(vocab, batch, T, step, seed=1234):
    """A learnable stream of batches: a fixed random Markov chain in which every token has 4 equally
    likely successors (the loss falls smoothly from ln(vocab) towards ln 4, no sudden transitions)."""
    import torch
    succ = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 100003 + step)
    seq = torch.empty(batch, T + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    pick = torch.randint(0, 4, (batch, T), generator=g)
    for t in range(T):
        seq[:, t + 1] = succ[seq[:, t], pick[:, t]]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def train_curve(scheme, t, fused, device, perturb=0.0):
    import torch
    import hc_verify
    import optim
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=t["block_size"], vocab_size=t["vocab"], n_layer=t["n_layer"], n_head=t["n_head"],
                    n_embd=t["n_embd"], scheme=scheme, n_streams=4, sinkhorn_iters=5 if device == "cpu" else 20,
                    fused=fused)
    model = GPT(cfg).to(device)
    if perturb:   # one bf16 rounding's worth of noise on every weight
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * (2 * torch.randint(0, 2, p.shape, generator=g) - 1).to(device, p.dtype))
    autocast = torch.bfloat16
    if fused == "on" and device == "cuda":   # as train.py does (the compare part covers the interpreter)
        hc_verify.verify_fused(model, autocast_dtype=autocast)
    opt = optim.build(model, optim.OptimConfig(weight_decay=0.1, learning_rate=t["lr"]), device)
    losses = []
    for step in range(t["steps"]):
        lr = t["lr"] * min(1.0, (step + 1) / t["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (a.to(device) for a in markov_task(t["vocab"], t["batch"], t["block_size"],
                                                          step % (t["batches"] or t["steps"])))
        with torch.autocast(device, dtype=autocast):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [v.item() for v in losses]


def window_means(curve, w):
    return [sum(curve[i:i + w]) / len(curve[i:i + w]) for i in range(0, len(curve), w)]


def compare_curves(fused, torch_, noisy, window):
    """The rule of the docstring: returns (ok, reason, numbers)."""
    wf, wt, wn = (window_means(c, window) for c in (fused, torch_, noisy))
    gap = max(abs(a - b) for a, b in zip(wf, wt))
    noise = max(abs(a - b) for a, b in zip(wt, wn))
    allowed = max(3 * noise, 0.01)
    first = abs(fused[0] - torch_[0])
    numbers = {"gap": gap, "noise": noise, "allowed": allowed, "first_loss_diff": first,
               "first_window": wt[0], "last_window": wt[-1]}
    problems = []
    if not all(math.isfinite(v) for v in fused + torch_):
        problems.append("a loss is not finite")
    if first > 0.01:
        problems.append(f"first losses differ by {first:.4f} > 0.01")
    if not gap <= allowed:
        problems.append(f"window means differ by {gap:.4f} > {allowed:.4f} (3 x bf16 noise {noise:.4f}, floor 0.01)")
    if not wt[-1] < wt[0] - 0.1:
        problems.append(f"the model did not learn ({wt[0]:.3f} -> {wt[-1]:.3f})")
    return not problems, "; ".join(problems) or None, numbers


def part_training(shapes, device):
    t = shapes["train"]
    runs = []
    for scheme in t["schemes"]:
        fused = train_curve(scheme, t, "on", device)
        torch_ = train_curve(scheme, t, "off", device)
        noisy = train_curve(scheme, t, "off", device, perturb=2.0 ** -9)
        ok, reason, numbers = compare_curves(fused, torch_, noisy, t["window"])
        runs.append({"scheme": scheme, "ok": ok, "reason": reason, **numbers,
                     "curves": {"fused": fused, "torch": torch_, "torch_perturbed": noisy}})
        log(f"  training {scheme:8s} {'ok' if ok else 'FAIL: ' + reason} (window gap {numbers['gap']:.4f}, "
            f"bf16 noise {numbers['noise']:.4f}, loss {numbers['first_window']:.3f} -> {numbers['last_window']:.3f})")
    bad = [r["scheme"] for r in runs if not r["ok"]]
    return {"ok": not bad, "reason": "; ".join(f"{r['scheme']}: {r['reason']}" for r in runs if not r["ok"]) or None,
            "config": {k: v for k, v in t.items() if k != "schemes"}, "runs": runs}


def bench(args, interpret):
    env = dict(os.environ)
    if interpret:
        env.pop("TRITON_INTERPRET", None)   # the bench times the CPU torch path
    cmd = [sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--json", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.py {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def part_bench(interpret):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import bench as bench_module
    if interpret:
        tiny = ["--device", "cpu", "--model", "tiny", "--n-streams", "2", "--batch-size", "2", "--seq-len", "16",
                "--steps", "1", "--warmup", "0"]
        runs = {"schemes": tiny + ["--schemes", "kromhc", "--sync-compare", "--recompute", "none", "connections", "blocks"]}
    else:
        runs = {"schemes": ["--schemes", *SCHEMES, "--sync-compare"],
                "recompute": ["--schemes", "kromhc", "--recompute", "connections", "blocks"],
                "d2048": ["--model", "d2048", "--batch-size", "8", "--schemes", "kromhc"]}
    reports, tables = {}, []
    for name, a in runs.items():
        log(f"  bench {' '.join(a)}")
        reports[name] = bench(a, interpret)
        tables.append(bench_module.table(reports[name]))
    errors = [f"{name}: {r['scheme']} {r['error']}" for name, rep in reports.items() for r in rep["results"]
              if "error" in r]
    # the peers (docs/peers.md): hcgpt's rows must run; a peer's failure or absence is reported, not failed
    a = ["--peers", "--tiny", "--schemes", "kromhc"] if interpret else ["--peers"]
    log(f"  bench {' '.join(a)}")
    peer_report = bench(a, interpret)
    tables.append(bench_module.peer_table(peer_report))
    errors += [f"peers: {r['name']} {r['error']}" for r in peer_report["rows"]
               if "error" in r and r["name"] not in bench_module.peers.PEERS]
    return {"ok": not errors, "reason": "; ".join(errors) or None, "reports": reports, "peers": peer_report,
            "tables": tables, "targets": [] if interpret else targets(reports)}


def targets(reports):
    """The speed and memory targets against this run's numbers."""
    out = []
    rows = {(r["scheme"], r.get("recompute", "none")): r for rep in reports.values() for r in rep["results"]
            if r.get("x_plain") is not None and rep is not reports.get("d2048")}
    for scheme, limit in TARGETS.items():
        r = rows.get((scheme, "none"))
        if r:
            out.append({"what": f"{scheme} step time x plain", "value": r["x_plain"], "limit": limit,
                        "met": r["x_plain"] <= limit})
    for (scheme, recompute), r in rows.items():
        if scheme != "plain" and r.get("mem_x_plain") is not None:
            out.append({"what": f"{scheme} ({recompute}) peak memory x plain", "value": r["mem_x_plain"],
                        "limit": MEM_TARGET, "met": r["mem_x_plain"] <= MEM_TARGET})
    for r in reports.get("d2048", {}).get("results", []):
        if r["scheme"] != "plain" and r.get("x_plain") is not None:
            out.append({"what": f"d2048 {r['scheme']} step time x plain", "value": r["x_plain"],
                        "limit": D2048_TARGET, "met": r["x_plain"] <= D2048_TARGET})
    return out


# ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true",
                    help="run the checks at small shapes on the CPU, the kernels in Triton's interpreter")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    ap.add_argument("--skip", nargs="+", default=[], choices=["tests", "compare", "training", "bench"],
                    help="parts not to run (they count as not passed; default: none)")
    args = ap.parse_args(argv)
    if args.interpret:   # before Triton's first import, which builds its library for one mode or the other
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, REPO)
    import rundir
    from errors import ConfigError
    try:
        rundir.check_output(args.out)  # now, not after the checks
    except ConfigError as e:
        ap.error(f"argument --out: {e}")
    import torch
    if not args.interpret and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU node, or "
              "add --interpret for the same checks at small shapes in Triton's CPU interpreter", file=sys.stderr)
        return 2
    shapes = INTERPRET if args.interpret else GPU
    device = "cpu" if args.interpret else "cuda"
    if device == "cuda":  # as train.py on CUDA; the kernels follow it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        import triton
    except ImportError as e:
        print(f"gpu_check: Triton is not importable ({e}); the fused kernels need it: pip install triton", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "interpret": args.interpret, "parts": {}}
    parts = {"tests": lambda: part_tests(args.interpret),
             "compare": lambda: part_compare(shapes, torch.bfloat16),
             "training": lambda: part_training(shapes, device),
             "bench": lambda: part_bench(args.interpret)}
    for name, run in parts.items():
        if name in args.skip:
            report["parts"][name] = {"ok": False, "reason": "skipped (--skip)"}
            continue
        log(f"gpu_check: {name} ...")
        t0 = time.perf_counter()
        try:
            result = run()
        except Exception as e:   # a part that crashes fails; the others still run
            result = {"ok": False, "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = result
        log(f"gpu_check: {name} {'PASS' if result['ok'] else 'FAIL: ' + str(result['reason'])} ({result['seconds']} s)")
    bench_part = report["parts"].get("bench", {})
    for table in bench_part.get("tables", []):
        log("\n" + table)
    failed = [name for name, r in report["parts"].items() if not r["ok"]]
    report["verdict"] = "FAIL" if failed else "PASS"
    report["failed"] = failed
    n_targets = len(bench_part.get("targets", []))
    missed = [t for t in bench_part.get("targets", []) if not t["met"]]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    line = f"gpu_check: {report['verdict']}" + (f" ({', '.join(failed)} failed)" if failed else
                                                 " (tests, compare, training, bench)")
    if n_targets:
        line += f"; speed/memory targets met {n_targets - len(missed)}/{n_targets}" + "".join(
            f"; {t['what']} {t['value']:.2f} > {t['limit']:.2f}" for t in missed)
    print(line + f"; report {args.out}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
