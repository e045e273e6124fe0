"""
Pretrain a GPT with any residual scheme, on one CPU, one GPU, or many GPUs with torchrun.

    python train.py configs/quickstart.py                                  # CPU, ~3 minutes
    torchrun --standalone --nproc_per_node=8 train.py configs/fwe_m.py --scheme=kromhc

Config: the defaults below, then config files (configs/*.py) and --key=value overrides, in
order (configurator.py; unknown keys and wrong types are errors). Every eval_interval steps
and at the end: val loss and val BPB over fixed val tokens (all-reduced, independent of the
number of GPUs), the residual-scheme diagnostics on a fixed val batch, and a checkpoint.
Outputs in out_dir: ckpt.pt (atomic), log.jsonl (one JSON object per line); wandb optional.
"""

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
import hc
from configurator import ConfigError
from data.loader import TrainLoader, ValLoader, load_meta, load_token_bytes
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# default config values
DEFAULTS = dict(
    # I/O
    out_dir="",  # "" -> out/<run name>
    eval_interval=250,  # steps between evals (also checkpoints); always at the end
    log_interval=10,
    eval_tokens=1_048_576,  # fixed val tokens per eval (the same windows every time)
    eval_batch_size=0,  # sequences per rank per eval forward; 0 -> batch_size
    diag_batch_size=4,  # sequences of the fixed val batch for the residual diagnostics
    checkpoint=True,  # write <out_dir>/ckpt.pt at every eval
    hellaswag=False,  # also HellaSwag acc_norm at every eval (scripts/eval_hellaswag.py)
    hellaswag_file="",  # "" -> the cached / downloaded validation jsonl
    hellaswag_limit=0,  # items scored per eval; 0 -> all 10,042
    resume=False,  # continue from <out_dir>/ckpt.pt
    # wandb
    wandb_log=False,
    wandb_project="hcgpt",
    wandb_run_name="",  # "" -> <config>-<scheme>-n<n_streams>-s<seed>; also names out_dir
    wandb_mode="online",  # online | offline | disabled
    # data
    dataset="pydocs",  # data/<dataset>, made by `python data/prepare.py <dataset>`
    data_dir="",  # overrides the dataset's directory
    batch_size=16,  # sequences per GPU per micro-step
    block_size=1024,  # sequence length
    total_batch_tokens=524_288,  # tokens per optimizer step, all GPUs and micro-steps together
    # model
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=True,
    vocab_size=0,  # 0 -> the tokenizer's vocab rounded up to a multiple of 64 (50304 for GPT-2)
    # residual scheme (hc.py)
    scheme="plain",  # plain | hc | mhc | mhc_lite | kromhc
    n_streams=0,  # 0 -> 1 for plain, 4 for the others
    stream_dtype="float32",  # float32 | bfloat16: dtype of the residual streams
    sinkhorn_iters=20,  # mhc
    kron_factors=None,  # kromhc: e.g. (2, 3) for n = 6; None -> the prime factors of n
    res_logit_init=-8.0,  # mhc / mhc_lite / kromhc: off-identity H_res logit at init
    gate_init=0.01,  # the alpha gates at init
    hc_branch_init_scale_sqrt_n=False,  # HC paper: output projections' init std x sqrt(n)
    # optimizer: AdamW
    learning_rate=6e-4,
    max_iters=10_000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 -> no clipping
    # learning rate schedule: linear warmup, then cosine (or hold + linear warmdown) to min_lr
    lr_schedule="cosine",  # cosine | linear
    warmup_iters=200,
    lr_decay_iters=0,  # 0 -> max_iters
    min_lr_ratio=0.1,  # min_lr = learning_rate * min_lr_ratio
    warmdown_frac=0.2,  # linear: the final fraction of lr_decay_iters spent decaying
    # system
    device="auto",  # auto | cpu | cuda
    dtype="auto",  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16: autocast dtype
    compile="auto",  # auto (on for CUDA) | True | False: torch.compile
    seed=1337,
)
ALLOWED_TYPES = {"kron_factors": (tuple, type(None)), "compile": (bool, str)}
CHOICES = {
    "scheme": hc.SCHEMES, "stream_dtype": ("float32", "bfloat16"), "wandb_mode": ("online", "offline", "disabled"),
    "lr_schedule": ("cosine", "linear"), "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
    "compile": ("auto", True, False),
}
POSITIVE = ("eval_interval", "log_interval", "eval_tokens", "diag_batch_size", "batch_size", "block_size",
            "total_batch_tokens", "n_layer", "n_head", "n_embd", "sinkhorn_iters")
NON_NEGATIVE = ("hellaswag_limit", "eval_batch_size", "vocab_size", "n_streams", "max_iters", "weight_decay", "grad_clip",
                "warmup_iters", "lr_decay_iters", "learning_rate")
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
REPO = os.path.dirname(os.path.abspath(__file__))


class Diverged(RuntimeError):
    pass


def validate(cfg):
    """Errors that do not need the data or the device, each naming its key."""
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise ConfigError(f"config key {key!r} must be one of {options}, got {cfg[key]!r}")
    for key in POSITIVE:
        if cfg[key] <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {cfg[key]!r}")
    for key in NON_NEGATIVE:
        if cfg[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {cfg[key]!r}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ConfigError(f"config key 'dropout' must be in [0, 1), got {cfg['dropout']}")
    if not 0.0 <= cfg["min_lr_ratio"] <= 1.0:
        raise ConfigError(f"config key 'min_lr_ratio' must be in [0, 1], got {cfg['min_lr_ratio']}")
    if not 0.0 < cfg["warmdown_frac"] <= 1.0:
        raise ConfigError(f"config key 'warmdown_frac' must be in (0, 1], got {cfg['warmdown_frac']}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"config key 'n_embd' ({cfg['n_embd']}) must be divisible by 'n_head' ({cfg['n_head']})")


def get_lr(step, cfg):
    lr, warmup = cfg["learning_rate"], cfg["warmup_iters"]
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


def peak_flops(device_type):
    if device_type != "cuda":
        return None
    from scripts.bench import bf16_peak  # the one table of dense bf16 peaks, shared with bench.py
    return bf16_peak(torch.cuda.get_device_name())


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def hres_figure(matrices, composite):
    """A grid of heatmaps: every connection's token-averaged H_res, then the composite."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = list(matrices.items()) + [("composite", composite)]
    cols = min(8, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, items):
        ax.imshow(np.array(m), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(name, fontsize=7)
    fig.tight_layout()
    return fig


@torch.no_grad()
def evaluate(model, batches, token_bytes, ctx, device, ddp=False):
    """(val loss, val BPB) over batches of (x, y), summed over ranks. Loss: mean nats per target
    token. BPB = nats / (ln 2 x bytes) over the target tokens that are text: special tokens have
    0 bytes in token_bytes and count in neither sum (as in nanochat)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats of text, bytes
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with ctx:
            _, loss = model(x, y, reduction="none")
        loss = loss.double()
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        sums += torch.stack([loss.sum(), valid.sum(), (loss * (nbytes > 0)).sum(), nbytes.sum()])
    if ddp:
        dist.all_reduce(sums)
    model.train(was_training)
    nats, count, text_nats, nbytes = sums.tolist()
    return nats / count, text_nats / (math.log(2) * nbytes)


@torch.no_grad()
def residual_diagnostics(raw_model, x, ctx):
    """hc.diagnostics of every connection of the (uncompiled) model on the batch x."""
    coeffs = []
    hooks = [c.register_forward_pre_hook(lambda mod, args: coeffs.append(mod.coefficients(args[0])))
             for c in raw_model.connections()]
    was_training = raw_model.training
    raw_model.eval()
    try:
        with ctx:
            raw_model(x)
    finally:
        for h in hooks:
            h.remove()
        raw_model.train(was_training)
    return hc.diagnostics(coeffs, raw_model.connection_names())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = configurator.load(DEFAULTS, argv, ALLOWED_TYPES)
    validate(cfg)
    config_files = [a for a in argv if not a.startswith("--")]
    config_name = os.path.splitext(os.path.basename(config_files[-1]))[0] if config_files else "default"

    # ---- distributed setup and device ----
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use --device=cpu or --device=auto")
    device_type = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    else:
        rank, local_rank, world_size, device = 0, 0, 1, device_type
    master = rank == 0
    try:
        return train(cfg, config_name, ddp, rank, world_size, device, device_type, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, config_name, ddp, rank, world_size, device, device_type, master):
    # ---- derived config ----
    micro_tokens = cfg["batch_size"] * cfg["block_size"] * world_size
    if cfg["total_batch_tokens"] % micro_tokens:
        raise ConfigError(
            f"config key 'total_batch_tokens' ({cfg['total_batch_tokens']}) must be divisible by "
            f"batch_size x block_size x world_size = {cfg['batch_size']} x {cfg['block_size']} x {world_size} "
            f"= {micro_tokens}")
    grad_accum = cfg["total_batch_tokens"] // micro_tokens
    if cfg["n_streams"] == 0:
        cfg["n_streams"] = 1 if cfg["scheme"] == "plain" else 4
    cfg["wandb_run_name"] = cfg["wandb_run_name"] or f"{config_name}-{cfg['scheme']}-n{cfg['n_streams']}-s{cfg['seed']}"
    cfg["out_dir"] = cfg["out_dir"] or os.path.join("out", cfg["wandb_run_name"])
    cfg["data_dir"] = cfg["data_dir"] or os.path.join(REPO, "data", cfg["dataset"])
    if not os.path.exists(os.path.join(cfg["data_dir"], "meta.json")):
        raise ConfigError(f"config key 'dataset': {cfg['data_dir']} has no meta.json; prepare it with "
                          f"`python data/prepare.py {cfg['dataset']}` (or point 'data_dir' at a prepared directory)")
    meta = load_meta(cfg["data_dir"])
    if cfg["vocab_size"] == 0:
        cfg["vocab_size"] = (meta["vocab_size"] + 63) // 64 * 64
    elif cfg["vocab_size"] < meta["vocab_size"]:
        raise ConfigError(f"config key 'vocab_size' ({cfg['vocab_size']}) is smaller than the tokenizer's "
                          f"vocab ({meta['vocab_size']}); use 0 for the default")
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if cfg["compile"] == "auto":
        cfg["compile"] = device_type == "cuda"
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    if cfg["resume"] and not os.path.exists(ckpt_path):
        raise ConfigError(f"config key 'resume' is set but there is no checkpoint at {ckpt_path}")
    tokens_per_step = cfg["total_batch_tokens"]

    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if cfg["dtype"] == "bfloat16" else nullcontext()

    # ---- model and optimizer (same init on every rank) ----
    torch.manual_seed(cfg["seed"])
    gptconf = GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})
    try:
        raw_model = GPT(gptconf)
    except ValueError as e:  # hc.py's errors: a scheme that cannot take this n, bad factors, ...
        raise ConfigError(f"model config: {e}") from None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if cfg["resume"] else None
    if ckpt is not None:
        changed = [k for k in MODEL_KEYS if ckpt["model_config"][k] != asdict(gptconf)[k]]
        if changed:
            raise ConfigError(f"resume: the model config differs from the checkpoint's in {changed}")
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                               (cfg["beta1"], cfg["beta2"]), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    model = torch.compile(raw_model) if cfg["compile"] else raw_model
    eval_model = model
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    flops_per_token = raw_model.estimate_flops_per_token(cfg["block_size"])
    peak = peak_flops(device_type)

    # ---- data ----
    eval_batch_size = cfg["eval_batch_size"] or cfg["batch_size"]
    try:
        train_loader = TrainLoader(cfg["data_dir"], cfg["batch_size"], cfg["block_size"], rank, world_size, cfg["seed"])
        val_loader = ValLoader(cfg["data_dir"], eval_batch_size, cfg["block_size"], cfg["eval_tokens"], rank, world_size)
        token_bytes = load_token_bytes(cfg["data_dir"]).to(device)
        diag_x = None
        if master and cfg["scheme"] != "plain":  # the fixed batch for the diagnostics: the first val windows
            diag_x, _ = next(iter(ValLoader(cfg["data_dir"], cfg["diag_batch_size"], cfg["block_size"],
                                            cfg["diag_batch_size"] * cfg["block_size"])))
            diag_x = diag_x.to(device)
    except (ValueError, FileNotFoundError) as e:  # e.g. eval_tokens larger than the val split
        raise ConfigError(f"data ({cfg['data_dir']}): {e}") from None
    hellaswag_examples = None
    if cfg["hellaswag"]:
        from scripts.eval_hellaswag import evaluate_hellaswag, load_examples
        try:
            hellaswag_examples = load_examples(cfg["hellaswag_file"] or None, limit=cfg["hellaswag_limit"] or None)
        except (OSError, ValueError, RuntimeError) as e:  # missing file, bad jsonl, failed download
            raise ConfigError(f"config key 'hellaswag': cannot read the HellaSwag items ({e}); set 'hellaswag_file' "
                              f"to a local hellaswag_val.jsonl, or --hellaswag=False") from None

    # ---- state: fresh, or from the checkpoint ----
    step = 0
    if ckpt is not None:
        step = ckpt["step"]
        train_loader.load_state_dict(ckpt["loader"])  # one position in the window stream, for all ranks
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs across ranks
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    if ckpt is not None and len(ckpt["ranks"]) == world_size:  # exact continuation
        set_rng_state(ckpt["ranks"][rank]["rng"])
    elif ckpt is not None and master:
        print(f"resuming {len(ckpt['ranks'])}-process checkpoint on {world_size} process(es): the data "
              f"continues exactly, the dropout random streams start afresh")
    start_step = step

    # ---- logging ----
    wandb_run = None
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if ckpt is not None and os.path.exists(log_path):  # drop records written after the checkpoint
            with open(log_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            keep = [r for r in records if "step" not in r or r["step"] <= start_step]
            with open(log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        header = {"type": "config" if ckpt is None else "resume", **cfg, "world_size": world_size,
                  "grad_accum": grad_accum, "num_params": raw_model.num_params(), "flops_per_token": flops_per_token,
                  "device_name": torch.cuda.get_device_name() if device_type == "cuda" else "cpu"}
        if ckpt is not None:
            header["step"] = start_step
        with open(log_path, "w" if ckpt is None else "a") as f:
            f.write(json.dumps(header) + "\n")
        if cfg["wandb_log"]:
            import wandb
            wandb_run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg,
                                   mode=cfg["wandb_mode"], id=(ckpt or {}).get("wandb_id"), resume="allow")
        print(f"{cfg['wandb_run_name']}: {cfg['scheme']} n={cfg['n_streams']}, {raw_model.num_params() / 1e6:.2f}M params, "
              f"{world_size} process(es) on {device_type}, {grad_accum} micro-step(s) of {cfg['batch_size']} x "
              f"{cfg['block_size']} per rank, {tokens_per_step:,} tokens/step, out_dir {cfg['out_dir']}")

    def log(record, wandb_data=None):
        if not master:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log({**(wandb_data or {}), "tokens": record["tokens"]}, step=record["step"])

    def save_checkpoint():
        mine = {"rng": rng_state(), "loader": train_loader.state_dict()}
        ranks = [None] * world_size
        if ddp:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not (master and cfg["checkpoint"]):
            return
        ckpt = {"model": raw_model.state_dict(), "model_config": asdict(gptconf), "optimizer": optimizer.state_dict(),
                "step": step, "tokens": step * tokens_per_step, "config": cfg, "rng": ranks[0]["rng"],
                "loader": ranks[0]["loader"], "ranks": ranks, "world_size": world_size,
                "wandb_id": wandb_run.id if wandb_run is not None else None}
        tmp = ckpt_path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, ckpt_path)

    # ---- training loop ----
    last_ckpt_step = start_step if ckpt is not None else None
    result = {}
    t_last, steps_since = time.perf_counter(), 0
    model.train()
    while True:
        # evaluate (and checkpoint) every eval_interval steps and at the end
        if (step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]) and not (ckpt is not None and step == start_step):
            val_loss, val_bpb = evaluate(eval_model, val_loader, token_bytes, ctx, device, ddp)
            record = {"type": "eval", "step": step, "tokens": step * tokens_per_step, "val_loss": val_loss, "val_bpb": val_bpb}
            wandb_data = {"val/loss": val_loss, "val/bpb": val_bpb}
            if hellaswag_examples is not None:  # every rank scores its share; counts are all-reduced
                hs = evaluate_hellaswag(raw_model, hellaswag_examples, device, ctx=ctx)
                record["hellaswag_acc_norm"] = wandb_data["val/hellaswag_acc_norm"] = hs["acc_norm"]
                record["hellaswag_acc"] = wandb_data["val/hellaswag_acc"] = hs["acc"]
            if diag_x is not None:
                d = residual_diagnostics(raw_model, diag_x, ctx)
                record.update(diag=d["scalars"], hres=d["matrices"], hres_composite=d["composite"])
                wandb_data.update({f"diag/{k}": v for k, v in d["scalars"].items()})
                if wandb_run is not None:
                    import matplotlib.pyplot as plt
                    import wandb
                    fig = hres_figure(d["matrices"], d["composite"])
                    wandb_data["hres"] = wandb.Image(fig)
                    plt.close(fig)
            if master:
                extra = ""
                if diag_x is not None:
                    s = d["scalars"]
                    extra = (f" | composite H_res amax fwd {s['composite/amax_fwd']:.3f} bwd {s['composite/amax_bwd']:.3f}"
                             f" | max |H_res - I| {max(v for k, v in s.items() if k.endswith('/dist_identity')):.2e}")
                if hellaswag_examples is not None:
                    extra = f" | hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}" + extra
                print(f"eval step {step}: val loss {val_loss:.4f} | val bpb {val_bpb:.4f}{extra}")
            log(record, wandb_data)
            result.update(step=step, val_loss=val_loss, val_bpb=val_bpb)
            if step > 0 or ckpt is not None:
                save_checkpoint()
                last_ckpt_step = step
            t_last, steps_since = time.perf_counter(), 0  # eval time is not training time
        if step >= cfg["max_iters"]:
            break

        # one optimizer step over grad_accum micro-batches
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
        train_loss, grad_norm = loss_sum.item(), grad_norm.item()
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            where = (f"the last good checkpoint is {ckpt_path} (step {last_ckpt_step})" if last_ckpt_step is not None
                     and cfg["checkpoint"] else "no checkpoint had been written")
            msg = (f"step {step + 1}: training loss is {train_loss} (grad norm {grad_norm}); stopping without "
                   f"taking this step; {where}. Lower learning_rate, raise warmup_iters or check the data.")
            if master:
                log({"type": "error", "step": step + 1, "tokens": (step + 1) * tokens_per_step, "message": msg})
                if wandb_run is not None:
                    wandb_run.finish(exit_code=1)
            raise Diverged(msg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since += 1

        if step % cfg["log_interval"] == 0 and master:
            dt = (time.perf_counter() - t_last) / steps_since
            tok_per_s = tokens_per_step / dt
            mfu = flops_per_token * tok_per_s / (peak * world_size) if peak else None
            record = {"type": "train", "step": step, "tokens": step * tokens_per_step, "loss": train_loss, "lr": lr,
                      "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu, "ms": dt * 1000}
            print(f"step {step:6d} | loss {train_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                  f"{tok_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{mfu:.1%}'} | {dt * 1000:.0f} ms")
            log(record, {f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "grad_norm", "tok_per_s", "mfu", "ms")
                         and v is not None})
            t_last, steps_since = time.perf_counter(), 0

    if wandb_run is not None:
        wandb_run.finish()
    return {**result, "out_dir": cfg["out_dir"]}


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
