"""
A grid of training runs: one train.py command for every (config, scheme, n_streams, seed), each with
its own run name, <config>-<scheme>-n<n>[-<key>=<value>...]-s<seed>[-d<data_seed>], and out dir,
<out_root>/<run name>. Prints the commands, or with --run runs them one after another ("run k/N"
before each, a summary after); then the scripts/compare.py and plot_runs.py commands for the runs.

    python scripts/sweep.py --configs configs/fwe_s.py configs/fwe_m.py \\
        --schemes plain hc mhc mhc_lite kromhc mhc_v4 --n 4 --seeds 3 --nproc 8
    python scripts/sweep.py --configs configs/quickstart.py --schemes plain kromhc --run -- --max_iters=50
    python scripts/sweep.py --preset kromhc_n --configs configs/owt_m.py              # KromHC n = 4, 8, 16
    python scripts/sweep.py --preset schemes --configs configs/nanochat_d12.py        # the six schemes, n = 4
    python scripts/sweep.py --preset tinystories --seeds 0 1 2                        # them on configs/tinystories.py
    python scripts/sweep.py --schemes mhc mhc_v4 --configs configs/fwe_m.py --out_root out/hc_head -- --readout=hc_head

Running the same command again finishes a sweep (after Ctrl-C, a failed run, a lost job): a finished
run (its log has the eval at its max_iters, which a run writes at its end) is skipped, a started one
(ckpt.pt) resumed with --resume, one stopped before its first checkpoint (a log alone) restarted
with --overwrite=True, a missing one started; each printed command says which in a comment. An
out_dir holding a run of another setting (its config edited since) is an error before anything runs.
A failed run does not stop the others unless --stop-on-failure (exit status 1 if any failed). Ctrl-C
reaches the run in progress, which stops as train.py does (its last checkpoint kept); the sweep
stops after it (exit status 130) and says how to continue.

The commands run this Python (sys.executable, `-m torch.distributed.run` for torchrun), so a job
script needs no activated venv. Relative --configs and --out_root are from the current directory,
where --run starts the runs. A config is named by its file name, with its parent folders where two
configs share one (a/base.py, b/base.py -> a_base, b_base).

The seeds vary the init (and dropout) while every run sees the same batches in the same order
(--data_seed), so the scheme-vs-scheme differences pair by seed (scripts/compare.py); the runs are
named -s<seed>-d<data_seed> (-s0-d0, -s1-d0, ...), or -s<seed> with --vary_data (data_seed = seed,
as train.py names a run). --data_seed and --vary_data replace a config's own data_seed, with a note.

--preset names a published experiment (PRESETS: its schemes and n, and its configs where it has
them). plain always runs with n = 1, once per config and seed; a scheme that cannot take an n
(mhc_lite beyond n = 6: n! logits) is left out with a note. Arguments after `--` go to every run
(readout=hc_head takes the n-stream schemes only); those of keys in a run's setting (setting.py: the
model, data, optimisation, e.g. --n_layer=2, --dataset=tinystories; data_dir by its folder name) are
in the run names, so a sweep with another model or data does not take an earlier one's names. A key
the sweep sets per run (scheme, n_streams, seed, data_seed, wandb_run_name, out_dir, resume,
overwrite) is refused after `--`, naming the flag that sets it. Every run's command is checked by
train.py's rules (configurator.py, config.py), and the global batch must divide over the processes,
before anything prints. With --nnodes > 1 the commands use c10d rendezvous at
$MASTER_ADDR:$MASTER_PORT: run each one on every node.
"""

import argparse
import contextlib
import itertools
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import config  # noqa: E402
import configurator  # noqa: E402
import hc  # noqa: E402
import rundir  # noqa: E402
import setting  # noqa: E402
from common import HelpFormatter, non_negative_int, positive_int, run_cli  # noqa: E402
from errors import ConfigError  # noqa: E402

TRAIN = os.path.join(REPO, "train.py")
# the keys the sweep sets for every run: after `--` they would make runs of the grid the same run
SWEEP_KEYS = {"scheme": "--schemes", "n_streams": "--n", "seed": "--seeds", "data_seed": "--data_seed / --vary_data",
              "out_dir": "--out_root", "wandb_run_name": None}
RUN_DIR_KEYS = ("resume", "resume_from", "overwrite")  # the sweep chooses them per run from its out_dir
RESOLVED = {"vocab_size": 0, "max_iters": -1}  # values a run resolves itself: its log has the result, not these
PASS_ON_S = 10  # a SIGINT the run has not ended on by then is passed on (one sent to the sweep alone)
MAX_SEED_COUNT = 32  # --seeds K above this is more likely a seed than a count: refused with the fix
PRESETS = {
    "kromhc_n": dict(schemes=["kromhc"], n=[4, 8, 16]),      # KromHC's n-scaling (factors of 2)
    "schemes": dict(schemes=list(hc.SCHEMES), n=[4]),        # every scheme at n = 4 (mhc_v4 included)
    "tinystories": dict(schemes=list(hc.SCHEMES), n=[4], configs=["configs/tinystories.py"]),  # the same on TinyStories
}


def grid(configs, schemes, ns, seeds):
    """[(config, scheme, n, seed)] with plain collapsed to n = 1, no duplicates, seed by seed: every setting's
    first seed, then every setting's second, ..., so a sweep stopped early has its settings at equal n."""
    return list(dict.fromkeys((path, scheme, 1 if scheme == "plain" else n, seed)
                              for seed, path, scheme, n in itertools.product(seeds, configs, schemes, ns)))


def parse_seeds(values):
    """--seeds: one value K -> 0..K-1, 'A:B' -> A..B-1, two or more values -> those seeds. ValueError with the fix."""
    if len(values) == 1 and ":" in values[0]:
        a, _, b = values[0].partition(":")
        seeds = list(range(int(a), int(b)))
        if not seeds:
            raise ValueError(f"--seeds {values[0]}: the range A:B holds the seeds A..B-1, so B must exceed A")
        return seeds
    if len(values) == 1:
        k = int(values[0])
        if not 1 <= k <= MAX_SEED_COUNT:
            raise ValueError(f"--seeds {k}: one value is the number of seeds (0..K-1), 1 to {MAX_SEED_COUNT}; for "
                             f"that seed alone pass --seeds {k}:{k + 1}, or list several (--seeds {k} {k + 1})")
        return list(range(k))
    return [int(v) for v in values]


def name_parts(extra):
    """The overrides after `--` that are part of a run's setting, as 'key=value' parts of its name (data_dir by
    its folder: the data enter the setting by their identity). A ConfigError for one that sets a key the sweep
    sets per run."""
    parts = []
    for arg in extra:
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if key in SWEEP_KEYS:
            flag = SWEEP_KEYS[key]
            fix = (f"pass {flag} to the sweep instead" if flag else
                   "drop it: the sweep names each run <config>-<scheme>-n<n>-s<seed> (and its out_dir after it)")
            raise ConfigError(f"{arg} after `--` would give every run of the sweep the same {key}; {fix}")
        if key in RUN_DIR_KEYS:
            raise ConfigError(f"{arg} after `--`: the sweep resumes a started run, restarts one stopped before its "
                              f"first checkpoint and skips a finished one by itself; drop it (to redo a finished "
                              f"run, move its out_dir away)")
        if key == "data_dir":
            value = os.path.basename(os.path.normpath(value))
        elif key in config.KEYS and config.KEYS[key].setting is not True:
            continue
        parts.append(f"{key}={re.sub(r'[^A-Za-z0-9_.+-]+', '_', value if eq else 'True').strip('_')}")
    return parts


def config_names(paths):
    """{config path: its name in the run names}: the file name, with as many parent folders as tell apart
    configs of one file name (a/base.py, b/base.py -> a_base, b_base)."""
    parts = {p: os.path.splitext(os.path.abspath(p))[0].split(os.sep)[1:] for p in paths}
    depth = dict.fromkeys(paths, 1)
    while True:
        names = {p: "_".join(parts[p][-depth[p]:]) for p in paths}
        clash = [p for p in paths if list(names.values()).count(names[p]) > 1 and depth[p] < len(parts[p])]
        if not clash:
            return names
        for p in clash:
            depth[p] += 1


def shown(path):
    """A file of this repo as the commands name it: relative to the current directory when under it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def launcher(nproc, nnodes, name):
    """The start of a run's command, with this Python (a job script need not activate the venv)."""
    if nproc == 0:
        return [sys.executable, shown(TRAIN)]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        return torchrun + ["--standalone", f"--nproc_per_node={nproc}", shown(TRAIN)]
    return torchrun + [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                       "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT", f"--rdzv_id={name}", shown(TRAIN)]


def data_seeds(cfgs, seeds, data_seed, vary_data):
    """{config: the data order of its runs, None for each seed's own}: --vary_data or --data_seed, else the config
    file's own data_seed, else the first seed (one data order for the sweep: the differences pair by seed)."""
    out = {}
    for path, cfg in cfgs.items():
        own = cfg["data_seed"] if cfg["data_seed"] != config.KEYS["data_seed"].default else None
        if own is not None and (vary_data or data_seed is not None):
            flag = "--vary_data" if vary_data else f"--data_seed {data_seed}"
            print(f"sweep: note: {path} sets data_seed = {own}; {flag} replaces it", file=sys.stderr)
        out[path] = None if vary_data else data_seed if data_seed is not None else own if own is not None else seeds[0]
    return out


def check_batch(cfgs, world_size):
    """A ConfigError for the first config whose batch does not divide over world_size processes, naming the
    numbers and the process counts that would work (train.py's own check)."""
    for path, cfg in cfgs.items():
        micro = cfg["batch_size"] * cfg["block_size"]
        if cfg["total_batch_tokens"] % (micro * world_size):
            fits = [n for n in (1, 2, 4, 8, 16, 32, 64) if cfg["total_batch_tokens"] % (micro * n) == 0]
            raise ConfigError(f"{path}: total_batch_tokens ({cfg['total_batch_tokens']}) is not divisible by "
                              f"batch_size x block_size x processes = {cfg['batch_size']} x {cfg['block_size']} x "
                              f"{world_size}; pass --nproc (x --nnodes) for {' or '.join(map(str, fits)) or 'no'} "
                              f"process(es) in all, or change total_batch_tokens / batch_size after `--`")


# -----------------------------------------------------------------------------
# what is in a run's out_dir, and running the runs

ACTIONS = {"start": [], "resume": ["--resume"], "restart": ["--overwrite=True"], "skip": None}  # train.py's flags
DONE = {"start": "started", "resume": "resumed", "restart": "restarted"}


def run_state(out_dir):
    """What a run's out_dir holds -> (action, why, its log's last header or {}): "start" (no run there), "skip"
    (finished: its log has the eval at its max_iters, the last thing a run writes), "resume" (a ckpt.pt, not
    finished), "restart" (stopped before its first checkpoint: nothing to resume, its log is replaced)."""
    files = rundir.run_files(out_dir)
    if not files:
        return "start", "new", {}
    records = rundir.read_log(os.path.join(out_dir, "log.jsonl")) if "log.jsonl" in files else []
    last = max((i for i, r in enumerate(records) if r.get("type") in ("config", "resume")), default=-1)
    header, after = (records[last], records[last + 1:]) if last >= 0 else ({}, [])
    target = header.get("max_iters")
    if any(r.get("type") == "eval" and r.get("step") == target for r in after):
        return "skip", f"finished at step {target}", header
    reached = max([header.get("step", 0), *(r["step"] for r in after if isinstance(r.get("step"), int))])
    where = f"stopped at step {reached} of {target}" if header else "stopped (no log header)"
    return ("resume", where, header) if "ckpt.pt" in files else ("restart", f"{where} without a checkpoint", header)


def setting_changes(header, cfg):
    """The setting keys (setting.py) in which the run in an out_dir (its log header) differs from the run the
    sweep would make there (cfg: its flat config), as 'key: X there, Y now'."""
    names = [name for name, k in config.KEYS.items()
             if k.setting is True and not (name in RESOLVED and cfg[name] == RESOLVED[name])]
    was = {name: header.get(name, config.KEYS[name].default) for name in names}
    now = {name: cfg[name] for name in names}
    return [f"{k}: {was[k]!r} there, {now[k]!r} now" for k in setting.changed_keys(was, now)]


def foreground():
    """Whether the sweep is in its terminal's foreground process group, where a Ctrl-C reaches its run too."""
    for f in (sys.stdin, sys.stderr, sys.stdout):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if f.isatty() and os.tcgetpgrp(f.fileno()) == os.getpgrp():
                return True
    return False


def launch(cmd):
    """Run one command to its end -> (exit status, whether a SIGINT came meanwhile). A Ctrl-C in the terminal
    reaches the run itself (one process group); a SIGINT the run did not get (one sent to the sweep alone) is
    passed on once PASS_ON_S later if the run still goes. The run stops as train.py does on Ctrl-C (checkpoint
    and log kept), the sweep waiting for it: no run is killed mid-write, none gets the signal twice at once."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(time.monotonic()))
    try:
        child, passed_on = subprocess.Popen(cmd), False
        while True:
            try:
                return child.wait(timeout=1), bool(interrupted)
            except subprocess.TimeoutExpired:
                if interrupted and not passed_on and time.monotonic() - interrupted[0] >= PASS_ON_S and \
                        not foreground():
                    print(f"sweep: passing the interrupt on to the run (pid {child.pid})", file=sys.stderr, flush=True)
                    child.send_signal(signal.SIGINT)
                    passed_on = True
    finally:
        signal.signal(signal.SIGINT, previous)


def failure(rc):
    """A failed run's outcome: its exit status, or the signal that killed it (Popen's negative status)."""
    if rc >= 0:
        return f"failed (exit status {rc})"
    return f"failed (killed by {signal.Signals(-rc).name if -rc in signal.valid_signals() else f'signal {-rc}'})"


def shell(cmd):
    return " ".join(a if "$" in a else shlex.quote(a) for a in cmd)


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    again = shell([sys.executable, shown(os.path.abspath(__file__)), *argv])  # how to continue an unfinished sweep
    i = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--configs", nargs="+", help="config files, from the current directory (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="schemes and n of a published experiment")
    p.add_argument("--schemes", nargs="+", choices=hc.SCHEMES, help="default: all, or the preset's")
    p.add_argument("--n", nargs="+", type=int, help="n_streams for the non-plain schemes (default: 4, or the preset's)")
    p.add_argument("--seeds", nargs="+", default=["1"],
                   help="K: seeds 0..K-1 of every setting; A:B: seeds A..B-1; several values: those seeds (default: 1)")
    p.add_argument("--data_seed", "--data-seed", type=int, help="the data order of every run (default: the "
                   "config's data_seed, else the first seed), so differences pair by seed")
    p.add_argument("--vary_data", "--vary-data", action="store_true",
                   help="a data order of its own for every seed (data_seed = seed) instead of a shared one")
    p.add_argument("--nproc", type=non_negative_int, help="processes (GPUs) per node; 0 runs plain `python "
                   "train.py`; default: this machine's GPUs, or 0 without CUDA")
    p.add_argument("--nnodes", type=positive_int, default=1)
    p.add_argument("--out_root", default="out", help="the runs' out dirs are <out_root>/<run name>")
    p.add_argument("--run", action="store_true", help="run the commands one after another (default: print them)")
    p.add_argument("--stop_on_failure", "--stop-on-failure", action="store_true",
                   help="with --run, stop at the first failed run (default: go on with the others)")
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    if not args.configs:  # the preset's, as paths from here like any --configs
        args.configs = [shown(os.path.join(REPO, c)) for c in preset.get("configs", [])]
    if not args.configs:
        p.error("--configs is required (only a preset that names its configs goes without)")
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e) if str(e).startswith("--seeds") else f"--seeds: not integers ({e})")
    for flag, key, values in (("--seeds", "seed", args.seeds), ("--data_seed", "data_seed", [args.data_seed])):
        for why in filter(None, (config.KEYS[key].problem(v) for v in values if v is not None)):
            p.error(f"{flag}: config key {key!r} must be {why}")  # train.py's rule, said of the flag
    if args.vary_data and args.data_seed is not None:
        p.error("--vary_data gives every seed its own data order; --data_seed sets one for all: pass one of them")
    if args.data_seed == -1:  # train.py's "-1 -> seed", which --vary_data names as such
        p.error("--data_seed -1 would give every seed its own data order; pass --vary_data for that")
    once = {}
    for c in args.configs:  # each file once, however it is spelled
        if not os.path.exists(c):
            p.error(f"config file {c} not found (relative paths are from the current directory, {os.getcwd()})")
        once.setdefault(os.path.realpath(c), c)
    args.configs = list(once.values())
    if args.run and args.nnodes > 1:
        p.error("--run launches on this machine only; print the multi-node commands and start them on every node")
    try:
        parts = name_parts(extra)
        cfgs = {c: configurator.load(config.KEYS, [c, *extra]) for c in args.configs}
        if args.nproc is None:  # this machine's GPUs; one plain process without CUDA or for configs on the CPU
            import torch
            cpu = not torch.cuda.is_available() or all(cfg["device"] == "cpu" for cfg in cfgs.values())
            args.nproc = 0 if cpu else torch.cuda.device_count()
        check_batch(cfgs, max(1, args.nproc) * args.nnodes)
    except ConfigError as e:
        p.error(str(e))
    schemes = args.schemes or preset.get("schemes") or list(hc.SCHEMES)
    head = [c for c, cfg in cfgs.items() if cfg["readout"] == "hc_head"]
    if "plain" in schemes and head:
        p.error(f"{head[0]}: readout 'hc_head' weighs n streams and plain has one; name the n-stream schemes with "
                f"--schemes (e.g. --schemes {' '.join(s for s in hc.SCHEMES if s != 'plain')})")
    ns = args.n or preset.get("n") or [4]
    names, orders = config_names(args.configs), data_seeds(cfgs, args.seeds, args.data_seed, args.vary_data)
    runs, left_out = [], {}
    for path, scheme, n, seed in grid(args.configs, schemes, ns, args.seeds):
        if scheme == "mhc_lite" and n > hc.MAX_PERM_SIZE:  # in an n-scaling sweep the other schemes go on
            left_out[n] = f"sweep: leaving out mhc_lite at n={n}: it takes n_streams <= {hc.MAX_PERM_SIZE} " \
                          f"(n! = {math.factorial(n):,} permutation logits); kromhc and mhc take larger n"
            continue
        try:
            hc.make_connection(scheme, 8, n, 0)
        except ValueError as e:
            p.error(f"{scheme} at n={n}: {e}")
        data_seed = seed if orders[path] is None else orders[path]
        name = setting.run_name(names[path], scheme, n, seed, data_seed, parts,
                                always_data_seed=orders[path] is not None)
        out_dir = os.path.join(args.out_root, name)
        targs = [path, f"--scheme={scheme}", f"--n_streams={n}", f"--seed={seed}", f"--data_seed={data_seed}",
                 f"--wandb_run_name={name}", f"--out_dir={out_dir}", *extra]
        try:  # the run's command as train.py reads it, by train.py's rules (e.g. a seed out of range)
            cfg = config.flat(config.build(configurator.load(config.KEYS, targs), names[path]))
            action, why, header = run_state(out_dir)
        except ConfigError as e:
            p.error(f"{name}: {e}")
        changes = setting_changes(header, cfg) if header and action in ("skip", "resume") else []
        if changes:
            p.error(f"{out_dir} holds a run of another setting ({'; '.join(changes)}); pick another --out_root, or "
                    f"move {out_dir} away to start it afresh")
        cmd = None if action == "skip" else launcher(args.nproc, args.nnodes, name) + targs + ACTIONS[action]
        runs.append(dict(out_dir=out_dir, action=action, why=why, cmd=cmd))
    for note in left_out.values():
        print(note, file=sys.stderr)
    if not runs:
        p.error("no runs left to make: every (scheme, n) was left out")
    if not args.run:  # the commands alone on stdout (a job file), each saying what it does; the rest on stderr
        for r in runs:
            print(f"# skip, {r['why']}: {r['out_dir']}" if r["cmd"] is None else
                  f"{shell(r['cmd'])}  # {r['action']}" + ("" if r["action"] == "start" else f": {r['why']}"))
        counts = {a: sum(r["action"] == a for r in runs) for a in ACTIONS}
        print(f"sweep: {len(runs)} run(s): {counts['start']} to start, {counts['resume']} to resume, "
              f"{counts['restart']} to restart, {counts['skip']} finished (skipped); then compare and plot them:",
              *next_commands(args.out_root, schemes, args.seeds), sep="\n  ", file=sys.stderr)
        return 0
    return run_all(runs, args, schemes, again)


def run_all(runs, args, schemes, again):
    """--run: the runs one after another, then a summary; -> the exit status (1 if any failed, 130 on Ctrl-C)."""
    outcomes, stopped, interrupted = [], None, False
    for k, r in enumerate(runs, 1):
        if stopped:
            outcomes.append("not run")
        elif r["cmd"] is None:
            print(f"sweep: run {k}/{len(runs)}: skip, {r['why']}: {r['out_dir']}", flush=True)
            outcomes.append(f"skipped, {r['why']}")
        else:
            why = "" if r["action"] == "start" else f" ({r['why']})"
            print(f"sweep: run {k}/{len(runs)}: {r['action']}{why}: {shell(r['cmd'])}", flush=True)
            rc, interrupted = launch(r["cmd"])
            outcomes.append("interrupted" if interrupted and rc != 0 else DONE[r["action"]] if rc == 0 else failure(rc))
            if interrupted:  # the sweep stops with the run
                stopped = f"sweep: interrupted at run {k}/{len(runs)} ({r['out_dir']}); to continue, rerun {again}"
            elif rc != 0 and args.stop_on_failure:
                stopped = f"sweep: stopped at the failed run {k}/{len(runs)} (--stop-on-failure)"
    width = max(map(len, outcomes))
    print(f"sweep: {len(runs)} run(s) under {args.out_root}:",
          *(f"{o.ljust(width)}  {r['out_dir']}" for o, r in zip(outcomes, runs)), sep="\n  ", flush=True)
    failed = sum(o.startswith("failed") for o in outcomes)
    if stopped:
        print(stopped, file=sys.stderr)
    if failed:
        print(f"sweep: {failed} run(s) failed (their errors are above); fix the cause and rerun {again}: finished "
              f"runs are skipped, started ones resumed", file=sys.stderr)
    if stopped or failed:
        return 130 if interrupted else 1
    print("sweep: every run finished; compare and plot them:", *next_commands(args.out_root, schemes, args.seeds),
          sep="\n  ")
    return 0


def next_commands(out_root, schemes, seeds):
    """The scripts/compare.py and plot_runs.py commands for the runs under out_root."""
    python, runs = shlex.quote(sys.executable), shlex.quote(os.path.normpath(out_root)) + "/*"
    compare, plot = (shlex.quote(shown(os.path.join(REPO, "scripts", f))) for f in ("compare.py", "plot_runs.py"))
    plots = shlex.quote(os.path.join("plots", os.path.basename(os.path.normpath(out_root))))
    return [f"{python} {compare} {runs}" + (" --baseline scheme=plain" if "plain" in schemes else ""),
            f"{python} {plot} {runs}{' --groups' if len(seeds) > 1 else ''} --out-dir {plots}"]


if __name__ == "__main__":
    sys.exit(run_cli(main, "sweep"))
