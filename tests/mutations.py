"""Mutation check: plant plausible bugs in a copy of the repo, one at a time, and report which ones
the tests miss. A developer tool, not a test (pytest does not collect it; CI does not run it).

    python tests/mutations.py                  # every mutation below (~10 min on 2 cores)
    python tests/mutations.py lr clip          # only those whose name contains one of the words
    python tests/mutations.py --list           # names, files and tests, nothing run

Each mutation replaces exact snippets of the code (each must occur exactly once) and runs only
the tests that should catch it (pytest -x in the copy), which must first pass on the unmutated
code. Outcomes: "caught" (a test failed),
"SURVIVED" (all passed: a hole in the tests), "STALE" (a snippet is no longer in the code:
update this list), "TIMEOUT". Exit status 1 if anything survived or is stale. Run it before
large changes to the training loop or the schemes, and add a mutation with every new behaviour.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = "tests/test_train_loop.py"
DDP = ["tests/test_train_ddp.py", "-k", "accum"]
BAD = "tests/test_bad_input.py"

# (name, [(file, old, new), ...], pytest arguments)
MUTATIONS = [
    # ---- the learning rate reaching the optimizer
    ("lr not set on the groups", [("train.py", 'for group in optimizer.param_groups:  # every group',
                                   'for group in optimizer.param_groups[:0]:  # every group')], [LOOP]),
    ("lr set on the first group only", [("train.py", 'for group in optimizer.param_groups:  # every group',
                                         'for group in optimizer.param_groups[:1]:  # every group')], [LOOP]),
    ("every group at the first group's peak lr", [("train.py", 'group["lr"] = get_lr(step, cfg, group["base_lr"])',
                                                   'group["lr"] = get_lr(step, cfg)')],
     ["tests/test_nanochat.py", "-k", "muon_run_lrs"]),
    ("Muon momentum warmup ignored", [("train.py", 'group["momentum"] = muon_momentum(step, cfg)',
                                       'group["momentum"] = cfg["muon_momentum"]')],
     ["tests/test_nanochat.py", "-k", "muon_run_lrs"]),
    ("warmup off by one", [("train.py", "return lr * (step + 1) / warmup", "return lr * step / warmup")], [LOOP]),
    ("min lr ignored", [("train.py", 'min_lr = lr * cfg["min_lr_ratio"]', "min_lr = 0.0")], [LOOP]),
    ("lr_decay_iters ignored", [("train.py", 'decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]',
                                 'decay_iters = cfg["max_iters"]')], [LOOP]),
    ("cosine replaced by a straight line", [("train.py", "0.5 * (1.0 + math.cos(math.pi * ratio))", "(1.0 - ratio)")],
     [LOOP]),
    ("linear warmdown starts after warmup", [("train.py",
                                              'start = max(warmup, decay_iters - round(cfg["warmdown_frac"] * decay_iters))',
                                              "start = warmup")], [LOOP]),
    ("gradients not zeroed between steps", [("train.py", "optimizer.zero_grad(set_to_none=True)\n        step += 1",
                                              "step += 1")], [LOOP]),
    # ---- clipping and weight decay
    ("AdamW betas swapped", [("train.py", 'betas = (cfg["beta1"], cfg["beta2"])', 'betas = (cfg["beta2"], cfg["beta1"])')],
     [LOOP, "-k", "betas"]),
    ("grad clip skipped", [("train.py", 'cfg["grad_clip"] or float("inf"))', 'float("inf"))')], [LOOP]),
    ("grad norm measured, not clipped", [("train.py", 'torch.nn.utils.clip_grad_norm_(raw_model.parameters(), '
                                          'cfg["grad_clip"] or float("inf"))',
                                          "torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() "
                                          "if p.grad is not None])")], [LOOP]),
    ("grad clip applied at 1.0 whatever the config", [("train.py", 'cfg["grad_clip"] or float("inf"))', "1.0)")],
     [LOOP]),
    ("decay groups swapped", [("model.py", "{'params': decay, 'weight_decay': weight_decay, 'base_lr'",
                               "{'params': decay, 'weight_decay': 0.0, 'base_lr'"),
                              ("model.py", "{'params': no_decay, 'weight_decay': 0.0, 'base_lr'",
                               "{'params': no_decay, 'weight_decay': weight_decay, 'base_lr'")], [LOOP]),
    ("weight_decay from the config not passed", [("train.py", 'configure_optimizers(cfg["weight_decay"], ',
                                                  "configure_optimizers(0.1, ")], [LOOP]),
    ("norms and biases decayed", [("model.py", "(decay if p.dim() >= 2 else no_decay).append(p)",
                                   "(decay if p.dim() >= 1 else no_decay).append(p)")], [LOOP]),
    ("connections decayed by shape (static A_r, b_res ...)", [("model.py", "if id(p) in conn_params:",
                                                               "if False:")], [LOOP]),
    # ---- precision and checkpoints
    ("bf16 autocast never entered", [("train.py", 'ctx = torch.autocast(device_type, dtype=torch.bfloat16) if '
                                      'cfg["dtype"] == "bfloat16" else nullcontext()', "ctx = nullcontext()")],
     [LOOP, "-k", "autocast"]),
    ("checkpoint=False ignored", [("rundir.py", 'if master and cfg["checkpoint"]:\n        ckpt = {', 'if master:\n        ckpt = {')],
     [LOOP, "-k", "checkpoint"]),
    # ---- DDP, gradient accumulation, resume on another world size
    ("grad sync on the first micro-step", [("train.py", "model.require_backward_grad_sync = micro_step == grad_accum - 1",
                                            "model.require_backward_grad_sync = micro_step == 0")], DDP),
    ("train loss not averaged over ranks", [("train.py", "dist.all_reduce(loss_sum)\n", "pass\n")], DDP),
    ("micro-step loss not divided by grad_accum", [("train.py", "loss = loss / grad_accum", "loss = loss")], DDP),
    ("dropout seeds equal on every rank", [("train.py", 'torch.manual_seed(cfg["seed"] + rank)',
                                            'torch.manual_seed(cfg["seed"])'),
                                           ("train.py", 'np.random.seed(cfg["seed"] + rank)', 'np.random.seed(cfg["seed"])'),
                                           ("train.py", '    random.seed(cfg["seed"] + rank)\n', '    random.seed(cfg["seed"])\n')], DDP),
    ("loader position saved per rank", [("data/loader.py", '"consumed_windows": int(self.consumed)',
                                         '"consumed_windows": int(self.consumed) // self.world_size')], DDP),
    ("loader position restored only on the same world size", [
        ("train.py", '            train_loader.load_state_dict(ckpt["loader"])',
         '            if len(ckpt["ranks"]) == world_size:\n                train_loader.load_state_dict(ckpt["loader"])')], DDP),
    ("ranks read the same windows", [("data/loader.py", "first = self.consumed + self.rank * self.B",
                                      "first = self.consumed")], DDP),
    # ---- model config, loader, sampling, MFU
    ("GPTConfig drops sinkhorn_iters", [("model.py", "opts = dict(sinkhorn_iters=self.sinkhorn_iters, ",
                                         "opts = dict(")], ["tests/test_model.py", "-k", "config_options"]),
    ("GPTConfig drops res_logit_init", [("model.py", "res_logit_init=self.res_logit_init, ", "")],
     ["tests/test_model.py", "-k", "config_options"]),
    ("GPTConfig drops gate_init", [("model.py", "gate_init=self.gate_init, ", "")],
     ["tests/test_model.py", "-k", "config_options"]),
    ("train windows off by one", [("data/loader.py", "self.num_windows = (self.stream.num_tokens - 1) // self.T",
                                   "self.num_windows = self.stream.num_tokens // self.T")], ["tests/test_loader_windows.py"]),
    ("val windows off by one", [("data/loader.py", "available = (stream.num_tokens - 1) // self.T",
                                 "available = stream.num_tokens // self.T")], ["tests/test_loader_windows.py"]),
    ("generate ignores temperature", [("model.py", "logits = logits[:, -1, :] / temperature", "logits = logits[:, -1, :]")],
     ["tests/test_model.py", "-k", "generate"]),
    ("generate ignores top_k", [("model.py", "if top_k is not None:", "if False:")], ["tests/test_model.py", "-k", "generate"]),
    ("generate keeps top_k + 1", [("model.py", "torch.topk(logits, min(top_k, logits.size(-1)))",
                                   "torch.topk(logits, min(top_k + 1, logits.size(-1)))")],
     ["tests/test_model.py", "-k", "generate"]),
    ("MFU with its own peak table again", [("common.py", "return bf16_peak(torch.cuda.get_device_name()) if",
                                          'return next((f for k, f in [("H100 PCIe", 756e12), ("H100", 989e12), '
                                          '("A100", 312e12)] if k in torch.cuda.get_device_name()), None) if')],
     [LOOP, "-k", "peak"]),
    ("H100 NVL missing from the peak table", [("common.py", '("H100", "NVL", 835e12), ', "")], [LOOP, "-k", "peak"]),
    # ---- the schemes' equations: independent references (torch path and fused kernels)
    ("Sinkhorn one iteration short, op and its reference alike", [
        ("hc.py", "        L = logits\n        for _ in range(iters):", "        L = logits\n        for _ in range(iters - 1):"),
        ("hc.py", "for _ in range(ctx.iters):", "for _ in range(ctx.iters - 1):"),
        ("hc.py", 'logits.transpose(-1, -2)\n    for _ in range(iters):', 'logits.transpose(-1, -2)\n    for _ in range(iters - 1):')],
     ["tests/test_hc.py", "-k", "sinkhorn"]),
    # the published code's model (configs/mhclite_grid.py)
    ("readout norm_sum ignored", [("model.py", 'if self.config.readout == "norm_sum"', 'if False')],
     ["tests/test_repro_grid.py", "-k", "readout"]),
    ("decay_static ignored", [("model.py", "if self.config.decay_static:", "if False:")],
     ["tests/test_repro_grid.py", "-k", "decay"]),
    ("sinkhorn_end cols ignored", [("hc.py", 'if end == "cols":\n        return sinkhorn(', 'if False:\n        return sinkhorn(')],
     ["tests/test_repro_grid.py", "-k", "sinkhorn or orientation"]),
    # conn.gates is shared by the torch path and the fused path: test_kernels.py cannot see these two
    ("mHC H_post as 1 + tanh (shared gate code)", [
        ("hc.py", "H_post = 2 * torch.sigmoid(self.alpha_post * m_post", "H_post = 1 + torch.tanh(self.alpha_post * m_post")],
     ["tests/test_kernels_reference.py"]),
    ("mHC H_pre bias outside the sigmoid", [
        ("hc.py", "H_pre = torch.sigmoid(self.alpha_pre * m_pre + self.b_pre)",
         "H_pre = torch.sigmoid(self.alpha_pre * m_pre) + self.b_pre")], ["tests/test_hc.py", "-k", "formula"]),
    ("HC H_post through a sigmoid, not tanh (shared gate code)", [
        ("hc.py", "B = self.s_beta * torch.tanh(p_beta)", "B = self.s_beta * torch.sigmoid(p_beta)")],
     ["tests/test_kernels_reference.py"]),
    ("HC H_res not transposed", [("hc.py", "return A_m, B, A_r.transpose(-1, -2)", "return A_m, B, A_r")],
     ["tests/test_hc.py", "-k", "equations"]),
    ("fused pre-mix gated by alpha_post", [
        ("hc_kernels.py", "return conn.phi, conn.gamma, conn.alpha_pre, conn.b_pre, False",
         "return conn.phi, conn.gamma, conn.alpha_post, conn.b_pre, False")],
     ["tests/test_kernels_reference.py"]),
    # the peers (docs/peers.md): lucidrains' per-stream norm, the wiring of the benchmark's peer rows
    ("coeff_norm stream ignored", [("hc.py", 'if self.coeff_norm == "stream":', "if False:")],
     ["tests/test_peers.py", "-k", "lucidrains_mhc"]),
    ("fused kernels accept coeff_norm stream", [("hc_kernels.py", 'if getattr(conn, "coeff_norm", "flat") != "flat":',
                                                 "if False:")], ["tests/test_peers.py", "-k", "coeff_norm"]),
    ("peer streams folded stream-major", [("scripts/peers.py", "self.peer(h.transpose(1, 2).reshape(B * n, T, C))",
                                           "self.peer(h.reshape(B * n, T, C))")],
     ["tests/test_peers.py", "-k", "lucidrains_wired"]),
    ("peer rows all on one hc.FUSED", [("scripts/bench.py", "        hc.FUSED = fused\n", "        hc.FUSED = args.fused\n")],
     ["tests/test_bench.py", "-k", "peer_rows_assembly"]),
    # ---- the d12 reproduction: tokenizer, precision, recipe
    ("softcap in bf16 under autocast", [("model.py", "self.lm_head(self.read_out(h, norm)).float()",
                                         "self.lm_head(self.read_out(h, norm))")],
     ["tests/test_reproduce_d12.py", "-k", "softcap"]),
    ("GPT-2's EOT before every document whatever the tokenizer", [("data/prepare.py", 'bos = (_W["enc"].bos_token,)',
                                                                   "bos = (toklib.EOT,)")], ["tests/test_reproduce_d12.py", "-k", "bos"]),
    ("special tokens counted as bytes", [("data/tokenizer.py", "        if i not in special:\n", "        if True:\n")],
     ["tests/test_reproduce_d12.py", "-k", "exact_bytes"]),
    ("a checkpoint's trained tokenizer replaced by GPT-2's", [
        ("rundir.py", '    rec = meta.get("tokenizer")\n    if toklib.is_gpt2(rec):',
         '    rec = meta.get("tokenizer")\n    if True:')],
     ["tests/test_reproduce_d12.py", "-k", "evals_with_the_trained"]),
    ("resume on another tokenizer's data", [("rundir.py", "if not toklib.same_tokenizer(",
                                             "if False and not toklib.same_tokenizer(")], ["tests/test_reproduce_d12.py", "-k", "resume_with"]),
    ("train-loss EMA not debiased", [("common.py", "self.ema / (1 - self.beta ** self.steps) if", "self.ema if")],
     ["tests/test_reproduce_d12.py", "-k", "loss_ema"]),
    ("step rule without the embedding", [("train.py", "n = raw_model.num_params(non_embedding=False)",
                                          "n = raw_model.num_params()")], ["tests/test_reproduce_d12.py", "-k", "max_iters_from"]),
    ("Muon weight decay dropped", [("model.py", "weight_decay=muon_weight_decay,", "weight_decay=0.0,")],
     ["tests/test_reproduce_d12.py", "-k", "muon_weight_decay"]),
    # ---- bad input: nothing lost, nothing silently wrong (tests/test_bad_input.py)
    ("overwrite deletes the old run at once", [("rundir.py", "fsync_dir(self.dir)\n            fsync_dir(out)",
                                                "shutil.rmtree(self.dir)\n            fsync_dir(out)")],
     [BAD, "-k", "overwrite"]),
    ("overwritten run not moved back", [("rundir.py", "self.discard() if exc_type is None else self.restore()",
                                         "self.discard()")], [BAD, "-k", "overwrite"]),
    ("out_dir claimed before the loaders", [
        ("train.py", "    old_run = rundir.on_rank0(lambda: rundir.claim_out_dir(",
         "    old_run = (lambda *a: None)(("),
        ("train.py", "    train_loader, val_loader, token_bytes, diag_x = loaders(",
         "    old_run = rundir.on_rank0(lambda: rundir.claim_out_dir(cfg, run_scope), ddp, master)\n"
         "    train_loader, val_loader, token_bytes, diag_x = loaders(")], [BAD, "-k", "refused_overwrite"]),
    ("tokens as step x this run's batch", [("train.py", 'tokens = ckpt.get("tokens", start_step * tokens_per_step)',
                                            "tokens = (start_step * tokens_per_step)")], [BAD, "-k", "tokens"]),
    ("imported names are keys", [("configurator.py", "not_a_key = key in imported or", "not_a_key = False and")],
     [BAD, "-k", "imports"]),
    # ---- seeds, settings and comparisons
    ("data order from the init seed", [("train.py", 'rank, world_size,\n                                   cfg["data_seed"])',
                                        'rank, world_size,\n                                   cfg["seed"])')],
     ["tests/test_data_seed.py"]),
    ("resume accepts another data_seed", [("rundir.py", "if old_seeds[key] is not None and old_seeds[key] != cfg[key]:",
                                           "if key == 'seed' and old_seeds[key] != cfg[key]:")],
     ["tests/test_data_seed.py"]),
    ("normal quantile for the interval", [("setting.py", "stats.t.ppf((1 + confidence) / 2, n - 1)",
                                           "stats.norm.ppf((1 + confidence) / 2)")], ["tests/test_compare.py"]),
    ("unpaired differences", [("scripts/compare.py", "d = [values[k] - base[k] for k in keys]",
                               "d = [v - b for v, b in zip(sorted(values.values()), sorted(base.values()))]")],
     ["tests/test_compare.py"]),
    ("a setting key left out of the group", [("setting.py", "for k in defaults if k not in EXCLUDED}",
                                              "for k in defaults if k not in EXCLUDED and k != 'learning_rate'}")],
     ["tests/test_compare.py", "-k", "grouping"]),
    ("a resumed wandb run leaves its group", [("tracking.py", 'group = header["wandb_group"] or run_group or',
                                               'group = header["wandb_group"] or')],
     ["tests/test_wandb.py", "-k", "resumed"]),
    ("sweep run names without the model and data overrides", [("scripts/sweep.py", "data_seed, name_parts(extra),",
                                                                "data_seed, (),")],
     ["tests/test_train.py", "-k", "sweep"]),
    # ---- the evaluations (evals/)
    ("val BPB counts the nats of special tokens", [("evals/val.py", "(loss * (nbytes > 0)).sum()", "loss.sum()")],
     ["tests/test_train.py", "-k", "bpb"]),
    ("HellaSwag acc_norm from the summed loss", [("evals/hellaswag.py", "pred, pred_norm = int(s.argmin()), int(m.argmin())",
                                                 "pred, pred_norm = int(s.argmin()), int(s.argmin())")],
     ["tests/test_tools_hellaswag.py", "-k", "hand_checked"]),
    ("long rows cropped on the right", [("evals/__init__.py", "[t[c:] for t, c in zip(tokens, cuts)]",
                                         "[t[:len(t) - c] for t, c in zip(tokens, cuts)]")],
     ["tests/test_tools_hellaswag.py", "tests/test_tools_core.py", "-k", "cropped or scored_spans"]),
    ("training mode not restored after an evaluation", [("evals/__init__.py", "        model.train(was_training)",
                                                         "        pass")],
     ["tests/test_tools_hellaswag.py", "-k", "training_mode"]),
    ("core.json without the checkpoint's step", [("evals/results.py", '{"task": "core", **res, "step": step,',
                                                  '{"task": "core", **res, "step": None,')],
     ["tests/test_tools_core.py", "-k", "cli"]),
    ("HellaSwag of an unrecorded item count unmarked", [
        ("scripts/plot_runs.py", 'return row["hellaswag"] is not None and row["hellaswag_n"] != HELLASWAG_ITEMS',
         'return row["hellaswag"] is not None and bool(row["hellaswag_n"]) and row["hellaswag_n"] != HELLASWAG_ITEMS')],
     ["tests/test_tools_runs.py", "-k", "hellaswag"]),
]


def ignore(directory, names):
    return {n for n in names if n in (".git", "__pycache__", ".pytest_cache", "wandb", "out") or n.startswith("out-")}


def apply(copy, edits):
    """Apply the edits in the copy; return the stale ones (old snippet not found exactly once)."""
    stale, texts = [], {}
    for path, old, new in edits:
        text = texts.get(path) or open(os.path.join(copy, path)).read()
        if text.count(old) != 1:
            stale.append(f"{path}: {old[:60]!r} found {text.count(old)} times")
            continue
        texts[path] = text.replace(old, new)
    if not stale:
        for path, text in texts.items():
            with open(os.path.join(copy, path), "w") as f:
                f.write(text)
    return stale


def run_tests(copy, args, timeout):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={copy}/.pytest_tmp", *args]
    try:
        p = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", ""
    lines = p.stdout.strip().splitlines() or [""]
    failed = [line[len("FAILED "):] for line in lines if line.startswith("FAILED ")]
    detail = (failed[0][:150] + " | " if failed else "") + lines[-1]   # the failing test, then the summary
    return ("SURVIVED" if p.returncode == 0 else "caught" if p.returncode == 1 else f"error (pytest exit {p.returncode})"), detail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("words", nargs="*", help="run only the mutations whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation's test run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.words or any(w.lower() in m[0].lower() for w in args.words)]
    if args.list:
        for name, edits, tests in chosen:
            print(f"{name}: {', '.join(sorted({e[0] for e in edits}))} -> pytest {' '.join(tests)}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="hcgpt-mutations-") as tmp:
        base = os.path.join(tmp, "repo")
        shutil.copytree(REPO, base, ignore=ignore)
        # a mutation is only "caught" if its tests pass without it: check each distinct test selection first
        for tests in dict.fromkeys(tuple(t) for _, _, t in chosen):
            outcome, detail = run_tests(base, tests, args.timeout)
            if outcome != "SURVIVED":   # i.e. the unmutated code fails them
                print(f"baseline: pytest {' '.join(tests)} fails on the unmutated code ({detail}); fix that first")
                return 1
        for i, (name, edits, tests) in enumerate(chosen, 1):
            copy = os.path.join(tmp, f"m{i}")
            shutil.copytree(base, copy)
            t0 = time.time()
            stale = apply(copy, edits)
            outcome, detail = ("STALE", "; ".join(stale)) if stale else run_tests(copy, tests, args.timeout)
            shutil.rmtree(copy, ignore_errors=True)
            results.append((name, outcome))
            print(f"[{i}/{len(chosen)}] {outcome:8s} {name}  ({time.time() - t0:.0f}s: {detail})", flush=True)
    bad = [(n, o) for n, o in results if o != "caught"]
    print(f"\n{len(results)} mutations: {len(results) - len(bad)} caught, "
          f"{sum(o == 'SURVIVED' for _, o in results)} survived, {sum(o == 'STALE' for _, o in results)} stale, "
          f"{sum(o not in ('caught', 'SURVIVED', 'STALE') for _, o in results)} other")
    for n, o in bad:
        print(f"  {o}: {n}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
