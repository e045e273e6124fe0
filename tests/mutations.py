"""Mutation check: plant plausible bugs in a copy of the repo, one at a time, and report which ones
the tests miss. A developer tool, not a test (pytest does not collect it; CI does not run it).

    python tests/mutations.py                  # every mutation below (~10 min on 2 cores)
    python tests/mutations.py lr clip          # only those whose name contains one of the words
    python tests/mutations.py --list           # names, files and tests, nothing run

Each mutation is anchored by function and pattern: (file, function, pattern, replacement) replaces
the pattern inside that function only (its qualified name, "Class.method"; None: anywhere in the
file), where it must occur exactly once; the pattern is the code's text with every run of white
space matching any white space, so reformatting and edits elsewhere leave it valid. Each runs only
the tests that should catch it (pytest -x in the copy), which must first pass on the unmutated
code. Outcomes: "caught" (a test failed), "SURVIVED" (all passed: a hole in the tests), "STALE" (the
function is gone or the pattern is not in it once: update this list), "TIMEOUT". Exit status 1 if
anything survived or is stale. Run it before large changes to the training loop or the schemes, and
add a mutation with every new behaviour.
"""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = "tests/test_train_loop.py"
DDP = ["tests/test_train_ddp.py", "-k", "accum"]
BAD = "tests/test_bad_input.py"
WRITES = "tests/test_run_writes.py"

# (name, [(file, function, pattern, replacement), ...], pytest arguments)
MUTATIONS = [
    # ---- the learning rate reaching the optimizer
    ("lr not set on the groups", [("train.py", "train", "for group in optimizer.param_groups:  # every group",
                                   "for group in optimizer.param_groups[:0]:  # every group")], [LOOP]),
    ("lr set on the first group only", [("train.py", "train", "for group in optimizer.param_groups:  # every group",
                                         "for group in optimizer.param_groups[:1]:  # every group")], [LOOP]),
    ("every group at the first group's peak lr", [("train.py", "train", 'optim.lr_at(step, oc, group["base_lr"])',
                                                   "optim.lr_at(step, oc, oc.learning_rate)")],
     ["tests/test_nanochat.py", "-k", "muon_run_lrs"]),
    ("Muon momentum warmup ignored", [("train.py", "train", 'group["momentum"] = optim.muon_momentum(step, oc)',
                                       'group["momentum"] = oc.muon_momentum')],
     ["tests/test_nanochat.py", "-k", "muon_run_lrs"]),
    ("warmup off by one", [("optim.py", "lr_at", "return base_lr * (step + 1) / warmup", "return base_lr * step / warmup")],
     [LOOP]),
    ("min lr ignored", [("optim.py", "lr_at", "min_lr = base_lr * oc.min_lr_ratio", "min_lr = 0.0")], [LOOP]),
    ("lr_decay_iters ignored", [("optim.py", "lr_at", "oc.lr_decay_iters or oc.max_iters", "oc.max_iters")], [LOOP]),
    ("cosine replaced by a straight line", [("optim.py", "lr_at", "0.5 * (1.0 + math.cos(math.pi * ratio))",
                                             "(1.0 - ratio)")], [LOOP]),
    ("linear warmdown starts after warmup", [("optim.py", "lr_at",
                                              "start = max(warmup, decay_iters - round(oc.warmdown_frac * decay_iters))",
                                              "start = warmup")], [LOOP]),
    ("gradients not zeroed between steps", [("train.py", "train", "optimizer.zero_grad(set_to_none=True) step += 1",
                                             "step += 1")], [LOOP]),
    # ---- clipping and weight decay
    ("AdamW betas swapped", [("optim.py", "adamw", "betas=(oc.beta1, oc.beta2)", "betas=(oc.beta2, oc.beta1)"),
                             ("optim.py", "muon", "betas=(oc.beta1, oc.beta2)", "betas=(oc.beta2, oc.beta1)")],
     [LOOP, "-k", "betas"]),
    ("grad clip skipped", [("train.py", "train", 'oc.grad_clip or float("inf"))', 'float("inf"))')], [LOOP]),
    ("grad norm measured, not clipped", [("train.py", "train",
                                          'torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip or float("inf"))',
                                          "torch.nn.utils.get_total_norm([p.grad for p in model.parameters() "
                                          "if p.grad is not None])")], [LOOP]),
    ("grad clip applied at 1.0 whatever the config", [("train.py", "train", 'oc.grad_clip or float("inf"))', "1.0)")],
     [LOOP]),
    ("decay groups swapped", [("optim.py", "adamw", '{"params": decay, "weight_decay": oc.weight_decay,',
                               '{"params": decay, "weight_decay": 0.0,'),
                              ("optim.py", "adamw", '{"params": no_decay, "weight_decay": 0.0,',
                               '{"params": no_decay, "weight_decay": oc.weight_decay,')], [LOOP]),
    ("weight_decay from the config not passed", [("optim.py", "adamw", '"weight_decay": oc.weight_decay,',
                                                  '"weight_decay": 0.1,')], [LOOP]),
    ("norms and biases decayed", [("optim.py", "adamw", "(decay if p.dim() >= 2 else no_decay).append(p)",
                                   "(decay if p.dim() >= 1 else no_decay).append(p)")], [LOOP]),
    ("connections decayed by shape (static A_r, b_res ...)", [("optim.py", "adamw", "if id(p) in conn_params:",
                                                               "if False:")], [LOOP]),
    # ---- precision and checkpoints
    ("bf16 autocast never entered", [("runtime.py", "Runtime.autocast",
                                      'torch.autocast(self.device_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" '
                                      "else nullcontext()", "nullcontext()")], [LOOP, "-k", "autocast"]),
    ("checkpoint=False ignored", [("rundir.py", "RunDir.save", "if not self.checkpoints: return False", "pass"),
                                  ("train.py", "save", "if c.rundir.checkpoint else False", "if True else False")],
     [LOOP, "-k", "checkpoint"]),
    # ---- DDP, gradient accumulation, resume on another world size
    ("grad sync on the first micro-step", [("train.py", "train", "require_backward_grad_sync = micro_step == grad_accum - 1",
                                            "require_backward_grad_sync = micro_step == 0")], DDP),
    ("train loss not averaged over ranks", [("train.py", "train", "dist.all_reduce(loss_sum)", "pass")], DDP),
    ("micro-step loss not divided by grad_accum", [("train.py", "train", "loss = loss / grad_accum", "loss = loss")], DDP),
    ("dropout seeds equal on every rank", [("train.py", "seed_rank", "torch.manual_seed(seed + rt.rank)",
                                            "torch.manual_seed(seed)"),
                                           ("train.py", "seed_rank", "np.random.seed(seed + rt.rank)", "np.random.seed(seed)"),
                                           ("train.py", "seed_rank", "random.seed(seed + rt.rank)\n", "random.seed(seed)\n")],
     DDP),
    ("loader position saved per rank", [("data/loader.py", "TrainLoader.state_dict", '"consumed_windows": int(self.consumed)',
                                         '"consumed_windows": int(self.consumed) // self.world_size')], DDP),
    ("loader position restored only on the same world size", [
        ("train.py", "loaders", 'train_loader.load_state_dict(ckpt["loader"])',
         'if len(ckpt["ranks"]) == rt.world_size: train_loader.load_state_dict(ckpt["loader"])')], DDP),
    ("ranks read the same windows", [("data/loader.py", "TrainLoader.next_batch", "first = self.consumed + self.rank * self.B",
                                      "first = self.consumed")], DDP),
    # ---- model config, loader, sampling, MFU
    ("a connection without the config's sinkhorn_iters", [("hc.py", "connection", "MHC(dim, n, layer_idx, sc.sinkhorn_iters,",
                                                           "MHC(dim, n, layer_idx, SchemeConfig.sinkhorn_iters,")],
     ["tests/test_model.py", "-k", "config_options"]),
    ("a connection without the config's res_logit_init", [("hc.py", "connection", "res_logit_init=sc.res_logit_init",
                                                           "res_logit_init=SchemeConfig.res_logit_init")],
     ["tests/test_model.py", "-k", "config_options"]),
    ("a connection without the config's gate_init", [("hc.py", "connection", "gate_init=sc.gate_init",
                                                      "gate_init=SchemeConfig.gate_init")],
     ["tests/test_model.py", "-k", "config_options"]),
    ("identity_res not reaching the connections", [("hc.py", "connection", "identity_res=sc.identity_res",
                                                    "identity_res=False")], ["tests/test_config.py", "-k", "identity"]),
    ("a value outside its choices accepted", [("keys.py", "Key.problem", "if self.choices is not None and value not in "
                                               "self.choices:", "if False:")], ["tests/test_train.py", "-k", "bad_config"]),
    ("a key declared twice accepted", [("keys.py", "declared", "if f.name in out:", "if False:")],
     ["tests/test_config.py", "-k", "twice"]),
    ("train windows off by one", [("data/loader.py", "TrainLoader.__init__",
                                   "self.num_windows = (self.stream.num_tokens - 1) // self.T",
                                   "self.num_windows = self.stream.num_tokens // self.T")], ["tests/test_loader_windows.py"]),
    ("val windows off by one", [("data/loader.py", "ValLoader.__init__", "available = (stream.num_tokens - 1) // self.T",
                                 "available = stream.num_tokens // self.T")], ["tests/test_loader_windows.py"]),
    ("generate ignores temperature", [("model.py", "GPT.generate", "logits = logits[:, -1, :] / temperature",
                                       "logits = logits[:, -1, :]")], ["tests/test_model.py", "-k", "generate"]),
    ("generate ignores top_k", [("model.py", "GPT.generate", "if top_k is not None:", "if False:")],
     ["tests/test_model.py", "-k", "generate"]),
    ("generate keeps top_k + 1", [("model.py", "GPT.generate", "torch.topk(logits, min(top_k, logits.size(-1)))",
                                   "torch.topk(logits, min(top_k + 1, logits.size(-1)))")],
     ["tests/test_model.py", "-k", "generate"]),
    ("MFU with its own peak table again", [("common.py", "peak_flops", "return bf16_peak(torch.cuda.get_device_name()) if",
                                            'return next((f for k, f in [("H100 PCIe", 756e12), ("H100", 989e12), '
                                            '("A100", 312e12)] if k in torch.cuda.get_device_name()), None) if')],
     [LOOP, "-k", "peak"]),
    ("H100 NVL missing from the peak table", [("common.py", None, '("H100", "NVL", 835e12), ', "")], [LOOP, "-k", "peak"]),
    # ---- the schemes' equations: independent references (torch path and fused kernels)
    ("Sinkhorn one iteration short, op and its reference alike", [
        ("hc.py", "SinkhornLog.forward", "for _ in range(iters):", "for _ in range(iters - 1):"),
        ("hc.py", "SinkhornLog.backward", "for _ in range(ctx.iters):", "for _ in range(ctx.iters - 1):"),
        ("hc.py", "sinkhorn_reference", "for _ in range(iters):", "for _ in range(iters - 1):")],
     ["tests/test_hc.py", "-k", "sinkhorn"]),
    # the published code's model (configs/mhclite_grid.py)
    ("readout norm_sum ignored", [("model.py", "GPT.read_out", 'if self.config.readout == "norm_sum"', "if False")],
     ["tests/test_repro_grid.py", "-k", "readout"]),
    ("decay_static ignored", [("model.py", "GPT.connection_decay_ids", "if self.config.decay_static:", "if False:")],
     ["tests/test_repro_grid.py", "-k", "decay"]),
    ("sinkhorn_end cols ignored", [("hc.py", "sinkhorn", 'if end == "cols":', "if False:")],
     ["tests/test_repro_grid.py", "-k", "sinkhorn or orientation"]),
    # conn.gates is shared by the torch path and the fused path: test_kernels.py cannot see these two
    ("mHC H_post as 1 + tanh (shared gate code)", [
        ("hc.py", "ManifoldConnection.gates", "H_post = 2 * torch.sigmoid(self.alpha_post * m_post",
         "H_post = 1 + torch.tanh(self.alpha_post * m_post")], ["tests/test_kernels_reference.py"]),
    ("mHC H_pre bias outside the sigmoid", [
        ("hc.py", "ManifoldConnection.gates", "H_pre = torch.sigmoid(self.alpha_pre * m_pre + self.b_pre)",
         "H_pre = torch.sigmoid(self.alpha_pre * m_pre) + self.b_pre")], ["tests/test_hc.py", "-k", "formula"]),
    ("HC H_post through a sigmoid, not tanh (shared gate code)", [
        ("hc.py", "HyperConnection.gates", "B = self.s_beta * torch.tanh(p_beta)", "B = self.s_beta * torch.sigmoid(p_beta)")],
     ["tests/test_kernels_reference.py"]),
    ("HC H_res not transposed", [("hc.py", "HyperConnection.gates", "return A_m, B, A_r.transpose(-1, -2)",
                                  "return A_m, B, A_r")], ["tests/test_hc.py", "-k", "equations"]),
    ("fused pre-mix gated by alpha_post", [
        ("hc_kernels.py", "_projection", "return conn.phi, conn.gamma, conn.alpha_pre, conn.b_pre, False",
         "return conn.phi, conn.gamma, conn.alpha_post, conn.b_pre, False")], ["tests/test_kernels_reference.py"]),
    # the peers (docs/peers.md): lucidrains' per-stream norm, the wiring of the benchmark's peer rows
    ("coeff_norm stream ignored", [("hc.py", "ManifoldConnection.coefficients", 'if self.coeff_norm == "stream":',
                                    "if False:")], ["tests/test_peers.py", "-k", "lucidrains_mhc"]),
    ("fused kernels accept coeff_norm stream", [("hc_kernels.py", "unsupported",
                                                 'if getattr(conn, "coeff_norm", "flat") != "flat":', "if False:")],
     ["tests/test_peers.py", "-k", "coeff_norm"]),
    ("peer streams folded stream-major", [("scripts/peers.py", "LucidrainsConnection.forward",
                                           "self.peer(h.transpose(1, 2).reshape(B * n, T, C))",
                                           "self.peer(h.reshape(B * n, T, C))")],
     ["tests/test_peers.py", "-k", "lucidrains_wired"]),
    ("peer rows all on one fused path", [("scripts/bench.py", "run_peers", "peer=peer, fused=fused)",
                                          "peer=peer, fused=args.fused)")],
     ["tests/test_bench.py", "-k", "peer_rows_assembly"]),
    # ---- the d12 reproduction: tokenizer, precision, recipe
    ("softcap in bf16 under autocast", [("model.py", "GPT.nanochat_logits", "self.lm_head(self.read_out(h, norm)).float()",
                                         "self.lm_head(self.read_out(h, norm))")],
     ["tests/test_reproduce_d12.py", "-k", "softcap"]),
    ("GPT-2's EOT before every document whatever the tokenizer", [("data/prepare.py", "_tokenize_range",
                                                                   'bos = (_W["enc"].bos_token,)', "bos = (toklib.EOT,)")],
     ["tests/test_reproduce_d12.py", "-k", "bos"]),
    ("special tokens counted as bytes", [("data/tokenizer.py", "token_byte_lengths", "if i not in special:", "if True:")],
     ["tests/test_reproduce_d12.py", "-k", "exact_bytes"]),
    ("a checkpoint's trained tokenizer replaced by GPT-2's", [("checkpoint.py", "load_tokenizer",
                                                               "if toklib.is_gpt2(rec):", "if True:")],
     ["tests/test_reproduce_d12.py", "-k", "evals_with_the_trained"]),
    ("resume on another tokenizer's data", [("rundir.py", "RunDir.resume_checkpoint", "if not toklib.same_tokenizer(",
                                             "if False and not toklib.same_tokenizer(")],
     ["tests/test_reproduce_d12.py", "-k", "resume_with"]),
    ("train-loss EMA not debiased", [("common.py", "LossEMA.value", "self.ema / (1 - self.beta ** self.steps) if",
                                      "self.ema if")], ["tests/test_reproduce_d12.py", "-k", "loss_ema"]),
    ("step rule without the embedding", [("train.py", "build", "n = model.num_params(non_embedding=False)",
                                          "n = model.num_params()")], ["tests/test_reproduce_d12.py", "-k", "max_iters_from"]),
    ("Muon weight decay dropped", [("optim.py", "muon", "weight_decay=oc.muon_weight_decay,", "weight_decay=0.0,")],
     ["tests/test_reproduce_d12.py", "-k", "muon_weight_decay"]),
    # ---- bad input: nothing lost, nothing silently wrong (tests/test_bad_input.py)
    ("overwrite deletes the old run at once", [("rundir.py", "OldRun.__init__",
                                                "checkpoint.fsync_dir(self.dir) checkpoint.fsync_dir(out)",
                                                "shutil.rmtree(self.dir); checkpoint.fsync_dir(out)")],
     [BAD, "-k", "overwrite"]),
    ("overwritten run not moved back", [("rundir.py", "OldRun.__exit__",
                                         "self.discard() if exc_type is None else self.restore()", "self.discard()")],
     [BAD, "-k", "overwrite"]),
    ("out_dir claimed before the loaders", [
        ("train.py", "start_log", "rt.on_rank0(lambda: run.claim(scope))", "pass"),
        ("train.py", "train", "train_loader, val_loader, token_bytes, diag_x = loaders(c, rt, ckpt)",
         "rt.on_rank0(lambda: run.claim(scope)); train_loader, val_loader, token_bytes, diag_x = loaders(c, rt, ckpt)")],
     [BAD, "-k", "refused_overwrite"]),
    ("tokens as step x this run's batch", [("train.py", "train", 'tokens = ckpt.get("tokens", 0) if ckpt is not None else 0',
                                            "tokens = start_step * c.data.total_batch_tokens")], [BAD, "-k", "tokens"]),
    ("imported names are keys", [("configurator.py", "load", "not_a_key = key in imported or", "not_a_key = False and")],
     [BAD, "-k", "imports"]),
    # ---- seeds, settings and comparisons
    ("data order from the init seed", [("train.py", "loaders", "rt.world_size, d.data_seed)",
                                        "rt.world_size, c.system.seed)")], ["tests/test_data_seed.py"]),
    ("resume accepts another data_seed", [("rundir.py", "RunDir.resume_checkpoint",
                                           "if was is not None and was != value:",
                                           "if was is not None and was != value and k != 'data_seed':")],
     ["tests/test_data_seed.py"]),
    ("normal quantile for the interval", [("setting.py", "mean_interval", "stats.t.ppf((1 + confidence) / 2, n - 1)",
                                           "stats.norm.ppf((1 + confidence) / 2)")], ["tests/test_compare.py"]),
    ("unpaired differences", [("scripts/compare.py", "paired", "d = [values[k] - base[k] for k in keys]",
                               "d = [v - b for v, b in zip(sorted(values.values()), sorted(base.values()))]")],
     ["tests/test_compare.py"]),
    ("a setting key left out of the group", [("setting.py", "setting", "if k.setting is True}",
                                              "if k.setting is True and name != 'learning_rate'}")],
     ["tests/test_compare.py", "-k", "grouping"]),
    ("a resumed wandb run leaves its group", [("tracking.py", "start_wandb", 'group = header["wandb_group"] or run_group or',
                                               'group = header["wandb_group"] or')],
     ["tests/test_wandb.py", "-k", "resumed"]),
    ("sweep run names without the model and data overrides", [("scripts/sweep.py", "main",
                                                                "parts = name_parts(extra)", "parts = ()")],
     ["tests/test_train.py", "-k", "sweep"]),
    # ---- the evaluations (evals/)
    ("val BPB counts the nats of special tokens", [("evals/val.py", "val_loss_bpb", "(loss * (nbytes > 0)).sum()", "loss.sum()")],
     ["tests/test_train.py", "-k", "bpb"]),
    ("HellaSwag acc_norm from the summed loss", [("evals/hellaswag.py", "evaluate_hellaswag", "pred, pred_norm = int(s.argmin()), int(m.argmin())",
                                                 "pred, pred_norm = int(s.argmin()), int(s.argmin())")],
     ["tests/test_tools_hellaswag.py", "-k", "hand_checked"]),
    ("long rows cropped on the right", [("evals/__init__.py", "crop", "[t[c:] for t, c in zip(tokens, cuts)]",
                                         "[t[:len(t) - c] for t, c in zip(tokens, cuts)]")],
     ["tests/test_tools_hellaswag.py", "tests/test_tools_core.py", "-k", "cropped or scored_spans"]),
    ("training mode not restored after an evaluation", [("evals/__init__.py", "eval_mode", "model.train(was_training)",
                                                         "pass")],
     ["tests/test_tools_hellaswag.py", "-k", "training_mode"]),
    ("core.json without the checkpoint's step", [("evals/results.py", "save_core", '{"task": "core", **res, "step": step,',
                                                  '{"task": "core", **res, "step": None,')],
     ["tests/test_tools_core.py", "-k", "cli"]),
    ("HellaSwag of an unrecorded item count unmarked", [
        ("scripts/plot_runs.py", "hellaswag_subset",
         'return row["hellaswag"] is not None and row["hellaswag_n"] != HELLASWAG_ITEMS',
         'return row["hellaswag"] is not None and bool(row["hellaswag_n"]) and row["hellaswag_n"] != HELLASWAG_ITEMS')],
     ["tests/test_tools_runs.py", "-k", "hellaswag"]),
    ("a missing !function module passes the task check", [("evals/harness.py", "check_functions",
                                                            "if local.is_file():", "if True:")],
     ["tests/test_harness_tasks.py"]),
    # ---- recompute
    ("stream recompute without its selective policy", [
        ("model.py", "GPT.run_blocks",
         'partial(create_selective_checkpoint_contexts, BRANCH_OPS) if mode == "streams" else noop_context_fn',
         "noop_context_fn")], ["tests/test_recompute.py", "-k", "matmul"]),
    ("stream recompute groups not the paper's L_r", [
        ("model.py", "GPT.recompute_group", "c.n_streams * c.n_layer / (c.n_streams + 2)", "c.n_layer / 2")],
     ["tests/test_recompute.py", "-k", "papers_rule"]),
    ("stream recompute's groups ignored", [("model.py", "GPT.run_blocks", 'size = 1 if mode == "blocks" else',
                                            "size = 1 if True else")],
     ["tests/test_recompute.py", "-k", "keeps_no_stream"]),
    ("bf16 streams keep an fp32 copy", [("hc.py", "Connection.forward",
                                         "(self.recompute or h.dtype != torch.float32)", "self.recompute")],
     ["tests/test_recompute.py", "-k", "fp32_copy"]),
    ("bench --memory counts freed storages", [("scripts/bench.py", "kept_for_backward", "if not ref.expired() and",
                                                "if True and")], ["tests/test_memory.py"]),
    ("bench --memory's models group as they like", [("scripts/bench.py", "memory_one",
                                                     "shape = {} if group is None else dict(recompute_group=group)",
                                                     "shape = {}")], ["tests/test_memory.py"]),
    # ---- a sweep that can be finished
    ("a finished sweep run not recognised", [("scripts/sweep.py", "run_state",
                                              'if any(r.get("type") == "eval" and r.get("step") == target for r in after):',
                                              "if False:")], ["tests/test_sweep.py"]),
    ("a started sweep run not resumed", [("scripts/sweep.py", None, '"resume": ["--resume"]', '"resume": []')],
     ["tests/test_sweep.py"]),
    ("sweep runs python from PATH", [("scripts/sweep.py", "launcher", "return [sys.executable, shown(TRAIN)]",
                                      'return ["python", shown(TRAIN)]')], ["tests/test_sweep.py"]),
    ("sweep runs in the repo directory", [("scripts/sweep.py", "launch", "subprocess.Popen(cmd)",
                                           "subprocess.Popen(cmd, cwd=REPO)")], ["tests/test_sweep.py"]),
    # ---- a run's files: never mixed, lost or loaded damaged
    ("a checkpoint's CRCs not checked", [("checkpoint.py", "load", "damaged = z.testzip()", "damaged = None")],
     [WRITES, "-k", "damaged"]),
    ("non-finite checkpoint values loaded", [("checkpoint.py", "load", "if bad:", "if False:")],
     [WRITES, "-k", "nonfinite_checkpoint"]),
    ("a NaN val loss checkpointed", [("train.py", "train", 'if not math.isfinite(record["val_loss"]):', "if False:")],
     [WRITES, "-k", "val_loss"]),
    ("--resume_from continued into another run's out_dir", [
        ("rundir.py", "RunDir.check", "if (self.resume and here) or not", "if self.resume or not")],
     [WRITES, "-k", "another_run"]),
    ("ranks' settings not compared", [("runtime.py", "Runtime.check_same", "if not self.ddp:", "if True:")],
     [WRITES, "-k", "ranks_with"]),
    ("a failed log write is a traceback", [("rundir.py", "RunDir.log", "except OSError as e:",
                                            "except ValueError as e:")],
     [WRITES, "-k", "mid_run"]),
]


def ignore(directory, names):
    return {n for n in names if n in (".git", "__pycache__", ".pytest_cache", "wandb", "out") or n.startswith("out-")}


def span(text, function):
    """(start, end) character offsets of the function (a qualified name, "Class.method") in text, or None."""
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name == function:
                    found.append(child)
                walk(child, name + ".")
    walk(ast.parse(text), "")
    if len(found) != 1:
        return None
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    return starts[found[0].lineno - 1], starts[found[0].end_lineno] if found[0].end_lineno < len(starts) else len(text)


def pattern(code):
    """The regex of a snippet of code: its text, any run of white space matching any white space."""
    return r"\s+".join(re.escape(part) for part in code.split())


def apply(copy, edits):
    """Apply the edits in the copy; return the stale ones (function gone, pattern not in it exactly once)."""
    stale, texts = [], {}
    for path, function, old, new in edits:
        text = texts.get(path) or open(os.path.join(copy, path)).read()
        where = (0, len(text)) if function is None else span(text, function)
        if where is None:
            stale.append(f"{path}: no function {function}")
            continue
        body = text[where[0]:where[1]]
        hits = list(re.finditer(pattern(old), body))
        if len(hits) != 1:
            stale.append(f"{path}:{function}: {old[:60]!r} found {len(hits)} times")
            continue
        body = body[:hits[0].start()] + new + body[hits[0].end():]
        texts[path] = text[:where[0]] + body + text[where[1]:]
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
