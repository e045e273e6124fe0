"""
Pretrain a GPT with any residual scheme, on one CPU, one GPU, or many GPUs with torchrun.

    python train.py configs/quickstart.py                                  # CPU, ~4 minutes on 2 cores
    torchrun --standalone --nproc_per_node=8 train.py configs/fwe_m.py --scheme=kromhc

Config: the defaults below, then config files (configs/*.py) and --key=value overrides, in
order (configurator.py; unknown keys and wrong types are errors). Every eval_interval steps
and at the end: val loss and val BPB over fixed val tokens (all-reduced, independent of the
number of GPUs), the residual-scheme diagnostics on a fixed val batch, and a checkpoint;
with final_hellaswag / final_core, HellaSwag and CORE once at the end when their data is here.
Outputs in out_dir: ckpt.pt (atomic and fsynced; the last keep_checkpoints also as ckpt_<step>.pt),
log.jsonl (one JSON object per line); wandb optional. One run per out_dir: it is locked for the
run's life, and a run already there is refused unless --resume or --overwrite=True (see --help).
Every check that can refuse the run comes before its first write in out_dir; --overwrite moves the
old run aside and deletes it only once the new run's first checkpoint is on disk (docs/errors.md).
"""

import contextlib
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

# On CPU, idle OpenMP threads that spin starve every other process on the cores (and a busy
# machine starves them: 4x slower steps measured on 2 shared cores); let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import evals.hellaswag
import evals.training
import hc
import hc_verify
import rundir
import tracking
from common import (DistributedSetupError, LossEMA, flag_nonfinite, fmt_time, init_distributed, keep_freed_memory,
                    nonfinite_message, peak_flops, set_rng_state)
from configurator import ConfigError
from data.loader import TrainLoader, ValLoader, load_token_bytes, verify_shards
from model import GPT, GPTConfig
from rundir import CheckpointWriteError
from setting import run_name, setting, setting_name

# -----------------------------------------------------------------------------
# default config values
DEFAULTS = dict(
    # I/O
    out_dir="",  # "" -> out/<run name>
    eval_interval=250,  # steps between evals (also checkpoints); always at the end
    log_interval=10,  # steps between train-loss log lines
    eval_tokens=1_048_576,  # fixed val tokens per eval (the same windows every time)
    eval_batch_size=0,  # sequences per rank per eval forward; 0 -> batch_size
    diag_batch_size=4,  # sequences of the fixed val batch for the residual diagnostics
    checkpoint=True,  # write <out_dir>/ckpt.pt at every eval
    hellaswag=False,  # also HellaSwag acc_norm at every eval (scripts/eval_hellaswag.py)
    hellaswag_file="",  # "" -> the cached / downloaded validation jsonl
    hellaswag_limit=0,  # items scored per eval; 0 -> all 10,042
    final_hellaswag=False,  # HellaSwag on all items once at the end, if the jsonl is here (hellaswag_file or the cache)
    final_core=False,  # CORE (scripts/eval_core.py) once at the end, if the eval bundle is here
    core_bundle_dir="",  # "" -> the cache ($HCGPT_CACHE_DIR/eval_bundle, ~/.cache/hcgpt/eval_bundle)
    core_max_per_task=-1,  # items per CORE task at the end; -1 -> all (nanochat's base_eval), 500: base_train's
    resume=False,  # continue from <out_dir>/ckpt.pt
    resume_from="",  # continue from this checkpoint (ckpt_2000.pt in out_dir, a path or a run dir); implies resume
    overwrite=False,  # start afresh in an out_dir holding a run (deleted at the new run's first checkpoint)
    keep_checkpoints=0,  # also keep the last K checkpoints as <out_dir>/ckpt_<step>.pt; 0 -> ckpt.pt only
    # wandb
    wandb_log=False,  # log to Weights & Biases
    wandb_project="hcgpt",  # wandb project
    wandb_run_name="",  # "" -> <config>-<scheme>-n<n_streams>-s<seed>[-d<data_seed>]; also names out_dir
    wandb_mode="online",  # online | offline | disabled
    wandb_group="",  # "" -> the run's setting (setting.py): the seeds of one experiment share it
    wandb_tags="",  # comma-separated; "" -> scheme, n<n>, arch, optimizer, dataset, tokenizer
    # data
    dataset="pydocs",  # data/<dataset>, made by `python data/prepare.py <dataset>`
    data_dir="",  # overrides the dataset's directory
    batch_size=16,  # sequences per GPU per micro-step
    block_size=1024,  # sequence length
    total_batch_tokens=524_288,  # tokens per optimizer step, all GPUs and micro-steps together
    # model
    arch="gpt2",  # gpt2 (nanoGPT) | nanochat (nanochat's d12-era model: rotary, QK-norm, ReLU^2, softcap; model.py)
    n_layer=12,  # transformer blocks
    n_head=12,  # attention heads
    n_embd=768,  # model width (d_model)
    dropout=0.0,  # dropout probability (0 for pretraining)
    bias=True,  # biases in the linear layers and LayerNorms
    vocab_size=0,  # 0 -> the data's tokenizer's vocab (meta.json) rounded up to a multiple of 64 (50304 for GPT-2)
    nanochat_init="e1770a3",  # arch nanochat: e1770a3 (normal, zero unembedding) | 48abd7d (uniform; from 2026-01-01)
    embedding_dtype="float32",  # arch nanochat: float32 | bfloat16 (token embedding stored in bf16: nanochat on CUDA)
    # residual scheme (hc.py)
    scheme="plain",  # plain | hc | mhc | mhc_lite | kromhc | mhc_v4 (DeepSeek-V4's mHC, docs/mhc_v4.md)
    n_streams=0,  # 0 -> 1 for plain, 4 for the others
    stream_dtype="float32",  # float32 | bfloat16 | bfloat16_hc (bf16 for n > 1, fp32 for plain): the residual streams
    readout="mean",  # mean: ln_f(stream mean) | norm_sum: Σ ln_f(each stream) (published code) | hc_head: DeepSeek-V4
    decay_static=False,  # also weight-decay hc's and mhc's 2-D static coefficients, as the published code
    sinkhorn_iters=20,  # mhc, mhc_v4: Sinkhorn-Knopp iterations
    sinkhorn_end="rows",  # mhc: rows (mHC Eq. 9, rows exact) | cols (the published code: columns exact)
    kron_factors=None,  # kromhc: e.g. (2, 3) for n = 6; None -> the prime factors of n
    res_logit_init=-8.0,  # mhc / mhc_lite / kromhc: off-identity H_res logit at init
    gate_init=0.01,  # the alpha gates at init
    coeff_norm="flat",  # mhc family: flat (mHC Eq. 7: one RMS over the n C values) | stream (each stream alone)
    hc_eps=1e-6,  # mhc_v4 and readout=hc_head: DeepSeek-V4's eps (added to H_pre and the readout weights, in Sinkhorn)
    hc_branch_init_scale_sqrt_n=False,  # HC paper: output projections' init std x sqrt(n)
    recompute="none",  # none | connections | blocks: recompute activations in backward instead of saving them
    # optimizer: adamw (everything on AdamW) | muon (nanochat's Muon + AdamW; arch="nanochat" only)
    optimizer="adamw",  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest; arch=nanochat)
    learning_rate=6e-4,  # peak lr; adamw: every parameter; muon: the connections' AdamW parameters
    max_iters=10_000,  # optimizer steps in the run; -1 -> from param_data_ratio (nanochat's num_iterations=-1)
    param_data_ratio=20.0,  # max_iters=-1: steps = ratio x all parameters // total_batch_tokens (nanochat's rule)
    weight_decay=0.1,  # AdamW's, on its 2-D weights (muon: embedding, unembedding, connections' projections)
    beta1=0.9,  # AdamW beta1
    beta2=0.95,  # AdamW beta2
    adam_eps=1e-8,  # AdamW eps (nanochat: 1e-10)
    grad_clip=1.0,  # max global gradient norm; 0 -> no clipping
    # muon: nanochat's lrs; the AdamW ones are scaled by (n_embd / 768)^-0.5 as in nanochat
    matrix_lr=0.02,  # Muon: the blocks' 2-D matrices
    embedding_lr=0.2,  # AdamW: the token embedding
    unembedding_lr=0.004,  # AdamW: lm_head
    muon_momentum=0.95,  # reached after muon_momentum_warmup steps ...
    muon_momentum_start=0.85,  # ... linearly from this one (nanochat: 0.85 -> 0.95 over 300 steps)
    muon_momentum_warmup=300,  # steps of the Muon momentum warmup
    muon_weight_decay=0.0,  # Muon's decoupled weight decay (p <- p (1 - lr wd)) on the blocks' matrices; nanochat: none
    hc_optimizer="adamw",  # muon: the connections' 2-D projections on adamw (learning_rate) | muon (matrix_lr)
    # learning rate schedule: linear warmup, then cosine (or hold + linear warmdown) to min_lr
    lr_schedule="cosine",  # cosine | linear
    warmup_iters=200,  # linear warmup steps
    lr_decay_iters=0,  # step at which the lr reaches min_lr; 0 -> max_iters
    min_lr_ratio=0.1,  # min_lr = learning_rate * min_lr_ratio
    warmdown_frac=0.2,  # linear: the final fraction of lr_decay_iters spent decaying
    # system
    device="auto",  # auto | cpu | cuda
    dtype="auto",  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16: autocast dtype
    compile="auto",  # auto (on for CUDA) | True | False: torch.compile
    fused="auto",  # auto | on | off: hc.FUSED, the Triton kernels of the connections (checked at start)
    seed=1337,  # init and dropout seed, in [0, 2**31)
    data_seed=-1,  # data order seed (the train windows' shuffle), in [0, 2**31); -1 -> seed
)
ALLOWED_TYPES = {"kron_factors": (tuple, type(None)), "compile": (bool, str)}
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
REPO = os.path.dirname(os.path.abspath(__file__))


class Diverged(RuntimeError):
    pass


def get_lr(step, cfg, base_lr=None):
    """The lr at step for a group whose peak lr is base_lr (default: learning_rate)."""
    lr, warmup = cfg["learning_rate"] if base_lr is None else base_lr, cfg["warmup_iters"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    min_lr = lr * cfg["min_lr_ratio"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay_iters:
        return min_lr
    if cfg["lr_schedule"] == "cosine":
        ratio = (step - warmup) / max(1, decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
    start = max(warmup, decay_iters - round(cfg["warmdown_frac"] * decay_iters))  # linear warmdown
    if step < start:
        return lr
    return lr + (step - start) / max(1, decay_iters - start) * (min_lr - lr)


def ratio_steps(num_params, ratio, total_batch_tokens):
    """nanochat's training horizon (scripts/base_train.py, target_param_data_ratio): ratio x num_params
    tokens in whole steps, num_params counting every parameter (embedding, unembedding, the
    connections): 20 x 185,597,952 // 524,288 = 7,080 steps for nanochat's d12 at 65,536 tokens."""
    return int(ratio * num_params) // total_batch_tokens


def muon_momentum(step, cfg):
    """Muon's momentum: muon_momentum_start -> muon_momentum linearly over muon_momentum_warmup steps."""
    frac = min(step / cfg["muon_momentum_warmup"], 1.0) if cfg["muon_momentum_warmup"] else 1.0
    return (1 - frac) * cfg["muon_momentum_start"] + frac * cfg["muon_momentum"]


# -----------------------------------------------------------------------------
# the run: settings derived from the config, checks before anything is written, model and optimizer

def resolve(cfg, config_name, world_size, device_type):
    """Fill in what the config leaves to the run (n_streams, names, paths, vocab, dtype, compile, wandb
    mode); -> (meta of the dataset, grad_accum, notes: the keys this run ignores and other things to say once)."""
    notes = list(configurator.ignored(cfg, DEFAULTS).values())
    notes += [n for n in [tracking.resolve_mode(cfg)] if n]
    for key in configurator.PATHS:  # --out_dir=~/run: no shell expands a "~" after "="
        cfg[key] = os.path.expanduser(cfg[key])
    micro_tokens = cfg["batch_size"] * cfg["block_size"] * world_size
    if cfg["total_batch_tokens"] % micro_tokens:
        raise ConfigError(
            f"config key 'total_batch_tokens' ({cfg['total_batch_tokens']}) must be divisible by "
            f"batch_size x block_size x world_size = {cfg['batch_size']} x {cfg['block_size']} x {world_size} "
            f"= {micro_tokens}")
    if cfg["n_streams"] == 0:
        cfg["n_streams"] = 1 if cfg["scheme"] == "plain" else 4
    if cfg["data_seed"] == -1:
        cfg["data_seed"] = cfg["seed"]
    cfg["wandb_run_name"] = cfg["wandb_run_name"] or run_name(config_name, cfg["scheme"], cfg["n_streams"], cfg["seed"],
                                                              cfg["data_seed"])
    cfg["out_dir"] = cfg["out_dir"] or os.path.join("out", cfg["wandb_run_name"])
    cfg["data_dir"] = cfg["data_dir"] or os.path.join(REPO, "data", cfg["dataset"])
    meta = rundir.data_meta(cfg["data_dir"], cfg["dataset"])  # prepared, its tokenizer recorded, or how to prepare it
    if cfg["vocab_size"] == 0:
        cfg["vocab_size"] = (meta["vocab_size"] + 63) // 64 * 64
    elif cfg["vocab_size"] < meta["vocab_size"]:
        raise ConfigError(f"config key 'vocab_size' ({cfg['vocab_size']}) is smaller than the tokenizer's "
                          f"vocab ({meta['vocab_size']}); use 0 for the default")
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if cfg["compile"] == "auto":
        cfg["compile"] = device_type == "cuda"
    cfg["resume"] = cfg["resume"] or bool(cfg["resume_from"])  # resume_from implies resume
    cfg["resume_from"] = rundir.resume_path(cfg)
    return meta, cfg["total_batch_tokens"] // micro_tokens, notes


def check_run(cfg, meta, ddp, master, device_type):
    """What can refuse the run before anything is built (build and loaders check the rest), all
    read-only; -> (HellaSwag items for the evals or None, the end-of-run plan). Rank 0 checks wandb,
    the shards and out_dir (it alone writes there) and every rank stops on its verdict."""
    why = hc_verify.setup_error(cfg["scheme"], cfg["n_streams"], cfg["n_embd"], cfg["fused"], device_type,
                                kron_factors=cfg["kron_factors"], sinkhorn_iters=cfg["sinkhorn_iters"],
                                sinkhorn_end=cfg["sinkhorn_end"])
    if why:
        raise ConfigError(why)
    hellaswag_examples = None
    if cfg["hellaswag"]:
        try:
            hellaswag_examples = evals.hellaswag.load_examples(cfg["hellaswag_file"] or None,
                                                               limit=cfg["hellaswag_limit"] or None)
        except (OSError, ValueError, RuntimeError) as e:  # missing file, bad jsonl, failed download
            raise ConfigError(f"config key 'hellaswag': cannot read the HellaSwag items ({e}); set 'hellaswag_file' "
                              f"to a local hellaswag_val.jsonl, or --hellaswag=False") from None
    try:
        final = evals.training.plan_final_evals(cfg["final_hellaswag"], cfg["hellaswag_file"], cfg["final_core"],
                                                cfg["core_bundle_dir"])
    except ValueError as e:  # a file or bundle the config names is missing or unreadable
        raise ConfigError(str(e)) from None

    def rank0_checks():
        tracking.check_wandb(cfg)
        try:
            verify_shards(cfg["data_dir"], meta)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data ({cfg['data_dir']}): {e}") from None
        rundir.check_out_dir(cfg)
    rundir.on_rank0(rank0_checks, ddp, master)
    return hellaswag_examples, final


def build(cfg, meta, device, device_type):
    """The model (the same init on every rank) and its optimizer, from the checkpoint when resuming;
    -> (raw_model, optimizer, checkpoint or None, the fused path's check, how max_iters=-1 was derived)."""
    torch.manual_seed(cfg["seed"])
    gptconf = GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})
    try:
        raw_model = GPT(gptconf)
    except ValueError as e:  # hc.py's errors: a scheme that cannot take this n, bad factors, ...
        raise ConfigError(f"model config: {e}") from None
    horizon = ""
    if cfg["max_iters"] == -1:  # nanochat's rule, counting this scheme's parameters (before a resume's checks)
        n = raw_model.num_params(non_embedding=False)
        cfg["max_iters"] = ratio_steps(n, cfg["param_data_ratio"], cfg["total_batch_tokens"])
        horizon = f" = {cfg['param_data_ratio']:g} x {n:,} params // {cfg['total_batch_tokens']:,}"
    ckpt = rundir.load_resume_checkpoint(cfg, meta) if cfg["resume"] else None
    if ckpt is not None:
        saved = {**asdict(GPTConfig()), **ckpt["model_config"]}  # keys newer than the checkpoint: defaults
        changed = [k for k in MODEL_KEYS if k != "recompute" and saved[k] != asdict(gptconf)[k]
                   and configurator.applies(k, cfg)]  # e.g. kron_factors of an mhc model: not part of it
        if changed:
            raise ConfigError(f"resume: the model config differs from the checkpoint's in {changed}")
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(device)
    betas = (cfg["beta1"], cfg["beta2"])
    if cfg["optimizer"] == "muon":
        try:
            optimizer = raw_model.configure_muon(cfg["matrix_lr"], cfg["embedding_lr"], cfg["unembedding_lr"],
                                                 cfg["learning_rate"], cfg["hc_optimizer"], cfg["weight_decay"],
                                                 betas, cfg["adam_eps"], cfg["muon_momentum"], device_type,
                                                 muon_weight_decay=cfg["muon_weight_decay"])
        except ValueError as e:  # e.g. a torch without Muon
            raise ConfigError(f"config key 'optimizer': {e}") from None
    else:
        try:
            optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], betas, device_type,
                                                       eps=cfg["adam_eps"])
        except ValueError as e:  # torch's own value checks, should one pass configurator.validate
            raise ConfigError(f"optimizer: {e}") from None
    if ckpt is not None:
        base_lrs = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, base_lr in zip(optimizer.param_groups, base_lrs):  # this run's config sets the lrs
            group["base_lr"] = base_lr
    # the fused kernels' check, on every rank, before torch.compile traces them (hc_verify.py)
    hc.FUSED = cfg["fused"]
    try:
        fused_check = hc_verify.verify_fused(raw_model, autocast_dtype=torch.bfloat16 if cfg["dtype"] == "bfloat16"
                                             else None)
    except RuntimeError as e:  # fused='on' and the kernels cannot run here or failed their check
        raise ConfigError(f"config key 'fused': {e}") from None
    return raw_model, optimizer, ckpt, fused_check, horizon


def loaders(cfg, ckpt, rank, world_size, master, device):
    """The train stream (at the checkpoint's window when resuming), the fixed val windows, the bytes
    per token for BPB, and the fixed batch of the residual diagnostics (rank 0, n > 1)."""
    eval_batch_size = cfg["eval_batch_size"] or cfg["batch_size"]
    try:
        train_loader = TrainLoader(cfg["data_dir"], cfg["batch_size"], cfg["block_size"], rank, world_size,
                                   cfg["data_seed"])
        val_loader = ValLoader(cfg["data_dir"], eval_batch_size, cfg["block_size"], cfg["eval_tokens"], rank,
                               world_size, knob=f"eval_tokens ({cfg['eval_tokens']})")
        token_bytes = load_token_bytes(cfg["data_dir"]).to(device)
        diag_x = None
        if cfg["scheme"] != "plain":  # the first val windows; made on every rank, so that all stop alike
            diag_x, _ = next(iter(ValLoader(cfg["data_dir"], cfg["diag_batch_size"], cfg["block_size"],
                                            cfg["diag_batch_size"] * cfg["block_size"],
                                            knob=f"diag_batch_size ({cfg['diag_batch_size']} sequences for the "
                                                 f"residual diagnostics)")))
            diag_x = diag_x.to(device) if master else None
    except (ValueError, FileNotFoundError) as e:  # e.g. eval_tokens larger than the val split
        raise ConfigError(f"data ({cfg['data_dir']}): {e}") from None
    if ckpt is not None:
        try:
            train_loader.load_state_dict(ckpt["loader"])  # one position in the window stream, for all ranks
        except ValueError as e:
            raise ConfigError(f"resume: {e}") from None
    return train_loader, val_loader, token_bytes, diag_x


def seed_rank(cfg, ckpt, rank, world_size, master):
    """This rank's random streams (dropout differs across ranks), or the checkpoint's for an exact continuation."""
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    if ckpt is not None and len(ckpt["ranks"]) == world_size:
        set_rng_state(ckpt["ranks"][rank]["rng"])
    elif ckpt is not None and master:
        print(f"resuming {len(ckpt['ranks'])}-process checkpoint on {world_size} process(es): the data "
              f"continues exactly, the dropout random streams start afresh")


# -----------------------------------------------------------------------------
# training

def train(cfg, config_name, ddp, rank, world_size, device, device_type, master, run_scope):
    meta, grad_accum, notes = resolve(cfg, config_name, world_size, device_type)
    hellaswag_examples, final = check_run(cfg, meta, ddp, master, device_type)
    tokens_per_step = cfg["total_batch_tokens"]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if cfg["dtype"] == "bfloat16" else nullcontext()
    raw_model, optimizer, ckpt, fused_check, horizon = build(cfg, meta, device, device_type)
    enc = rundir.data_tokenizer(cfg, meta) if hellaswag_examples or final["hellaswag"] or final["core"] else None
    model = eval_model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    flops_per_token = raw_model.estimate_flops_per_token(cfg["block_size"])
    peak = peak_flops(device_type)

    train_loader, val_loader, token_bytes, diag_x = loaders(cfg, ckpt, rank, world_size, master, device)
    seed_rank(cfg, ckpt, rank, world_size, master)
    step = start_step = ckpt["step"] if ckpt is not None else 0
    # tokens trained so far, counted (a resume may change the batch): the checkpoint carries them
    tokens = ckpt.get("tokens", start_step * tokens_per_step) if ckpt is not None else 0

    loss_ema = LossEMA(device)
    if ckpt is not None and "loss_ema" in ckpt:
        loss_ema.load_state_dict(ckpt["loss_ema"])

    # the log header (also the wandb config); the last checks (the disk, wandb's server); then the run's first write
    facts = {"config_name": config_name, **rundir.run_identity(meta, REPO), "world_size": world_size,
             "grad_accum": grad_accum, "num_params": raw_model.num_params(), "flops_per_token": flops_per_token,
             "tokens": tokens, "device_name": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
             "fused_path": fused_check["path"], "fused_reason": fused_check["reason"], "notes": notes}
    facts["setting"] = setting_name(setting({**cfg, **facts}, DEFAULTS))  # the seeds of one experiment share it
    header = rundir.run_header(cfg, ckpt, start_step, facts)
    rundir.on_rank0(lambda: rundir.check_disk(cfg, raw_model), ddp, master)
    run_id, run_group = (ckpt or {}).get("wandb_id"), (ckpt or {}).get("wandb_group")
    wandb_run = (rundir.on_rank0(lambda: tracking.start_wandb(header, run_id, run_group), ddp, master)
                 if cfg["wandb_log"] else None)
    if wandb_run is not None:  # a run that stops by an error is marked failed on wandb
        run_scope.push(lambda exc_type, *_: wandb_run.finish(exit_code=1) if exc_type else None)
    old_run = rundir.on_rank0(lambda: rundir.claim_out_dir(cfg, run_scope), ddp, master)  # --overwrite: aside
    rundir.on_rank0(lambda: rundir.start_log(cfg, ckpt, start_step, header), ddp, master)
    if master:
        tracking.announce(header, meta, horizon, final["skipped"])

    def log(record, wandb_extra=None):  # the same metric names in log.jsonl and wandb (tracking.wandb_key)
        if master:
            rundir.append_log(cfg["out_dir"], record)
        if master and wandb_run is not None:
            tracking.log_record(wandb_run, record, wandb_extra)

    last_ckpt_step = start_step if ckpt is not None else None
    nonfinite = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=device)  # 1st bad step, loss, grad norm
    result = {}
    t_last, steps_since = time.perf_counter(), 0
    t_start = t_last
    model.train()
    while True:
        # evaluate (and checkpoint) every eval_interval steps and at the end
        resumed_here = ckpt is not None and step == start_step  # the checkpoint's own eval is in the log
        if (step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]) and not resumed_here:
            record, wandb_data, extra = evals.training.training_eval(step, tokens, eval_model, raw_model, val_loader,
                                                 token_bytes, hellaswag_examples, diag_x, ctx, device, ddp, wandb_run,
                                                 enc)
            if master:
                print(f"eval step {step}: val loss {record['val_loss']:.4f} | val bpb {record['val_bpb']:.4f}{extra}")
            log(record, wandb_data)
            result.update(step=step, val_loss=record["val_loss"], val_bpb=record["val_bpb"])
            if step > 0 or ckpt is not None:
                if rundir.save_checkpoint(cfg, step, tokens, raw_model, optimizer, train_loader, meta, wandb_run, ddp,
                                          master, world_size, extra={"loss_ema": loss_ema.state_dict()}):
                    last_ckpt_step = step
                    if old_run is not None:  # the new run is on disk: the overwritten one goes
                        old_run.discard()
            t_last, steps_since = time.perf_counter(), 0  # eval time is not training time
        if step >= cfg["max_iters"]:
            break

        # one optimizer step over grad_accum micro-batches
        for group in optimizer.param_groups:  # every group: its own peak lr times the schedule
            group["lr"] = get_lr(step, cfg, group["base_lr"])
        lr = optimizer.param_groups[0]["lr"]  # logged: AdamW's learning_rate, or Muon's matrix_lr
        if cfg["optimizer"] == "muon":
            for group in optimizer.muon.param_groups:
                group["momentum"] = muon_momentum(step, cfg)
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            x, y = train_loader.next_batch()
            if device_type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            if ddp:  # all-reduce the gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                _, loss = model(x, y)
            last_loss = loss.detach()
            loss = loss / grad_accum
            loss.backward()
            loss_sum += loss.detach()
        loss_ema.update(last_loss)  # nanochat's logged loss: rank 0's last micro-batch, smoothed
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf"))
        nonfinite = flag_nonfinite(nonfinite, step + 1, loss_sum, grad_norm, optimizer)  # no host sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        steps_since += 1

        # the host looks at log steps and before every eval and checkpoint: one sync, not one per step
        if step % cfg["log_interval"] == 0 or step % cfg["eval_interval"] == 0 or step >= cfg["max_iters"]:
            train_loss, train_loss_ema, grad_norm, *bad = torch.cat([
                loss_sum.double().view(1), loss_ema.value().view(1), grad_norm.double().view(1), nonfinite]).tolist()
            if bad[0] >= 0:
                bad_step, msg = nonfinite_message(bad, step, optimizer, cfg["out_dir"] if cfg["checkpoint"] else None,
                                                  last_ckpt_step)
                if master:
                    log({"type": "error", "step": bad_step, "tokens": tokens - (step - bad_step) * tokens_per_step,
                         "message": msg})
                raise Diverged(msg)
        if step % cfg["log_interval"] == 0 and master:
            dt = (time.perf_counter() - t_last) / steps_since
            tok_per_s = tokens_per_step / dt
            mfu = flops_per_token * tok_per_s / (peak * world_size) if peak else None
            record = {"type": "train", "step": step, "tokens": tokens, "loss": train_loss, "loss_ema": train_loss_ema,
                      "lr": lr, "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu, "ms": dt * 1000}
            print(f"step {step:6d} | loss {train_loss:.4f} (ema {train_loss_ema:.4f}) | lr {lr:.2e} | "
                  f"grad norm {grad_norm:.3f} | "
                  f"{tok_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{mfu:.1%}'} | {dt * 1000:.0f} ms | "
                  f"eta {fmt_time(dt * (cfg['max_iters'] - step))}")
            log(record)
            t_last, steps_since = time.perf_counter(), 0

    if final["hellaswag"] or final["core"] or final["skipped"]:
        result.update(evals.training.run_final_evals(final, raw_model, step, tokens, device, ctx, master, log, enc,
                                                     cfg["out_dir"], cfg["core_max_per_task"]))
    if wandb_run is not None:
        wandb_run.finish()
    if master:
        saved = (os.path.join(cfg["out_dir"], "ckpt.pt") if last_ckpt_step is not None else
                 "none (checkpoint=False)" if not cfg["checkpoint"] else "none (no step was trained)")
        print(f"done: step {step}, {tokens:,} tokens, {fmt_time(time.perf_counter() - t_start)} | "
              f"val loss {result['val_loss']:.4f} | val bpb {result['val_bpb']:.4f} | checkpoint {saved}")
    return {**result, "tokens": tokens, "out_dir": cfg["out_dir"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(configurator.usage(os.path.abspath(__file__), DEFAULTS))
        return None
    cfg = configurator.load(DEFAULTS, argv, ALLOWED_TYPES)
    configurator.validate(cfg)
    config_files = [a for a in argv if not a.startswith("--")]
    config_name = os.path.splitext(os.path.basename(config_files[-1]))[0] if config_files else "default"
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use --device=cpu or --device=auto")
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device_type = "cuda" if cuda else "cpu"
    if device_type == "cpu":
        keep_freed_memory()
    ddp, rank, local_rank, world_size, device = init_distributed(device_type)
    try:
        with contextlib.ExitStack() as run_scope:  # holds the out_dir lock for the run's life
            result = train(cfg, config_name, ddp, rank, world_size, device, device_type, rank == 0, run_scope)
        if ddp:  # every rank done before any tears down the process group (an early teardown can abort a peer)
            dist.barrier()
        return result
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, Diverged, CheckpointWriteError, DistributedSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; continue from the last checkpoint, if any, with the same command and --resume",
              file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python train.py --help | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
