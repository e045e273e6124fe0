"""A run's directory (out_dir): its lock, its checkpoints and its log.

    check_out_dir           read-only, with the run's other checks: a run already in out_dir is
                            refused unless resumed or --overwrite, an unwritable folder too
    check_disk              read-only: room for a checkpoint of this model
    claim_out_dir           the run's first write, after every check: out_dir made and locked for
                            the run's life; with --overwrite the old run moved aside (OldRun)
    OldRun                  the overwritten run in <out_dir>/.overwritten/<time>/: deleted once the new
                            run's first checkpoint is on disk, moved back if the new run stops before
    on_rank0                a step only rank 0 takes (out_dir, wandb), its ConfigError raised on every rank
    write_checkpoint        atomic and durable (tmp, fsync, rename), ckpt_<step>.pt kept and pruned
    load_checkpoint         read one back, or a CheckpointError naming the file and the fix
    data_meta               a prepared dataset's meta.json, or the command that prepares it
    resume_path             the checkpoint named by resume / resume_from
    load_resume_checkpoint  the checkpoint to resume, refused when it is from other data, another tokenizer
                            or other seeds, or at or past max_iters
    load_model              a GPT from a checkpoint, for the evaluation and sampling scripts
    load_tokenizer          the tokenizer a checkpoint's run was trained with
    save_checkpoint         a training run's checkpoint: the model, the optimizer, every rank's
                            random state and data position
    run_identity            the log header's data, tokenizer and code identity (git commit, dirty tree)
    run_header / start_log  log.jsonl's header record (also the wandb config), and writing it
    read_log / append_log   the records of log.jsonl (a line cut by a crash dropped); one record more at
                            its end (an evaluation of a checkpoint after the run)

Every problem a user can cause is a ConfigError (or CheckpointError) naming the key or file and the fix.
"""

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from common import rng_state
from configurator import ConfigError
from data import tokenizer as toklib
from data.loader import data_id, load_meta
from data.sources import prepare_command
from data.shards import DirLocked, dir_lock
from model import GPT, GPTConfig


class CheckpointWriteError(RuntimeError):
    pass



class CheckpointError(ValueError):
    """A ckpt.pt that cannot be used: missing, truncated, not a checkpoint, or from another program."""



# -----------------------------------------------------------------------------
# the directory and its log

RUN_FILE = re.compile(r"ckpt(_\d+)?\.pt(\.tmp)?|log\.jsonl|hellaswag\.json|core\.json")  # what a run writes there
ASIDE = ".overwritten"  # --overwrite moves the old run into <out_dir>/.overwritten/<time>/ until it is safe to delete


def run_files(out):
    return sorted(f for f in os.listdir(out) if RUN_FILE.fullmatch(f)) if os.path.isdir(out) else []


def on_rank0(fn, ddp, master):
    """fn() on rank 0, which alone writes in out_dir and talks to wandb; its ConfigError is raised on
    every rank (a rank left waiting in a collective would hang). -> fn's result on rank 0, else None."""
    result, verdict = None, [None]
    if master:
        try:
            result = fn()
        except ConfigError as e:
            verdict = [str(e)]
    if ddp:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ConfigError(verdict[0])
    return result


def check_out_dir(cfg):
    """Everything about out_dir that can refuse the run, read-only (nothing is made, locked or moved):
    -> a description of the run already there that --overwrite replaces, or None."""
    out = cfg["out_dir"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"config key 'out_dir': {out} is a file, not a directory; pass another --out_dir")
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("config keys 'resume' and 'overwrite' contradict each other; pass one of them")
    files = run_files(out)
    ckpts = [f for f in files if f.endswith(".pt")]
    if cfg["resume"] and not os.path.isfile(cfg["resume_from"]):
        key = "resume" if cfg["resume_from"] == os.path.join(out, "ckpt.pt") else "resume_from"
        raise ConfigError(f"config key {key!r} is set but there is no checkpoint at {cfg['resume_from']}"
                          + (f" ({out} holds {', '.join(ckpts)}; pick one with --resume_from=FILE)" if ckpts
                             else f"; drop --{key} to start a new run"))
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the folder that will hold it
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise ConfigError(f"config key 'out_dir': cannot write in {out} ({parent} is not a writable directory); "
                          f"pass a writable --out_dir")
    log_path = os.path.join(out, "log.jsonl")
    if cfg["resume"] or not (ckpts or os.path.exists(log_path)):
        return None
    steps = [r["step"] for r in (read_log(log_path) if os.path.exists(log_path) else []) if "step" in r]
    what = f"a run that reached step {max(steps)}" if steps else "a run"
    if not cfg["overwrite"]:
        aside = os.path.join(out, ASIDE)
        earlier = (f" (an earlier run that --overwrite moved aside is in {aside}/: move its files back into {out} "
                   f"to restore it)" if os.path.isdir(aside) else "")
        raise ConfigError(f"config key 'out_dir': {out} already holds {what} ({', '.join(ckpts) or 'log.jsonl'}); "
                          f"continue it with --resume, pick another --out_dir, or start afresh with --overwrite=True "
                          f"(the old run is deleted once the new run's first checkpoint is written){earlier}")
    return what


def check_disk(cfg, raw_model):
    """A checkpoint of this model must fit on out_dir's filesystem: said now, not at the first eval."""
    if not cfg["checkpoint"]:
        return
    place = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(place):
        place = os.path.dirname(place)
    # the weights and AdamW's two moments (Muon keeps one momentum: less), in their dtypes
    need = 3 * sum(p.numel() * p.element_size() for p in raw_model.parameters())
    free = shutil.disk_usage(place).free
    if free < need:
        raise ConfigError(f"config key 'out_dir': {place} has {free / 2**20:,.1f} MiB free but a checkpoint of this "
                          f"model needs about {need / 2**20:,.1f} MiB; free space, pick another --out_dir, or "
                          f"--checkpoint=False")


def claim_out_dir(cfg, run_scope):
    """The run's first write in out_dir, after every check that can refuse the run: make out_dir and
    lock it for the run's life (in run_scope); with --overwrite move the run there aside. -> OldRun or None."""
    out = cfg["out_dir"]
    try:
        os.makedirs(out, exist_ok=True)
        run_scope.enter_context(dir_lock(out, ".train.lock", "train.py run"))  # released by the OS if we die
    except DirLocked as e:
        raise ConfigError(f"config key 'out_dir': {e}") from None
    except OSError as e:  # read-only, no permission, a path through a file
        raise ConfigError(f"config key 'out_dir': cannot write in {out} ({e.strerror}); pass a writable "
                          f"--out_dir") from None
    what = check_out_dir(cfg)  # again, now that out_dir is ours: another run may have ended there meanwhile
    if what is None:
        return None
    old = OldRun(out, what)
    run_scope.push(old)  # on the way out: deleted if the new run ended well, else moved back
    return old


class OldRun:
    """The run that --overwrite replaces, moved into <out_dir>/.overwritten/<time>/ (a rename: no copy,
    no data written) so that nothing of it mixes with the new run. discard() deletes it once the new
    run's first checkpoint is durably written (or the new run ends well without checkpoints); if the
    new run stops before, by an error or Ctrl-C, it is moved back. A killed process (kill -9, a lost
    node) leaves it in .overwritten/, where the refusal to reuse out_dir points."""

    def __init__(self, out, what):
        self.out, self.what = out, what
        self.dir = os.path.join(out, ASIDE, time.strftime("%Y%m%d-%H%M%S"))
        while os.path.exists(self.dir):
            self.dir += "_"
        try:
            os.makedirs(self.dir)
            for name in run_files(out):
                os.rename(os.path.join(out, name), os.path.join(self.dir, name))
            fsync_dir(self.dir)
            fsync_dir(out)
        except OSError as e:
            raise ConfigError(f"config key 'overwrite': cannot move the old run in {out} aside into {self.dir} "
                              f"({e.strerror}); nothing was deleted") from None
        print(f"overwrite: moved {what} in {out} to {self.dir}; it is deleted when the new run's first checkpoint "
              f"is written, and moved back if the new run stops before")

    def discard(self):
        if self.dir is None:
            return
        shutil.rmtree(os.path.join(self.out, ASIDE), ignore_errors=True)  # with any left by a killed attempt
        self.dir = None

    def restore(self):
        if self.dir is None:
            return
        try:
            for name in run_files(self.out):  # the new run's: it stopped before its first checkpoint
                os.remove(os.path.join(self.out, name))
            for name in os.listdir(self.dir):
                os.rename(os.path.join(self.dir, name), os.path.join(self.out, name))
            os.rmdir(self.dir)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.out, ASIDE))
            print(f"overwrite: the new run stopped before its first checkpoint; {self.what} is back in {self.out}")
        except OSError as e:
            print(f"overwrite: the new run stopped before its first checkpoint, and moving the old run back failed "
                  f"({e}); it is in {self.dir}: move its files into {self.out} to restore it")
        self.dir = None

    def __exit__(self, exc_type, exc, tb):
        self.discard() if exc_type is None else self.restore()
        return False


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



def append_log(out_dir, record):
    """Append one record to out_dir/log.jsonl (one write of one line: a run still training there
    appends its own records between ours)."""
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


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


def run_header(cfg, ckpt, start_step, facts):
    """log.jsonl's header record: the resolved config and the run's facts (facts: world size, parameter
    count, run_identity, setting, ...); type "config", or "resume" with the step it continues from. It is
    also the wandb run's config (tracking.start_wandb)."""
    header = {"type": "config" if ckpt is None else "resume", **cfg, **facts}
    if ckpt is not None:
        header["step"] = start_step
    return header


def start_log(cfg, ckpt, start_step, header):
    """Write log.jsonl's header record (run_header), on rank 0: a new log, or, when resuming, the
    records up to the checkpoint's step and then the header."""
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    if ckpt is not None and os.path.exists(log_path):  # drop records written after the checkpoint
        records = read_log(log_path)  # without a line cut by a crash
        keep = [r for r in records if "step" not in r or r["step"] <= start_step]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
    with open(log_path, "w" if ckpt is None else "a") as f:
        f.write(json.dumps(header) + "\n")


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
    had_one = os.path.exists(path)
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
        kept = (f"the checkpoint {path} (step {load_step(path)}) is kept: free space / fix permissions in {out}, "
                f"then rerun with --resume" if had_one else
                f"no checkpoint of this run was written yet, so there is nothing to resume: free space / fix "
                f"permissions in {out}, then start the run again with --overwrite=True")
        raise CheckpointWriteError(f"could not write the step-{ckpt['step']} checkpoint {path} ({e}); {kept}") from None


def load_step(path):
    """The step of the checkpoint at path, or "?" where it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]
    except Exception:
        return "?"



def save_checkpoint(cfg, step, tokens, raw_model, optimizer, train_loader, meta, wandb_run, ddp, master, world_size,
                    extra=None):
    """Every rank's random state and data position gathered; rank 0 writes ckpt.pt (rundir.py); every
    rank stops if it could not. The checkpoint carries the run's tokenizer (tokenizer_record) and
    extra (the loop's state, e.g. the train-loss EMA). -> whether a checkpoint was written (False with
    checkpoint=False)."""
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
                "tokenizer": tokenizer_record(cfg["data_dir"], meta),
                "wandb_group": wandb_run.group if wandb_run is not None else None, **(extra or {})}
        try:
            write_checkpoint(ckpt, os.path.join(cfg["out_dir"], "ckpt.pt"), cfg["keep_checkpoints"])
        except CheckpointWriteError as e:
            error = [str(e)]
    if ddp:  # every rank stops if rank 0 could not write
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointWriteError(error[0])
    return bool(cfg["checkpoint"])


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



def data_meta(data_dir, dataset):
    """The meta.json of a prepared data_dir, its tokenizer recorded; a ConfigError with the command that
    prepares it when it is not there."""
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        base = dataset.split("-")[0]  # fineweb_edu-65536: fineweb_edu with tokenizer fineweb_edu-65536
        if base == dataset:
            how = f"`{prepare_command(data_dir, {'dataset': dataset})}`"
        else:
            how = (f"`python data/prepare.py {base} --tokenizer data/tokenizers/{dataset}.tiktoken`, after "
                   f"`python data/tokenizer.py train {base} ...` (docs/reproduce-d12.md)")
        raise ConfigError(f"config key 'dataset': {data_dir} has no meta.json; prepare it with {how} (or "
                          f"point 'data_dir' at a prepared directory)")
    try:
        meta = load_meta(data_dir)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config key 'data_dir': {e}") from None
    tokenizer_record(data_dir, meta)  # a trained tokenizer's copy is there and is the recorded one
    return meta


def tokenizer_record(data_dir, meta):
    """The dataset's tokenizer as a checkpoint carries it (data/tokenizer.py checkpoint_record), read
    and verified once per run: a trained tokenizer's rank file travels in every checkpoint."""
    key = (os.path.realpath(data_dir), (meta.get("tokenizer") or {}).get("rank_file_sha256"))
    if key not in _TOKENIZER_RECORDS:
        try:
            _TOKENIZER_RECORDS[key] = toklib.checkpoint_record(data_dir, meta)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
    return _TOKENIZER_RECORDS[key]


_TOKENIZER_RECORDS = {}


def data_tokenizer(cfg, meta):
    """The tokenizer of the run's data (the one its checkpoints will carry), for the evals."""
    return load_tokenizer({"tokenizer": tokenizer_record(cfg["data_dir"], meta)})


def resume_path(cfg):
    """The checkpoint a run resumes from ("" for a new run): resume_from (a bare file name is in out_dir, a
    directory is another run's out_dir), else out_dir/ckpt.pt with resume."""
    path = cfg["resume_from"]
    if path and not os.path.dirname(path):
        path = os.path.join(cfg["out_dir"], path)
    if path and os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    return path or (os.path.join(cfg["out_dir"], "ckpt.pt") if cfg["resume"] else "")


def load_resume_checkpoint(cfg, meta):
    """The checkpoint to resume from, refused if it is unreadable or from a run with another tokenizer,
    other data or other seeds, or at or past max_iters."""
    try:
        ckpt = load_checkpoint(cfg["resume_from"])
    except CheckpointError as e:
        raise ConfigError(f"config key 'resume': {e}") from None
    old = ckpt.get("config", {})
    if not toklib.same_tokenizer(ckpt.get("tokenizer"), meta.get("tokenizer")):
        raise ConfigError(f"resume: the checkpoint was trained with {toklib.describe(ckpt.get('tokenizer'))}, but "
                          f"data_dir {cfg['data_dir']} is tokenized with {toklib.describe(meta.get('tokenizer'))}; "
                          f"resume with the checkpoint's data_dir ({old.get('data_dir')}), or start a new run in "
                          f"another out_dir")
    if ckpt["step"] >= cfg["max_iters"]:  # nothing to train: the loop would neither step nor evaluate
        raise ConfigError(f"resume: the checkpoint {cfg['resume_from']} is at step {ckpt['step']} and max_iters is "
                          f"{cfg['max_iters']}, so there is nothing left to train; pass --max_iters above "
                          f"{ckpt['step']} to train on (the lr schedule follows max_iters, or lr_decay_iters)")
    for key in ("optimizer", "hc_optimizer") if cfg["optimizer"] == "muon" else ("optimizer",):  # the state's layout
        if old.get(key, "adamw") != cfg[key]:  # (older checkpoints: adamw, the default)
            raise ConfigError(f"resume: config key {key!r} is {cfg[key]!r} but the checkpoint was trained "
                              f"with {old.get(key, 'adamw')!r}; resume with --{key}={old.get(key, 'adamw')}")
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
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "ranks", "loader")}
    try:  # GPT-2's needs no rank file for its size; a trained one is rebuilt (and checked) from the checkpoint
        n_vocab = toklib.VOCAB_SIZE if toklib.is_gpt2(meta.get("tokenizer")) else load_tokenizer(meta).n_vocab
    except ValueError as e:  # a damaged tokenizer record: a CheckpointError says so
        raise CheckpointError(f"{path}: {e}") from None
    try:
        cfg = GPTConfig(**ckpt["model_config"])
        if cfg.vocab_size < n_vocab:  # the tools read and write the tokenizer's ids: a smaller table fails mid-run
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than its tokenizer's {n_vocab} tokens")
        model = GPT(cfg)
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
        model.load_state_dict(state)
    except Exception as e:  # a config or weights this model.py cannot build: another program's or version's
        raise CheckpointError(f"{path}: not a model this version of model.py can build ({type(e).__name__}: "
                              f"{str(e)[:300]}); pass a ckpt.pt written by this version of train.py") from None
    model.to(device).eval()
    return model, meta


def load_tokenizer(meta):
    """The tokenizer of the run that wrote a checkpoint (meta: load_model's second value): every
    script that encodes or decodes a checkpoint's tokens takes it from here.

    -> a data.tokenizer.Tokenizer, a tiktoken.Encoding (encode_ordinary, encode, decode, n_vocab,
    eot_token) with bos_token, the token that starts every document (GPT-2: <|endoftext|> 50256,
    also its eot_token; a trained tokenizer: <|bos|>, which eot_token returns as well). A checkpoint
    without a tokenizer record is from a run on GPT-2's BPE (the only one before records existed);
    a trained tokenizer is rebuilt from the rank file the checkpoint carries and checked against
    its sha256: a missing or damaged one is a ValueError, never GPT-2's BPE instead."""
    rec = meta.get("tokenizer")
    if toklib.is_gpt2(rec):
        return toklib.get_encoding()
    if not isinstance(rec.get("rank_file"), bytes):
        raise ValueError(f"the checkpoint names {toklib.describe(rec)} but carries no rank file for it; use a "
                         f"checkpoint written by train.py")
    return toklib.from_record(rec, rec["rank_file"], where=f"the checkpoint's tokenizer {rec.get('name')}")
