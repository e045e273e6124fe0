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
"""

import contextlib
import json
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
import evals
import hc
import hc_verify
import rundir
import tracking
from common import flag_nonfinite, fmt_time, init_distributed, peak_flops, set_rng_state, skips_on_device
from configurator import ConfigError
from data.loader import TrainLoader, ValLoader, load_meta, load_token_bytes, verify_shards
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
    core_max_per_task=-1,  # items per CORE task at the end; -1 -> all
    resume=False,  # continue from <out_dir>/ckpt.pt
    resume_from="",  # continue from this checkpoint (ckpt_2000.pt in out_dir, a path or a run dir); implies resume
    overwrite=False,  # start afresh in an out_dir that holds a run, deleting its ckpt*.pt and log.jsonl
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
    vocab_size=0,  # 0 -> the tokenizer's vocab rounded up to a multiple of 64 (50304 for GPT-2)
    # residual scheme (hc.py)
    scheme="plain",  # plain | hc | mhc | mhc_lite | kromhc
    n_streams=0,  # 0 -> 1 for plain, 4 for the others
    stream_dtype="float32",  # float32 | bfloat16 | bfloat16_hc (bf16 for n > 1, fp32 for plain): the residual streams
    readout="mean",  # mean: ln_f(mean of the streams) | norm_sum: sum of ln_f(each stream), as the published code
    decay_static=False,  # also weight-decay hc's and mhc's 2-D static coefficients, as the published code
    sinkhorn_iters=20,  # mhc: Sinkhorn-Knopp iterations
    sinkhorn_end="rows",  # mhc: rows (mHC Eq. 9, rows exact) | cols (the published code: columns exact)
    kron_factors=None,  # kromhc: e.g. (2, 3) for n = 6; None -> the prime factors of n
    res_logit_init=-8.0,  # mhc / mhc_lite / kromhc: off-identity H_res logit at init
    gate_init=0.01,  # the alpha gates at init
    hc_branch_init_scale_sqrt_n=False,  # HC paper: output projections' init std x sqrt(n)
    recompute="none",  # none | connections | blocks: recompute activations in backward instead of saving them
    # optimizer: adamw (everything on AdamW) | muon (nanochat's Muon + AdamW; arch="nanochat" only)
    optimizer="adamw",  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest; arch=nanochat)
    learning_rate=6e-4,  # peak lr; adamw: every parameter; muon: the connections' AdamW parameters
    max_iters=10_000,  # optimizer steps in the run
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


def muon_momentum(step, cfg):
    """Muon's momentum: muon_momentum_start -> muon_momentum linearly over muon_momentum_warmup steps."""
    frac = min(step / cfg["muon_momentum_warmup"], 1.0) if cfg["muon_momentum_warmup"] else 1.0
    return (1 - frac) * cfg["muon_momentum_start"] + frac * cfg["muon_momentum"]


# -----------------------------------------------------------------------------
# the run: settings derived from the config, checks before anything is written, model and optimizer

def resolve(cfg, config_name, world_size, device_type):
    """Fill in what the config leaves to the run (n_streams, names, paths, vocab, dtype, compile);
    -> (meta of the dataset, grad_accum)."""
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
    if not os.path.exists(os.path.join(cfg["data_dir"], "meta.json")):
        raise ConfigError(f"config key 'dataset': {cfg['data_dir']} has no meta.json; prepare it with "
                          f"`python data/prepare.py {cfg['dataset']}` (or point 'data_dir' at a prepared directory)")
    try:
        meta = load_meta(cfg["data_dir"])
    except (ValueError, OSError) as e:
        raise ConfigError(f"config key 'data_dir': {e}") from None
    if cfg["vocab_size"] == 0:
        cfg["vocab_size"] = (meta["vocab_size"] + 63) // 64 * 64
    elif cfg["vocab_size"] < meta["vocab_size"]:
        raise ConfigError(f"config key 'vocab_size' ({cfg['vocab_size']}) is smaller than the tokenizer's "
                          f"vocab ({meta['vocab_size']}); use 0 for the default")
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if cfg["compile"] == "auto":
        cfg["compile"] = device_type == "cuda"
    if cfg["resume_from"]:  # a bare file name is in out_dir; a directory is another run's out_dir
        cfg["resume"] = True
        if not os.path.dirname(cfg["resume_from"]):
            cfg["resume_from"] = os.path.join(cfg["out_dir"], cfg["resume_from"])
        if os.path.isdir(cfg["resume_from"]):
            cfg["resume_from"] = os.path.join(cfg["resume_from"], "ckpt.pt")
    cfg["resume_from"] = cfg["resume_from"] or (os.path.join(cfg["out_dir"], "ckpt.pt") if cfg["resume"] else "")
    return meta, cfg["total_batch_tokens"] // micro_tokens


def check_run(cfg, meta, ddp, master, run_scope):
    """Everything that can refuse the run, before out_dir is touched; -> (HellaSwag items for the
    evals or None, the end-of-run plan). Rank 0 decides about out_dir (it alone writes there) and
    every rank stops on its verdict."""
    hellaswag_examples = None  # the evaluation data first: an error there must not come after --overwrite
    if cfg["hellaswag"]:
        try:
            hellaswag_examples = evals.load_examples(cfg["hellaswag_file"] or None, limit=cfg["hellaswag_limit"] or None)
        except (OSError, ValueError, RuntimeError) as e:  # missing file, bad jsonl, failed download
            raise ConfigError(f"config key 'hellaswag': cannot read the HellaSwag items ({e}); set 'hellaswag_file' "
                              f"to a local hellaswag_val.jsonl, or --hellaswag=False") from None
    final = evals.plan_final_evals(cfg)
    verdict = [None]
    if master:
        try:
            tracking.check_wandb(cfg)
            try:
                verify_shards(cfg["data_dir"], meta)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"data ({cfg['data_dir']}): {e}") from None
            rundir.check_out_dir(cfg, run_scope)  # last: with --overwrite it deletes the old run
        except ConfigError as e:
            verdict = [str(e)]
    if ddp:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ConfigError(verdict[0])
    return hellaswag_examples, final


def build(cfg, meta, device, device_type):
    """The model (the same init on every rank) and its optimizer, from the checkpoint when resuming;
    -> (raw_model, optimizer, checkpoint or None, the fused path's check)."""
    torch.manual_seed(cfg["seed"])
    gptconf = GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})
    try:
        raw_model = GPT(gptconf)
    except ValueError as e:  # hc.py's errors: a scheme that cannot take this n, bad factors, ...
        raise ConfigError(f"model config: {e}") from None
    ckpt = rundir.load_resume_checkpoint(cfg, meta) if cfg["resume"] else None
    if ckpt is not None:
        saved = {**asdict(GPTConfig()), **ckpt["model_config"]}  # keys newer than the checkpoint: defaults
        changed = [k for k in MODEL_KEYS if k != "recompute" and saved[k] != asdict(gptconf)[k]]
        if changed:
            raise ConfigError(f"resume: the model config differs from the checkpoint's in {changed}")
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(device)
    betas = (cfg["beta1"], cfg["beta2"])
    if cfg["optimizer"] == "muon":
        try:
            optimizer = raw_model.configure_muon(cfg["matrix_lr"], cfg["embedding_lr"], cfg["unembedding_lr"],
                                                 cfg["learning_rate"], cfg["hc_optimizer"], cfg["weight_decay"],
                                                 betas, cfg["adam_eps"], cfg["muon_momentum"], device_type)
        except ValueError as e:  # e.g. a torch without Muon
            raise ConfigError(f"config key 'optimizer': {e}") from None
    else:
        optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], betas, device_type,
                                                   eps=cfg["adam_eps"])
    if ckpt is not None:
        for key in ("optimizer", "hc_optimizer") if cfg["optimizer"] == "muon" else ("optimizer",):  # the state's layout
            saved_value = ckpt["config"].get(key, DEFAULTS[key])
            if saved_value != cfg[key]:
                raise ConfigError(f"resume: config key {key!r} is {cfg[key]!r} but the checkpoint was trained "
                                  f"with {saved_value!r}; resume with --{key}={saved_value}")
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
    return raw_model, optimizer, ckpt, fused_check


def loaders(cfg, ckpt, rank, world_size, master, device):
    """The train stream (at the checkpoint's window when resuming), the fixed val windows, the bytes
    per token for BPB, and the fixed batch of the residual diagnostics (rank 0, n > 1)."""
    eval_batch_size = cfg["eval_batch_size"] or cfg["batch_size"]
    try:
        train_loader = TrainLoader(cfg["data_dir"], cfg["batch_size"], cfg["block_size"], rank, world_size,
                                   cfg["data_seed"])
        val_loader = ValLoader(cfg["data_dir"], eval_batch_size, cfg["block_size"], cfg["eval_tokens"], rank, world_size)
        token_bytes = load_token_bytes(cfg["data_dir"]).to(device)
        diag_x = None
        if master and cfg["scheme"] != "plain":  # the first val windows
            diag_x, _ = next(iter(ValLoader(cfg["data_dir"], cfg["diag_batch_size"], cfg["block_size"],
                                            cfg["diag_batch_size"] * cfg["block_size"])))
            diag_x = diag_x.to(device)
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


def diverged(cfg, nonfinite, step, optimizer, last_ckpt_step):
    """The message for the first non-finite step (nonfinite: [step, loss, grad norm])."""
    bad_step, bad_loss, bad_norm = int(nonfinite[0]), nonfinite[1], nonfinite[2]
    where = (f"the last good checkpoint is {os.path.join(cfg['out_dir'], 'ckpt.pt')} (step {last_ckpt_step})"
             if last_ckpt_step is not None and cfg["checkpoint"] else "no checkpoint had been written")
    skipped = ("the optimizer skipped it on the device" if skips_on_device(optimizer)
               else "the optimizer took it: the weights are not finite from then on")
    return bad_step, (f"step {bad_step}: training loss is {bad_loss} (grad norm {bad_norm}); stopping at step {step}, "
                      f"where it was checked ({skipped}); {where}. Lower learning_rate, raise warmup_iters or check "
                      f"the data.")


# -----------------------------------------------------------------------------
# training

def train(cfg, config_name, ddp, rank, world_size, device, device_type, master, run_scope):
    meta, grad_accum = resolve(cfg, config_name, world_size, device_type)
    hellaswag_examples, final = check_run(cfg, meta, ddp, master, run_scope)
    tokens_per_step = cfg["total_batch_tokens"]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if cfg["dtype"] == "bfloat16" else nullcontext()
    raw_model, optimizer, ckpt, fused_check = build(cfg, meta, device, device_type)
    model = eval_model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    flops_per_token = raw_model.estimate_flops_per_token(cfg["block_size"])
    peak = peak_flops(device_type)

    train_loader, val_loader, token_bytes, diag_x = loaders(cfg, ckpt, rank, world_size, master, device)
    seed_rank(cfg, ckpt, rank, world_size, master)
    step = start_step = ckpt["step"] if ckpt is not None else 0

    wandb_run = None
    if master:
        facts = {"config_name": config_name, **rundir.run_identity(meta, REPO),
                 "world_size": world_size, "grad_accum": grad_accum, "num_params": raw_model.num_params(),
                 "flops_per_token": flops_per_token,
                 "device_name": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
                 "fused_path": fused_check["path"], "fused_reason": fused_check["reason"]}
        facts["setting"] = setting_name(setting({**cfg, **facts}, DEFAULTS))  # the seeds of one experiment share it
        wandb_run = rundir.start_log(cfg, ckpt, start_step, facts)
        if ckpt is not None:
            print(f"resumed from step {start_step} ({cfg['resume_from']})")
        print(f"{cfg['wandb_run_name']}: {cfg['scheme']} n={cfg['n_streams']}, {raw_model.num_params() / 1e6:.2f}M params, "
              f"{world_size} process(es) on {device_type}, {grad_accum} micro-step(s) of {cfg['batch_size']} x "
              f"{cfg['block_size']} per rank, {tokens_per_step:,} tokens/step, out_dir {cfg['out_dir']}")
        print(f"residual path: {fused_check['path']} (fused={cfg['fused']}: {fused_check['reason']})")
        for msg in final["skipped"]:
            print(f"note: {msg}")

    def log(record, wandb_extra=None):  # the same metric names in log.jsonl and wandb (tracking.wandb_key)
        if not master:
            return
        with open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            tracking.log_record(wandb_run, record, wandb_extra)

    last_ckpt_step = start_step if ckpt is not None else None
    nonfinite = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=device)  # first bad step, its loss, grad norm
    result = {}
    t_last, steps_since = time.perf_counter(), 0
    t_start = t_last
    model.train()
    while True:
        # evaluate (and checkpoint) every eval_interval steps and at the end
        if (step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]) and not (ckpt is not None and step == start_step):
            record, wandb_data, extra = evals.training_eval(step, step * tokens_per_step, eval_model, raw_model, val_loader,
                                                 token_bytes, hellaswag_examples, diag_x, ctx, device, ddp, wandb_run)
            if master:
                print(f"eval step {step}: val loss {record['val_loss']:.4f} | val bpb {record['val_bpb']:.4f}{extra}")
            log(record, wandb_data)
            result.update(step=step, val_loss=record["val_loss"], val_bpb=record["val_bpb"])
            if step > 0 or ckpt is not None:
                rundir.save_checkpoint(cfg, step, step * tokens_per_step, raw_model, optimizer, train_loader, meta,
                                wandb_run, ddp, master, world_size)
                last_ckpt_step = step
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
                loss = loss / grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf"))
        nonfinite = flag_nonfinite(nonfinite, step + 1, loss_sum, grad_norm, optimizer)  # no host sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since += 1

        # the host looks at log steps and before every eval and checkpoint: one sync, not one per step
        if step % cfg["log_interval"] == 0 or step % cfg["eval_interval"] == 0 or step >= cfg["max_iters"]:
            train_loss, grad_norm, *bad = torch.cat([loss_sum.double().view(1), grad_norm.double().view(1),
                                                     nonfinite]).tolist()
            if bad[0] >= 0:
                bad_step, msg = diverged(cfg, bad, step, optimizer, last_ckpt_step)
                if master:
                    log({"type": "error", "step": bad_step, "tokens": bad_step * tokens_per_step, "message": msg})
                    if wandb_run is not None:
                        wandb_run.finish(exit_code=1)
                raise Diverged(msg)
        if step % cfg["log_interval"] == 0 and master:
            dt = (time.perf_counter() - t_last) / steps_since
            tok_per_s = tokens_per_step / dt
            mfu = flops_per_token * tok_per_s / (peak * world_size) if peak else None
            record = {"type": "train", "step": step, "tokens": step * tokens_per_step, "loss": train_loss, "lr": lr,
                      "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu, "ms": dt * 1000}
            print(f"step {step:6d} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                  f"{tok_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{mfu:.1%}'} | {dt * 1000:.0f} ms | "
                  f"eta {fmt_time(dt * (cfg['max_iters'] - step))}")
            log(record)
            t_last, steps_since = time.perf_counter(), 0

    if final["hellaswag"] or final["core"] or final["skipped"]:
        result.update(evals.run_final_evals(final, raw_model, cfg, step, tokens_per_step, device, ctx, master, log))
    if wandb_run is not None:
        wandb_run.finish()
    if master:
        saved = os.path.join(cfg["out_dir"], "ckpt.pt") if cfg["checkpoint"] else "none (checkpoint=False)"
        print(f"done: step {step}, {step * tokens_per_step:,} tokens, {fmt_time(time.perf_counter() - t_start)} | "
              f"val loss {result['val_loss']:.4f} | val bpb {result['val_bpb']:.4f} | checkpoint {saved}")
    return {**result, "out_dir": cfg["out_dir"]}


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
    device_type = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
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
    except (ConfigError, Diverged, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; continue from the last checkpoint, if any, with the same command and --resume",
              file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python train.py --help | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
