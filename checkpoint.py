"""Checkpoints: written atomically, read back with one line for what is wrong, and the model and
tokenizer a checkpoint holds, for the scripts (evaluation, sampling, plots).

    write          atomic and durable (tmp, fsync, rename), ckpt_<step>.pt kept and pruned
    load           the dict train.py saved, or a CheckpointError naming the file and the fix
    step_of        a checkpoint's step, "?" where it cannot be read
    resolve        a ckpt.pt, or a run directory that holds one
    load_model     a GPT from a checkpoint, in eval mode, and the checkpoint without its weights
    load_tokenizer the tokenizer a checkpoint's run was trained with
"""

import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from data import tokenizer as toklib
from errors import CheckpointError, WriteError
from model import GPT, GPTConfig


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(ckpt, path, keep=0):
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
        raise WriteError(f"could not write the step-{ckpt['step']} checkpoint {path} ({e}); {kept(out)}") from None


def kept(out_dir):
    """What a failed write of a run's file leaves to continue from, and how (the WriteErrors' second half)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(path):
        return (f"the checkpoint {path} (step {step_of(path)}) is kept: free space / fix permissions in {out_dir}, "
                f"then rerun with --resume")
    return (f"no checkpoint of this run was written yet, so there is nothing to resume: free space / fix "
            f"permissions in {out_dir}, then start the run again with --overwrite=True")


def step_of(path):
    """The step of the checkpoint at path, or "?" where it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]
    except Exception:
        return "?"


def load(path):
    """The dict train.py saved at path (a ckpt.pt or a run directory holding one), on the CPU.
    Raises CheckpointError naming the file and the fix instead of torch's or pickle's traceback."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass a ckpt.pt or the out_dir of a train.py run")
    elsewhere = ("use another checkpoint (e.g. ckpt_<step>.pt in the same out_dir) or start the run afresh in a new "
                 "out_dir")
    try:  # torch.load does not check the CRC-32 that the zip stores for every tensor: damaged bytes would load
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError):
        damaged = None   # not a zip at all: torch.load below says what it is
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: the bytes of {damaged} do not match the checksum stored in the file "
                              f"(left as it is); {elsewhere}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else: all unusable
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be truncated "
                              f"or not a train.py checkpoint: {elsewhere}") from None
    missing = [k for k in ("model", "model_config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(missing)}): pass the ckpt.pt "
                              f"that train.py wrote in a run's out_dir")
    # train.py never saves a non-finite step (it stops first): inf or NaN in the weights or moments is damage
    tensors = {**dict(_tensors(ckpt["model"])), **{f"optimizer {k}": v for k, v in _tensors(ckpt.get("optimizer"))}}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite values in {', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (left as it is); {elsewhere}")
    return ckpt


def _tensors(tree, prefix=""):
    """(name, tensor) of every tensor in a nested dict / list (an optimizer's state_dict)."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def resolve(path):
    """A ckpt.pt, or a run directory that holds one."""
    p = Path(path)
    return p / "ckpt.pt" if p.is_dir() else p


def load_model(path, device="cpu"):
    """GPT from a train.py checkpoint, in eval mode -> (model, checkpoint dict without weights).
    An unusable checkpoint is a CheckpointError naming the file and the fix."""
    path = resolve(path)
    ckpt = load(path)
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
        raise CheckpointError(f"the checkpoint names {toklib.describe(rec)} but carries no rank file for it; use a "
                         f"checkpoint written by train.py")
    return toklib.from_record(rec, rec["rank_file"], where=f"the checkpoint's tokenizer {rec.get('name')}")
