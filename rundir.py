"""A run's directory (out_dir): its lock, its checkpoints and its log.

    check_out_dir           one run per out_dir: locked for the run's life; a run already there is
                            refused unless resumed or --overwrite
    write_checkpoint        atomic and durable (tmp, fsync, rename), ckpt_<step>.pt kept and pruned
    load_checkpoint         read one back, or a CheckpointError naming the file and the fix
    load_resume_checkpoint  the checkpoint to resume, refused when it is from other data or seeds
    load_model              a GPT from a checkpoint, for the evaluation and sampling scripts
    load_tokenizer          the tokenizer a checkpoint's run was trained with
    save_checkpoint         a training run's checkpoint: the model, the optimizer, every rank's
                            random state and data position
    run_identity            the log header's data, tokenizer and code identity (git commit, dirty tree)
    start_log / read_log    log.jsonl: the run's header record; the records, a line cut by a crash dropped

Every problem a user can cause is a ConfigError (or CheckpointError) naming the key or file and the fix.
"""

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from common import rng_state
from configurator import ConfigError
from data.loader import data_id
from data.shards import DirLocked, dir_lock
from model import GPT, GPTConfig
from tracking import start_wandb


class CheckpointWriteError(RuntimeError):
    pass



class CheckpointError(ValueError):
    """A ckpt.pt that cannot be used: missing, truncated, not a checkpoint, or from another program."""



# -----------------------------------------------------------------------------
# the directory and its log

def check_out_dir(cfg, run_scope):
    """Make out_dir, lock it for the run's life (in run_scope), and refuse to mix two runs in it."""
    out = cfg["out_dir"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"config key 'out_dir': {out} is a file, not a directory; pass another --out_dir")
    names = os.listdir(out) if os.path.isdir(out) else []
    ckpts = sorted(f for f in names if f.startswith("ckpt") and f.endswith(".pt"))
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("config keys 'resume' and 'overwrite' contradict each other; pass one of them")
    if cfg["resume"] and not os.path.isfile(cfg["resume_from"]):
        key = "resume" if cfg["resume_from"] == os.path.join(out, "ckpt.pt") else "resume_from"
        raise ConfigError(f"config key {key!r} is set but there is no checkpoint at {cfg['resume_from']}"
                          + (f" ({out} holds {', '.join(ckpts)}; pick one with --resume_from=FILE)" if ckpts
                             else f"; drop --{key} to start a new run"))
    try:
        os.makedirs(out, exist_ok=True)
        run_scope.enter_context(dir_lock(out, ".train.lock", "train.py run"))  # released by the OS if we die
    except DirLocked as e:
        raise ConfigError(f"config key 'out_dir': {e}") from None
    except OSError as e:  # read-only, no permission, a path through a file
        raise ConfigError(f"config key 'out_dir': cannot write in {out} ({e.strerror}); pass a writable "
                          f"--out_dir") from None
    log_path = os.path.join(out, "log.jsonl")
    if cfg["resume"] or not (ckpts or os.path.exists(log_path)):
        return
    steps = [r["step"] for r in (read_log(log_path) if os.path.exists(log_path) else []) if "step" in r]
    what = f"a run that reached step {max(steps)}" if steps else "a run"
    if not cfg["overwrite"]:
        raise ConfigError(f"config key 'out_dir': {out} already holds {what} ({', '.join(ckpts) or 'log.jsonl'}); "
                          f"continue it with --resume, pick another --out_dir, or delete it and start afresh with "
                          f"--overwrite=True")
    for name in ckpts + ["log.jsonl", "ckpt.pt.tmp"]:  # nothing of the old run may mix with the new one
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    print(f"overwrite: deleted {what} in {out}")



def read_log(path):
    """The records of a log.jsonl. A crash can cut its last line: that line is dropped with a notice;
    an unreadable line elsewhere is an error (the file was edited or mixed, and must be looked at)."""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}, line {i + 1} is not JSON; remove or repair that line, then rerun") from None
            print(f"{path}: dropping its last line, cut by a crash: {line[:60]!r}")
    return records



def git_state(repo):
    """{"git_commit": HEAD, "git_dirty": uncommitted changes (untracked files included)}, None where repo
    is not a git checkout or git is missing."""
    import subprocess
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}
    if commit.returncode or status.returncode:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def run_identity(meta, repo):
    """What the log header records beyond the config: the data (data_id: preparation and shards), the
    tokenizer, and the code (git commit, dirty tree)."""
    tok = meta.get("tokenizer") or {}
    return {"data_id": data_id(meta), "tokenizer": tok.get("name"), "tokenizer_sha256": tok.get("rank_file_sha256"),
            **git_state(repo)}


def start_log(cfg, ckpt, start_step, header):
    """log.jsonl's header record ("config", or "resume" after dropping records written after the
    checkpoint) and the wandb run, on rank 0. -> the wandb run or None."""
    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    if ckpt is not None and os.path.exists(log_path):  # drop records written after the checkpoint
        records = read_log(log_path)  # without a line cut by a crash
        keep = [r for r in records if "step" not in r or r["step"] <= start_step]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
    header = {"type": "config" if ckpt is None else "resume", **cfg, **header}
    if ckpt is not None:
        header["step"] = start_step
    with open(log_path, "w" if ckpt is None else "a") as f:
        f.write(json.dumps(header) + "\n")
    if not cfg["wandb_log"]:
        return None
    return start_wandb(header, (ckpt or {}).get("wandb_id"), (ckpt or {}).get("wandb_group"))


# -----------------------------------------------------------------------------
# checkpoints

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def write_checkpoint(ckpt, path, keep=0):
    """Write ckpt to path atomically and durably (tmp file, fsync, rename, fsync the directory). With keep > 0
    also keep it as ckpt_<step>.pt (a hard link, else a copy) and delete all but the last `keep` of those.
    On failure (disk full, read-only, ...) the partial file is removed and the previous checkpoint stays."""
    out, tmp = os.path.dirname(path) or ".", path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(out)
        if keep:
            step_path = os.path.join(out, f"ckpt_{ckpt['step']}.pt")
            try:
                os.link(path, tmp)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, tmp)
            os.replace(tmp, step_path)
            steps = sorted(int(f[5:-3]) for f in os.listdir(out) if re.fullmatch(r"ckpt_\d+\.pt", f))
            # a later step than this one is left from a continuation abandoned by --resume_from; the run replaces it
            older = [s for s in steps if s <= ckpt["step"]]
            for s in older[:-keep]:
                os.remove(os.path.join(out, f"ckpt_{s}.pt"))
            fsync_dir(out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointWriteError(f"could not write the step-{ckpt['step']} checkpoint {path} ({e}); the previous "
                                   f"checkpoint is kept: free space / fix permissions in "
                                   f"{out}, then rerun with --resume") from None



def save_checkpoint(cfg, step, tokens, raw_model, optimizer, train_loader, meta, wandb_run, ddp, master, world_size):
    """Every rank's random state and data position gathered; rank 0 writes ckpt.pt (rundir.py); every
    rank stops if it could not."""
    mine = {"rng": rng_state(), "loader": train_loader.state_dict()}
    ranks = [None] * world_size
    if ddp:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    error = [None]
    if master and cfg["checkpoint"]:
        ckpt = {"model": raw_model.state_dict(), "model_config": asdict(raw_model.config),
                "optimizer": optimizer.state_dict(), "step": step, "tokens": tokens, "config": cfg,
                "rng": ranks[0]["rng"], "loader": ranks[0]["loader"], "ranks": ranks, "world_size": world_size,
                "data_id": data_id(meta), "wandb_id": wandb_run.id if wandb_run is not None else None,
                "wandb_group": wandb_run.group if wandb_run is not None else None}
        try:
            write_checkpoint(ckpt, os.path.join(cfg["out_dir"], "ckpt.pt"), cfg["keep_checkpoints"])
        except CheckpointWriteError as e:
            error = [str(e)]
    if ddp:  # every rank stops if rank 0 could not write
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointWriteError(error[0])


def load_checkpoint(path):
    """The dict train.py saved at path (a ckpt.pt or a run directory holding one), on the CPU.
    Raises CheckpointError naming the file and the fix instead of torch's or pickle's traceback."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass a ckpt.pt or the out_dir of a train.py run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else: all unusable
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be truncated "
                              f"or not a train.py checkpoint: use another checkpoint (e.g. ckpt_<step>.pt in "
                              f"the same out_dir) or start the run afresh in a new out_dir") from None
    missing = [k for k in ("model", "model_config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(missing)}): pass the ckpt.pt "
                              f"that train.py wrote in a run's out_dir")
    return ckpt



def load_resume_checkpoint(cfg, meta):
    """The checkpoint to resume from, refused if it is unreadable or from a run with other data or seeds."""
    try:
        ckpt = load_checkpoint(cfg["resume_from"])
    except CheckpointError as e:
        raise ConfigError(f"config key 'resume': {e}") from None
    old = ckpt.get("config", {})
    old_seeds = {"seed": old.get("seed"), "data_seed": old.get("data_seed", old.get("seed"))}  # older: one seed
    for key, why in (("seed", "a run is one seed of its setting"), ("data_seed", "the data order would change "
                                                                                  "mid-run")):
        if old_seeds[key] is not None and old_seeds[key] != cfg[key]:
            raise ConfigError(f"resume: the checkpoint's run used {key} {old_seeds[key]}, this run has {key} "
                              f"{cfg[key]} ({why}); resume with --{key}={old_seeds[key]}, or start a new run in "
                              f"another out_dir")
    same = (ckpt["data_id"] == data_id(meta) if "data_id" in ckpt else
            os.path.realpath(old.get("data_dir", cfg["data_dir"])) == os.path.realpath(cfg["data_dir"]))
    if not same:
        raise ConfigError(f"resume: the checkpoint was trained on other data ({old.get('data_dir')}) than this run's "
                          f"data_dir ({cfg['data_dir']}); resume with --data_dir={old.get('data_dir')}, or start a "
                          f"new run in another out_dir")
    return ckpt



def resolve_ckpt(path):
    """A ckpt.pt, or a run directory that holds one."""
    p = Path(path)
    return p / "ckpt.pt" if p.is_dir() else p



def load_model(path, device="cpu"):
    """GPT from a train.py checkpoint, in eval mode -> (model, checkpoint dict without weights).
    An unusable checkpoint is a CheckpointError naming the file and the fix."""
    path = resolve_ckpt(path)
    ckpt = load_checkpoint(path)
    try:
        cfg = GPTConfig(**ckpt["model_config"])
        if cfg.vocab_size < 50257:  # the tools read and write GPT-2 tokens: a smaller table fails mid-run
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the GPT-2 tokenizer's 50257 tokens")
        model = GPT(cfg)
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
        model.load_state_dict(state)
    except Exception as e:  # a config or weights this model.py cannot build: another program's or version's
        raise CheckpointError(f"{path}: not a model this version of model.py can build ({type(e).__name__}: "
                              f"{str(e)[:300]}); pass a ckpt.pt written by this version of train.py on "
                              f"GPT-2 token shards") from None
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "ranks", "loader")}
    return model, meta


def load_tokenizer(meta):
    """The tokenizer of the run that wrote a checkpoint (meta: load_model's second value), as a
    tiktoken.Encoding: every script that encodes or decodes a checkpoint's tokens takes it from here.
    All runs so far are on GPT-2's BPE."""
    from data.tokenizer import get_encoding
    return get_encoding()
