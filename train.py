"""
Pretrain a GPT with any residual scheme, on one CPU, one GPU, or many GPUs with torchrun.

    python train.py configs/quickstart.py                                  # CPU, ~2.5 minutes on 2 cores
    torchrun --standalone --nproc_per_node=8 train.py configs/fwe_m.py --scheme=kromhc

Config: the keys each module declares (config.py gathers them; `python train.py --help` lists them),
then config files (configs/*.py) and --key=value overrides, in order (configurator.py). Every
eval_interval steps and at the end: val loss and val BPB over fixed val tokens (all-reduced,
independent of the number of GPUs), the residual-scheme diagnostics on a fixed val batch, and a
checkpoint; with final_hellaswag / final_core, HellaSwag and CORE once at the end when their data is
here. Outputs in out_dir (rundir.py): ckpt.pt (atomic and fsynced; the last keep_checkpoints also as
ckpt_<step>.pt), log.jsonl (one JSON object per line); wandb optional. One run per out_dir: it is
locked for the run's life, and a run already there is refused unless --resume or --overwrite=True.
Every check that can refuse the run comes before its first write in out_dir; --overwrite moves the
old run aside and deletes it only once the new run's first checkpoint is on disk (docs/errors.md).
"""

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import config
import configurator
import evals.training
import hc_verify
import optim
import runtime
import tracking
from checkpoint import load_tokenizer
from common import (LossEMA, flag_nonfinite, fmt_time, nonfinite_message, nonfinite_val_message, peak_flops, rng_state,
                    set_rng_state)
from data.loader import TrainLoader, ValLoader, data_id, load_token_bytes, prepared, verify_shards
from errors import ConfigError, Diverged, HcgptError
from model import GPT
from rundir import RunDir, run_identity
from setting import setting, setting_name

REPO = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# before the first step: every check, then the model, the optimizer, the data and the log

def check(c, user, rt, run):
    """What can refuse the run, before anything is built or written; -> (the data's meta, its tokenizer
    record, the things to say once at the start). Rank 0 checks wandb, the shards and out_dir (it alone
    writes there) and every rank stops on its verdict."""
    rt.check_same(config.flat(c), "the config")  # nodes started with other settings would hang or fail in DDP
    notes = list(config.ignored(user).values()) + [n for n in [tracking.resolve_mode(c.wandb)] if n]
    micro_tokens = c.data.batch_size * c.model.block_size * rt.world_size
    if c.data.total_batch_tokens % micro_tokens:
        raise ConfigError(f"config key 'total_batch_tokens' ({c.data.total_batch_tokens}) must be divisible by "
                          f"batch_size x block_size x world_size = {c.data.batch_size} x {c.model.block_size} x "
                          f"{rt.world_size} = {micro_tokens}")
    meta, tokenizer = prepared(c.data.data_dir, c.data.dataset)
    vocab = (meta["vocab_size"] + 63) // 64 * 64
    if user["vocab_size"] == 0:   # the data's tokenizer's vocab, rounded up (GPTConfig alone assumes GPT-2's)
        c.model = replace(c.model, vocab_size=vocab)
    elif c.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"config key 'vocab_size' ({c.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocab ({meta['vocab_size']}); use 0 for the default")
    why = hc_verify.setup_error(c.model, c.model.n_embd, rt.device_type)
    if why:
        raise ConfigError(why)

    def rank0():
        tracking.check_wandb(c.wandb)
        try:
            verify_shards(c.data.data_dir, meta)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data ({c.data.data_dir}): {e}") from None
        run.check()
    rt.on_rank0(rank0)
    return meta, tokenizer, notes


def build(c, rt, run, meta):
    """The model (the same init on every rank) and its optimizer, from the checkpoint when resuming;
    -> (model, optimizer, checkpoint or None, the fused path's check, how max_iters=-1 was derived)."""
    torch.manual_seed(c.system.seed)
    model = GPT(c.model)
    horizon = ""
    if c.optim.max_iters == -1:  # nanochat's rule, counting this scheme's parameters (before a resume's checks)
        n = model.num_params(non_embedding=False)
        c.optim.max_iters = optim.ratio_steps(n, c.optim.param_data_ratio, c.data.total_batch_tokens)
        horizon = f" = {c.optim.param_data_ratio:g} x {n:,} params // {c.data.total_batch_tokens:,}"
    ckpt = None
    if run.resume:
        same = {"optimizer": c.optim.optimizer, "seed": c.system.seed, "data_seed": c.data.data_seed}
        if c.optim.optimizer == "muon":
            same["hc_optimizer"] = c.optim.hc_optimizer
        ckpt = run.resume_checkpoint(meta, c.optim.max_iters, same)
        saved = {**asdict(replace(c.model, **{k: v for k, v in ckpt["model_config"].items()
                                              if k in config.KEYS}))}   # keys newer than the checkpoint: this run's
        free = ("recompute", "recompute_group", "fused")   # how it computes, not what: may change on resume
        changed = [k for k, v in asdict(c.model).items() if k not in free and saved[k] != v
                   and config.KEYS[k].applies_to(c.model)]   # e.g. kron_factors of an mhc model: not part of it
        if changed:
            raise ConfigError(f"resume: the model config differs from the checkpoint's in {changed}")
        model.load_state_dict(ckpt["model"])
    model.to(rt.device)
    optimizer = optim.build(model, c.optim, rt.device_type)
    if ckpt is not None:
        base_lrs = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, base_lr in zip(optimizer.param_groups, base_lrs):  # this run's config sets the lrs
            group["base_lr"] = base_lr
    # the fused kernels' check, on every rank, before torch.compile traces them (hc_verify.py)
    fused = hc_verify.verify_fused(model, autocast_dtype=torch.bfloat16 if rt.dtype == "bfloat16" else None)
    return model, optimizer, ckpt, fused, horizon


def loaders(c, rt, ckpt):
    """The train stream (at the checkpoint's window when resuming), the fixed val windows, the bytes
    per token for BPB, and the fixed batch of the residual diagnostics (rank 0, n > 1)."""
    d, e, T = c.data, c.evals, c.model.block_size
    try:
        train_loader = TrainLoader(d.data_dir, d.batch_size, T, rt.rank, rt.world_size, d.data_seed)
        val_loader = ValLoader(d.data_dir, e.eval_batch_size or d.batch_size, T, e.eval_tokens, rt.rank,
                               rt.world_size, knob=f"eval_tokens ({e.eval_tokens})")
        token_bytes = load_token_bytes(d.data_dir).to(rt.device)
        diag_x = None
        if c.model.scheme != "plain":  # the first val windows; made on every rank, so that all stop alike
            diag_x, _ = next(iter(ValLoader(d.data_dir, e.diag_batch_size, T, e.diag_batch_size * T,
                                            knob=f"diag_batch_size ({e.diag_batch_size} sequences for the "
                                                 f"residual diagnostics)")))
            diag_x = diag_x.to(rt.device) if rt.master else None
    except (ValueError, FileNotFoundError) as err:  # e.g. eval_tokens larger than the val split
        raise ConfigError(f"data ({d.data_dir}): {err}") from None
    if ckpt is not None:
        try:
            train_loader.load_state_dict(ckpt["loader"])  # one position in the window stream, for all ranks
        except ValueError as err:
            raise ConfigError(f"resume: {err}") from None
    return train_loader, val_loader, token_bytes, diag_x


def seed_rank(seed, ckpt, rt):
    """This rank's random streams (dropout differs across ranks), or the checkpoint's for an exact continuation."""
    torch.manual_seed(seed + rt.rank)
    np.random.seed(seed + rt.rank)
    random.seed(seed + rt.rank)
    if ckpt is not None and len(ckpt["ranks"]) == rt.world_size:
        set_rng_state(ckpt["ranks"][rt.rank]["rng"])
    elif ckpt is not None and rt.master:
        print(f"resuming {len(ckpt['ranks'])}-process checkpoint on {rt.world_size} process(es): the data "
              f"continues exactly, the dropout random streams start afresh")


def start_log(c, rt, run, scope, model, meta, ckpt, notes, fused, grad_accum, tokens):
    """The log header (also the wandb config): the resolved config and the run's facts; the last checks (the
    disk, wandb's server), then the run's first write: out_dir claimed and the header written. -> (header,
    the wandb run or None)."""
    flat = config.flat(c)
    facts = {"config_name": c.name, **run_identity(meta, REPO), "world_size": rt.world_size, "grad_accum": grad_accum,
             "num_params": model.num_params(), "flops_per_token": model.estimate_flops_per_token(c.model.block_size),
             "tokens": tokens, "device_name": torch.cuda.get_device_name() if rt.device_type == "cuda" else "cpu",
             "fused_path": fused["path"], "fused_reason": fused["reason"], "notes": notes}
    facts["setting"] = setting_name(setting({**flat, **facts}, config.KEYS))  # the seeds of one experiment share it
    header = {"type": "config" if ckpt is None else "resume", **flat, **facts}
    if ckpt is not None:
        header["step"] = ckpt["step"]
    need = 3 * sum(p.numel() * p.element_size() for p in model.parameters())   # the weights and AdamW's moments
    rt.on_rank0(lambda: run.check_disk(need))
    wandb_run = None
    if c.wandb.wandb_log:
        wandb_run = rt.on_rank0(lambda: tracking.start_wandb(header, (ckpt or {}).get("wandb_id"),
                                                             (ckpt or {}).get("wandb_group")))
        if wandb_run is not None:  # a run that stops by an error is marked failed on wandb
            scope.push(lambda exc_type, *_: wandb_run.finish(exit_code=1) if exc_type else None)
    rt.on_rank0(lambda: run.claim(scope))  # --overwrite: the old run aside
    rt.on_rank0(lambda: run.start_log(header, None if ckpt is None else ckpt["step"]))
    return header, wandb_run


def save(c, rt, run, step, tokens, model, optimizer, train_loader, meta, tokenizer, wandb_run, loss_ema):
    """Every rank's random state and data position gathered; rank 0 writes ckpt.pt (rundir.py) and every
    rank stops if it could not. The checkpoint carries the run's tokenizer. -> whether one was written."""
    mine = {"rng": rng_state(), "loader": train_loader.state_dict()}
    ranks = [None] * rt.world_size
    if rt.ddp:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    return rt.on_rank0(lambda: run.save({
        "model": model.state_dict(), "model_config": asdict(model.config), "optimizer": optimizer.state_dict(),
        "step": step, "tokens": tokens, "config": config.flat(c), "rng": ranks[0]["rng"], "loader": ranks[0]["loader"],
        "ranks": ranks, "world_size": rt.world_size, "data_id": data_id(meta), "tokenizer": tokenizer,
        "wandb_id": wandb_run.id if wandb_run is not None else None,
        "wandb_group": wandb_run.group if wandb_run is not None else None, "loss_ema": loss_ema.state_dict()})) \
        if c.rundir.checkpoint else False


def logger(rt, run, wandb_run):
    """log(record, wandb_extra=None), called on every rank: rank 0 writes log.jsonl and wandb (the same metric
    names, tracking.wandb_key), and its failed write (a WriteError) stops every rank."""
    def log(record, wandb_extra=None):
        def write():
            run.log(record)
            if wandb_run is not None:
                tracking.log_record(wandb_run, record, wandb_extra)
        rt.on_rank0(write)
    return log


# -----------------------------------------------------------------------------
# training

def train(c, user, rt, scope):
    """One run of Config c on Runtime rt; user: the flat config as given (the notes name what it ignores)."""
    run = RunDir(c.rundir)
    meta, tokenizer, notes = check(c, user, rt, run)
    hellaswag_examples, final = evals.training.plan(c.evals)
    model, optimizer, ckpt, fused, horizon = build(c, rt, run, meta)
    enc = load_tokenizer({"tokenizer": tokenizer}) if hellaswag_examples or final["hellaswag"] or final["core"] else None
    ddp_model = eval_model = torch.compile(model) if rt.compile else model
    if rt.ddp:
        ddp_model = DDP(ddp_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    train_loader, val_loader, token_bytes, diag_x = loaders(c, rt, ckpt)
    seed_rank(c.system.seed, ckpt, rt)
    step = start_step = ckpt["step"] if ckpt is not None else 0
    tokens = ckpt.get("tokens", 0) if ckpt is not None else 0   # counted (a resume may change the batch)
    loss_ema = LossEMA(rt.device, (ckpt or {}).get("loss_ema"))
    oc, tokens_per_step, ctx = c.optim, c.data.total_batch_tokens, rt.autocast()
    grad_accum = tokens_per_step // (c.data.batch_size * c.model.block_size * rt.world_size)
    header, wandb_run = start_log(c, rt, run, scope, model, meta, ckpt, notes, fused, grad_accum, tokens)
    if rt.master:
        tracking.announce(header, meta, horizon, final["skipped"])
    log = logger(rt, run, wandb_run)
    peak, last_ckpt_step, result = peak_flops(rt.device_type), start_step if ckpt is not None else None, {}
    nonfinite = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=rt.device)  # 1st bad step, loss, norm
    t_last, t_start, steps_since = time.perf_counter(), time.perf_counter(), 0
    ddp_model.train()
    while True:
        # evaluate (and checkpoint) every eval_interval steps and at the end
        resumed_here = ckpt is not None and step == start_step  # the checkpoint's own eval is in the log
        if (step % c.evals.eval_interval == 0 or step == oc.max_iters) and not resumed_here:
            record, wandb_data, extra = evals.training.training_eval(
                step, tokens, eval_model, model, val_loader, token_bytes, hellaswag_examples, diag_x, ctx, rt.device,
                rt.ddp, wandb_run, enc)
            if not math.isfinite(record["val_loss"]):  # never checkpointed, never "the last good checkpoint"
                msg = nonfinite_val_message(step, record["val_loss"], run.path if c.rundir.checkpoint else None,
                                            last_ckpt_step)
                log({"type": "error", "step": step, "tokens": tokens, "message": msg})
                raise Diverged(msg)
            if rt.master:
                print(f"eval step {step}: val loss {record['val_loss']:.4f} | val bpb {record['val_bpb']:.4f}{extra}")
            log(record, wandb_data)
            result.update(step=step, val_loss=record["val_loss"], val_bpb=record["val_bpb"])
            if (step > 0 or ckpt is not None) and save(c, rt, run, step, tokens, model, optimizer, train_loader, meta,
                                                       tokenizer, wandb_run, loss_ema):
                last_ckpt_step = step
            t_last, steps_since = time.perf_counter(), 0  # eval time is not training time
        if step >= oc.max_iters:
            break

        # one optimizer step over grad_accum micro-batches
        for group in optimizer.param_groups:  # every group: its own peak lr times the schedule
            group["lr"] = optim.lr_at(step, oc, group["base_lr"])
        lr = optimizer.param_groups[0]["lr"]  # logged: AdamW's learning_rate, or Muon's matrix_lr
        if oc.optimizer == "muon":
            for group in optimizer.muon.param_groups:
                group["momentum"] = optim.muon_momentum(step, oc)
        loss_sum = torch.zeros((), device=rt.device)
        for micro_step in range(grad_accum):
            x, y = train_loader.next_batch()
            if rt.device_type == "cuda":
                x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
            if rt.ddp:  # all-reduce the gradients only on the last micro-step
                ddp_model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                _, loss = ddp_model(x, y)
            last_loss = loss.detach()
            loss = loss / grad_accum
            loss.backward()
            loss_sum += loss.detach()
        loss_ema.update(last_loss)  # nanochat's logged loss: rank 0's last micro-batch, smoothed
        if rt.ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= rt.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip or float("inf"))
        nonfinite = flag_nonfinite(nonfinite, step + 1, loss_sum, grad_norm, optimizer)  # no host sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        steps_since += 1

        # the host looks at log steps and before every eval and checkpoint: one sync, not one per step
        if step % c.rundir.log_interval == 0 or step % c.evals.eval_interval == 0 or step >= oc.max_iters:
            train_loss, train_loss_ema, grad_norm, *bad = torch.cat([
                loss_sum.double().view(1), loss_ema.value().view(1), grad_norm.double().view(1), nonfinite]).tolist()
            if bad[0] >= 0:
                bad_step, msg = nonfinite_message(bad, step, optimizer, run.path if c.rundir.checkpoint else None,
                                                  last_ckpt_step)
                log({"type": "error", "step": bad_step, "tokens": tokens - (step - bad_step) * tokens_per_step,
                     "message": msg})
                raise Diverged(msg)
        if step % c.rundir.log_interval == 0:
            dt = (time.perf_counter() - t_last) / steps_since
            tok_per_s = tokens_per_step / dt
            mfu = header["flops_per_token"] * tok_per_s / (peak * rt.world_size) if peak else None
            record = {"type": "train", "step": step, "tokens": tokens, "loss": train_loss, "loss_ema": train_loss_ema,
                      "lr": lr, "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu, "ms": dt * 1000}
            if rt.master:
                print(f"step {step:6d} | loss {train_loss:.4f} (ema {train_loss_ema:.4f}) | lr {lr:.2e} | grad norm "
                      f"{grad_norm:.3f} | {tok_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{mfu:.1%}'} | "
                      f"{dt * 1000:.0f} ms | eta {fmt_time(dt * (oc.max_iters - step))}")
            log(record)
            t_last, steps_since = time.perf_counter(), 0

    if final["hellaswag"] or final["core"] or final["skipped"]:
        result.update(evals.training.run_final_evals(final, model, step, tokens, rt.device, ctx, rt, log, enc,
                                                     run.path, c.evals.core_max_per_task))
    if wandb_run is not None:
        wandb_run.finish()
    if rt.master:
        saved = (os.path.join(run.path, "ckpt.pt") if last_ckpt_step is not None else
                 "none (checkpoint=False)" if not c.rundir.checkpoint else "none (no step was trained)")
        print(f"done: step {step}, {tokens:,} tokens, {fmt_time(time.perf_counter() - t_start)} | "
              f"val loss {result['val_loss']:.4f} | val bpb {result['val_bpb']:.4f} | checkpoint {saved}")
    return {**result, "tokens": tokens, "out_dir": run.path}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(config.usage())
        return None
    user = configurator.load(config.KEYS, argv)
    files = [a for a in argv if not a.startswith("--")]
    c = config.build(user, os.path.splitext(os.path.basename(files[-1]))[0] if files else "default")
    rt = runtime.start(c.system)
    try:
        with contextlib.ExitStack() as scope:  # holds the out_dir lock for the run's life
            result = train(c, user, rt, scope)
        rt.barrier()  # every rank done before any tears down the process group (an early teardown aborts a peer)
        return result
    finally:
        rt.close()


if __name__ == "__main__":
    try:
        main()
    except HcgptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; continue from the last checkpoint, if any, with the same command and --resume",
              file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python train.py --help | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
