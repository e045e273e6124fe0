"""A run's directory (out_dir): every write of a training run goes through one RunDir, built once.

    RunDirConfig  the config keys: out_dir, log_interval, checkpoint, keep_checkpoints, resume,
                  resume_from, overwrite
    RunDir        .check(): read-only, with the run's other checks (a run already there is refused unless
                  resumed or --overwrite, an unwritable folder too); .check_disk(); .claim(scope): the first
                  write (made, locked for the run's life, an overwritten run moved aside: OldRun); .start_log,
                  .log; .save (atomic, the overwritten run discarded once a checkpoint is on disk);
                  .resume_checkpoint: the checkpoint to resume, refused when it is from other data, another
                  tokenizer or other seeds, or at or past max_iters
    OldRun        the overwritten run in <out_dir>/.overwritten/<time>/: deleted once the new run's first
                  checkpoint is on disk, moved back if the new run stops before
    read_log / append_log   the records of a log.jsonl (a line cut by a crash dropped); one record more
    read_run / run_dirs     a run directory as the scripts read it (compare.py, plot_runs.py); which paths are runs
    check_output  a tool's results path: never a run's own file (log.jsonl, a checkpoint, another tool's results)
    run_identity  the log header's data, tokenizer and code identity (git commit, dirty tree)
"""

import contextlib
import fnmatch
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import checkpoint
from data import tokenizer as toklib
from data.loader import data_id
from data.shards import DirLocked, dir_lock
from errors import CheckpointError, ConfigError, NotFound, WriteError
from keys import check, key
from optim import OptimConfig

# what a run and its tools write there: moved aside together by --overwrite, never a tool's output
RUN_FILE = re.compile(r"ckpt(_\d+)?\.pt(\.tmp)?|log\.jsonl|hellaswag\.json|core\.json|(lm_eval|stories)_.*\.json")
ASIDE = ".overwritten"  # --overwrite moves the old run into <out_dir>/.overwritten/<time>/ until it is safe to delete


@dataclass
class RunDirConfig:
    """Where a run writes, how often, and what it continues (the config keys of rundir.py)."""
    SECTION = "run directory, checkpoints and log (rundir.py)"
    out_dir: str = key("", '"" -> out/<run name>', path=True, setting="a path")
    log_interval: int = key(10, "steps between train-loss log lines", above=0, setting="log cadence")
    checkpoint: bool = key(True, "write <out_dir>/ckpt.pt at every eval", setting="checkpoint cadence")
    keep_checkpoints: int = key(0, "also keep the last K checkpoints as <out_dir>/ckpt_<step>.pt; 0 -> ckpt.pt only",
                                at_least=0, setting="checkpoint cadence")
    resume: bool = key(False, "continue from <out_dir>/ckpt.pt", setting="resume mechanics")
    resume_from: str = key("", "continue from this checkpoint (ckpt_2000.pt in out_dir, a path or a run dir); "
                           "implies resume", path=True, setting="resume mechanics")
    overwrite: bool = key(False, "start afresh in an out_dir holding a run (deleted at the new run's first "
                          "checkpoint)", setting="resume mechanics")

    def __post_init__(self):
        check(self)
        if self.keep_checkpoints and not self.checkpoint:
            raise ConfigError("config key 'keep_checkpoints' needs checkpoints; drop it or drop --checkpoint=False")


def run_files(out):
    return sorted(f for f in os.listdir(out) if RUN_FILE.fullmatch(f)) if os.path.isdir(out) else []


def resume_path(rc):
    """The checkpoint a run resumes from ("" for a new run): resume_from (a bare file name is in out_dir, a
    directory is another run's out_dir), else out_dir/ckpt.pt with resume."""
    path = rc.resume_from
    if path and not os.path.dirname(path):
        path = os.path.join(rc.out_dir, path)
    if path and os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    return path or (os.path.join(rc.out_dir, "ckpt.pt") if rc.resume else "")


class RunDir:
    """The directory of one training run, from its RunDirConfig."""

    def __init__(self, rc):
        self.path, self.resume, self.overwrite = rc.out_dir, rc.resume, rc.overwrite
        self.checkpoints, self.keep, self.resume_from = rc.checkpoint, rc.keep_checkpoints, resume_path(rc)
        self.old = None

    @property
    def log_path(self):
        return os.path.join(self.path, "log.jsonl")

    def check(self):
        """Everything about out_dir that can refuse the run, read-only (nothing is made, locked or moved):
        -> a description of the run already there that --overwrite replaces, or None."""
        out = self.path
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"config key 'out_dir': {out} is a file, not a directory; pass another --out_dir")
        here = self.continues_here()
        if self.resume and self.overwrite and here:
            raise ConfigError("config keys 'resume' and 'overwrite' contradict each other; pass one of them")
        ckpts = [f for f in run_files(out) if f.endswith(".pt")]
        if self.resume and not os.path.isfile(self.resume_from):
            key = "resume" if self.resume_from == os.path.join(out, "ckpt.pt") else "resume_from"
            if ckpts:
                fix = f" ({out} holds {', '.join(ckpts)}; pick one with --resume_from=FILE)"
            elif here and os.path.exists(self.log_path):  # stopped before its first checkpoint: nothing to continue
                fix = (f"; {out} holds a run stopped before its first checkpoint: start it afresh with "
                       f"--overwrite=True in place of --{key}, or pick another --out_dir")
            else:
                fix = f"; drop --{key} to start a new run"
            raise ConfigError(f"config key {key!r} is set but there is no checkpoint at {self.resume_from}{fix}")
        parent = os.path.abspath(out)
        while not os.path.exists(parent):  # the folder that will hold it
            parent = os.path.dirname(parent)
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
            raise ConfigError(f"config key 'out_dir': cannot write in {out} ({parent} is not a writable directory); "
                              f"pass a writable --out_dir")
        if (self.resume and here) or not (ckpts or os.path.exists(self.log_path)):
            return None
        steps = [r["step"] for r in (read_log(self.log_path) if os.path.exists(self.log_path) else []) if "step" in r]
        what = f"a run that reached step {max(steps)}" if steps else "a run"
        if not self.overwrite:
            aside = os.path.join(out, ASIDE)
            earlier = (f" (an earlier run that --overwrite moved aside is in {aside}/: move its files back into {out} "
                       f"to restore it)" if os.path.isdir(aside) else "")
            afresh = "--overwrite=True (the old run is deleted once the new run's first checkpoint is written)"
            if self.resume:   # another run's checkpoint continued here: the two runs' files would mix
                fix = (f"--resume_from continues {self.resume_from} into it, which would mix the two runs; pick an "
                       f"empty --out_dir for the continuation"
                       + (", continue the run there with --resume in place of --resume_from" if ckpts else "")
                       + f", or replace it with {afresh}")
            elif not ckpts:   # nothing to continue: --resume would be refused
                fix = (f"it stopped before its first checkpoint, so there is nothing to resume; start it afresh with "
                       f"{afresh}, or pick another --out_dir")
            else:
                fix = f"continue it with --resume, pick another --out_dir, or start afresh with {afresh}"
            raise ConfigError(f"config key 'out_dir': {out} already holds {what} ({', '.join(ckpts) or 'log.jsonl'}); "
                              f"{fix}{earlier}")
        return what

    def continues_here(self):
        """Whether the checkpoint resumed (if any) is this out_dir's own: the run continues in place."""
        return not self.resume_from or os.path.abspath(os.path.dirname(self.resume_from)) == os.path.abspath(self.path)

    def check_disk(self, nbytes):
        """A checkpoint of nbytes must fit on out_dir's filesystem: said now, not at the first eval."""
        if not self.checkpoints:
            return
        place = os.path.abspath(self.path)
        while not os.path.exists(place):
            place = os.path.dirname(place)
        free = shutil.disk_usage(place).free
        if free < nbytes:
            raise ConfigError(f"config key 'out_dir': {place} has {free / 2**20:,.1f} MiB free but a checkpoint of "
                              f"this model needs about {nbytes / 2**20:,.1f} MiB; free space, pick another --out_dir, "
                              f"or --checkpoint=False")

    def claim(self, scope):
        """The run's first write in out_dir, after every check that can refuse the run: make out_dir and lock it
        for the run's life (in scope, a contextlib.ExitStack); with --overwrite move the run there aside."""
        out = self.path
        try:
            os.makedirs(out, exist_ok=True)
            scope.enter_context(dir_lock(out, ".train.lock", "train.py run"))  # released by the OS if we die
        except DirLocked as e:
            raise ConfigError(f"config key 'out_dir': {e}") from None
        except OSError as e:  # read-only, no permission, a path through a file
            raise ConfigError(f"config key 'out_dir': cannot write in {out} ({e.strerror}); pass a writable "
                              f"--out_dir") from None
        what = self.check()  # again, now that out_dir is ours: another run may have ended there meanwhile
        if what is not None:
            self.old = OldRun(out, what)
            scope.push(self.old)  # on the way out: deleted if the new run ended well, else moved back

    def start_log(self, header, resumed_step=None):
        """log.jsonl's header record: a new log, or when resuming, the records up to the checkpoint's step
        (those written after it dropped) and then the header."""
        try:
            if resumed_step is not None and os.path.exists(self.log_path):
                keep = [r for r in read_log(self.log_path) if "step" not in r or r["step"] <= resumed_step]
                with open(self.log_path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in keep)
            with open(self.log_path, "w" if resumed_step is None else "a") as f:
                f.write(json.dumps(header) + "\n")
        except OSError as e:
            raise self.write_error(self.log_path, e) from None

    def log(self, record):
        try:
            append_log(self.path, record)
        except OSError as e:  # a full disk, a lost permission: said in one line, the checkpoint kept
            raise self.write_error(self.log_path, e) from None

    def write_error(self, path, e):
        """The WriteError of a failed write of the run's file at path: the cause, and the checkpoint that is kept."""
        return WriteError(f"could not write {path} ({e.strerror or e}); {checkpoint.kept(self.path)}")

    def save(self, ckpt):
        """Write the checkpoint (checkpoint.write: atomic, keep_checkpoints kept); the overwritten run, now
        that the new one is on disk, is deleted. -> whether one was written (False with checkpoint=False)."""
        if not self.checkpoints:
            return False
        checkpoint.write(ckpt, os.path.join(self.path, "ckpt.pt"), self.keep)
        if self.old is not None:
            self.old.discard()
        return True

    def resume_checkpoint(self, meta, max_iters, same):
        """The checkpoint to resume from, refused if it is unreadable or from a run with another tokenizer or
        other data, at or past max_iters, or whose config differs in a key of same ({key: this run's value}:
        the optimizer's state layout, the seeds)."""
        try:
            ckpt = checkpoint.load(self.resume_from)
        except CheckpointError as e:
            raise ConfigError(f"config key 'resume': {e}") from None
        old = ckpt.get("config", {})
        if not toklib.same_tokenizer(ckpt.get("tokenizer"), meta.get("tokenizer")):
            raise ConfigError(f"resume: the checkpoint was trained with {toklib.describe(ckpt.get('tokenizer'))}, "
                              f"but the data is tokenized with {toklib.describe(meta.get('tokenizer'))}; resume with "
                              f"the checkpoint's data_dir ({old.get('data_dir')}), or start a new run in another out_dir")
        if ckpt["step"] >= max_iters:  # nothing to train: the loop would neither step nor evaluate
            raise ConfigError(f"resume: the checkpoint {self.resume_from} is at step {ckpt['step']} and max_iters is "
                              f"{max_iters}, so there is nothing left to train; pass --max_iters above "
                              f"{ckpt['step']} to train on (the lr schedule follows max_iters, or lr_decay_iters)")
        why = {"seed": " (a run is one seed of its setting)", "data_seed": " (the data order would change mid-run)"}
        older = {"data_seed": old.get("seed")}   # checkpoints older than a key: one seed for both, AdamW
        for k, value in same.items():
            was = old.get(k, older.get(k, getattr(OptimConfig, k, None)))
            if was is not None and was != value:
                raise ConfigError(f"resume: config key {k!r} is {value!r} but the checkpoint's run used {was!r}"
                                  f"{why.get(k, '')}; resume with --{k}={was}, or start a new run in another out_dir")
        if "data_id" in ckpt and ckpt["data_id"] != data_id(meta):
            raise ConfigError(f"resume: the checkpoint was trained on other data ({old.get('data_dir')}) than this "
                              f"run's; resume with --data_dir={old.get('data_dir')}, or start a new run in another "
                              f"out_dir")
        return ckpt


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
            checkpoint.fsync_dir(self.dir)
            checkpoint.fsync_dir(out)
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


def read_log(path, skip_damaged=False):
    """The records of a log.jsonl. A crash can cut its last line: that line is dropped with a note on stderr;
    an unreadable line elsewhere is an error (the file was edited or mixed, and must be looked at), or with
    skip_damaged (the figures: they can still be drawn) skipped with a note."""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == len(lines) - 1:
            print(f"note: {path}: dropping its last line, cut by a crash: {line[:60]!r}", file=sys.stderr)
        elif skip_damaged:
            print(f"note: {path}:{i + 1}: skipping a line that is not a JSON record (a damaged log)", file=sys.stderr)
        else:
            raise ConfigError(f"{path}, line {i + 1} is not a JSON record; remove or repair that line, then rerun")
    return records


def read_run(path, skip_damaged=False):
    """A run directory (or its log.jsonl), as the scripts read one: {"dir", "records", "headers" (its config and
    resume records), "config" (the last header, {} for none: it ran last), "hellaswag", "core" (the results
    files beside it, None where absent or unreadable, with a note)}; NotFound naming a path that holds no log."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: no such directory; pass the out_dirs of train.py runs (or their log.jsonl files)")
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise NotFound(f"{path}: no log.jsonl; pass the out_dir of a train.py run")
    records = read_log(log, skip_damaged)
    headers = [r for r in records if r.get("type") in ("config", "resume")]
    run = {"dir": log.parent, "records": records, "headers": headers, "config": headers[-1] if headers else {}}
    for name in ("hellaswag", "core"):
        p, run[name] = log.parent / f"{name}.json", None
        if p.is_file():
            try:
                run[name] = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                print(f"note: {p}: unreadable ({e}); left out (scripts/eval_{name}.py rewrites it)", file=sys.stderr)
            if not isinstance(run[name], (dict, type(None))):
                print(f"note: {p}: not a JSON object; left out", file=sys.stderr)
                run[name] = None
    return run


def run_dirs(paths, prog):
    """The paths that can be runs (a directory with a log.jsonl, a .jsonl file, a path that does not exist: its
    reader names it); every other one (the wandb/ or plots/ folder under an out root) is left out with a note on
    stderr. A ConfigError when none is left."""
    runs = []
    for p in paths:
        if not os.path.exists(p) or (os.path.isfile(os.path.join(p, "log.jsonl")) if os.path.isdir(p)
                                     else p.endswith(".jsonl")):
            runs.append(p)
        else:
            print(f"{prog}: note: skipping {p}: not a run directory (no log.jsonl)", file=sys.stderr)
    if not runs:
        raise ConfigError(f"none of the {len(paths)} path(s) is a run directory (one with a log.jsonl); pass the "
                          f"out_dirs of train.py runs")
    return runs


def check_output(path, own=()):
    """Where a tool writes a results file, checked when it starts (before the work, the paid calls): a ConfigError
    naming the path and the fix when it is a run's own file (log.jsonl, a checkpoint, another tool's results: own
    holds the names, or fnmatch patterns, of the files this tool itself writes there), a directory, or in a folder that is missing or unwritable.
    "-" or None: no file."""
    if path in (None, "-"):
        return
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    mine = any(fnmatch.fnmatch(name, pattern) for pattern in own)
    if RUN_FILE.fullmatch(name) and not mine and os.path.isfile(os.path.join(folder, "log.jsonl")):
        raise ConfigError(f"{path} is a file of the run in {folder} (written by train.py or another tool); "
                          f"pass another output path")
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory; pass a file path")
    if not os.path.isdir(folder):
        raise ConfigError(f"the folder {folder} does not exist; create it, or pass another path")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write in {folder}; pass another path")


def check_output_arg(ap, flag, path, *own):
    """check_output for a script's flag: its refusal is argparse's error (`argument --out: ...`, exit status 2)."""
    try:
        check_output(path, own=own)
    except ConfigError as e:
        ap.error(f"argument {flag}: {e}")


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
