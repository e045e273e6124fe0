"""
A grid of training runs: every (config, scheme, n_streams, seed), one torchrun command each,
with distinct run names (<config>-<scheme>-n<n>[-<key>=<value>...]-s<seed>[-d<data_seed>]) and out
dirs (<out_root>/<run name>). Prints the commands (default), or runs them one after another with
--run ("run k/N" before each); then the scripts/compare.py and plot_runs.py commands for the runs.

    python scripts/sweep.py --configs configs/fwe_s.py configs/fwe_m.py \\
        --schemes plain hc mhc mhc_lite kromhc mhc_v4 --n 4 --seeds 3 --nproc 8
    python scripts/sweep.py --configs configs/quickstart.py --schemes plain kromhc --run -- --max_iters=50
    python scripts/sweep.py --preset kromhc_n --configs configs/owt_m.py              # KromHC n = 4, 8, 16
    python scripts/sweep.py --preset schemes --configs configs/nanochat_d12.py        # the six schemes, n = 4
    python scripts/sweep.py --preset tinystories --seeds 0 1 2                        # them on configs/tinystories.py
    python scripts/sweep.py --schemes mhc mhc_v4 --configs configs/fwe_m.py --out_root out/hc_head -- --readout=hc_head

--seeds K runs seeds 0..K-1 of every setting; --seeds A:B the seeds A..B-1; two or more values are
the seeds themselves. The seeds vary the init (and dropout) while every run of the sweep sees the
same batches in the same order (--data_seed, default the first seed): the scheme-vs-scheme
differences are then paired by seed, which scripts/compare.py uses. --vary-data gives every seed
its own data order too (data_seed = seed). The runs of one setting differ only in their seeds, named
alike: -s<seed>-d<data_seed> on every run of a sweep with one data order (-s0-d0, -s1-d0, ...), and
-s<seed> on every run with --vary-data (data_seed = seed, as train.py names a run).

--preset names a published experiment (PRESETS: its schemes and n, and its configs where it has
them; --schemes / --n / --configs override them). plain always runs with n = 1 (once per config and
seed, whatever --n says); a scheme that cannot take an n (mhc_lite beyond n = 6: n! logits) is left
out with a note. Arguments after `--` are passed to every run as extra overrides (readout=hc_head
takes the n-stream schemes only); those of keys in a run's setting (setting.py: the model, data,
optimisation, e.g. --n_layer=2, --dataset=tinystories; data_dir by its folder name) are in the run
names, so a sweep with another model or data does not take the names of an earlier one. A key the
sweep sets for each run (scheme, n_streams, seed, data_seed, wandb_run_name, out_dir) is refused
after `--`, naming the flag that sets it, and every run's config is checked with train.py's value
rules before anything prints. With --nnodes > 1 the commands use c10d rendezvous at
$MASTER_ADDR:$MASTER_PORT; run each one on every node. The process count per node is this machine's
GPU count unless --nproc says (0, a plain `python train.py`, without CUDA or for CPU configs), and a
global batch that does not divide over the processes is an error before anything prints.
"""

import argparse
import itertools
import math
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import config  # noqa: E402
import configurator  # noqa: E402
import hc  # noqa: E402
import setting  # noqa: E402
from common import HelpFormatter, non_negative_int, positive_int  # noqa: E402
from errors import ConfigError  # noqa: E402

# the keys the sweep sets for every run: after `--` they would make runs of the grid the same run
SWEEP_KEYS = {"scheme": "--schemes", "n_streams": "--n", "seed": "--seeds", "data_seed": "--data_seed / --vary_data",
              "out_dir": "--out_root", "wandb_run_name": None}
MAX_SEED_COUNT = 32  # --seeds K above this is more likely a seed than a count: refused with the fix


PRESETS = {
    "kromhc_n": dict(schemes=["kromhc"], n=[4, 8, 16]),      # KromHC's n-scaling (factors of 2)
    "schemes": dict(schemes=list(hc.SCHEMES), n=[4]),        # every scheme at n = 4 (mhc_v4 included)
    "tinystories": dict(schemes=list(hc.SCHEMES), n=[4], configs=["configs/tinystories.py"]),  # the same on TinyStories
}


def unbuildable(scheme, n):
    """None if hc.py builds scheme at n streams, else hc.py's reason."""
    try:
        hc.make_connection(scheme, 8, n, 0)
        return None
    except ValueError as e:
        return str(e)


def grid(configs, schemes, ns, seeds):
    """[(config, scheme, n, seed)] with plain collapsed to n = 1, no duplicates, seed by seed: every setting's
    first seed, then every setting's second, ..., so a sweep stopped early has its settings at equal n."""
    runs = []
    for seed, path, scheme, n in itertools.product(seeds, configs, schemes, ns):
        run = (path, scheme, 1 if scheme == "plain" else n, seed)
        if run not in runs:
            runs.append(run)
    return runs


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
    its folder: the data enter the setting by their identity)."""
    parts = []
    for arg in extra:
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if key == "data_dir":
            value = os.path.basename(os.path.normpath(value))
        elif key in config.KEYS and config.KEYS[key].setting is not True:
            continue
        parts.append(f"{key}={re.sub(r'[^A-Za-z0-9_.+-]+', '_', value if eq else 'True').strip('_')}")
    return parts


def run_name(config, scheme, n, seed, data_seed=None, extra=()):
    """data_seed None: the seed's own data order (-s<seed>); else one data order for the sweep (-s<seed>-d<data_seed>
    on every run, also where the two are equal)."""
    config_name = os.path.splitext(os.path.basename(config))[0]
    return setting.run_name(config_name, scheme, n, seed, seed if data_seed is None else data_seed, name_parts(extra),
                            always_data_seed=data_seed is not None)


def command(config, scheme, n, seed, nproc=8, nnodes=1, out_root="out", extra=(), data_seed=None):
    """data_seed None: the seed's own data order (train.py's default)."""
    name = run_name(config, scheme, n, seed, data_seed, extra)
    data_seed = seed if data_seed is None else data_seed
    if nproc == 0:
        launcher = ["python", "train.py"]
    elif nnodes == 1:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    else:
        launcher = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT", f"--rdzv_id={name}", "train.py"]
    return launcher + [config, f"--scheme={scheme}", f"--n_streams={n}", f"--seed={seed}", f"--data_seed={data_seed}",
                       f"--wandb_run_name={name}", f"--out_dir={os.path.join(out_root, name)}", *extra]


def load_configs(configs, extra):
    """{config: its train.py config with the extra overrides}, or a ConfigError."""
    return {c: configurator.load(config.KEYS, [c, *extra]) for c in configs}


def passthrough_error(extra):
    """An error message for an override after `--` that sets a key the sweep sets per run, else None."""
    for arg in extra:
        key = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if key in SWEEP_KEYS:
            flag = SWEEP_KEYS[key]
            fix = (f"pass {flag} to the sweep instead" if flag else
                   "drop it: the sweep names each run <config>-<scheme>-n<n>-s<seed> (and its out_dir after it)")
            return f"{arg} after `--` would give every run of the sweep the same {key}; {fix}"
    return None


def default_nproc(cfgs):
    """This machine's GPUs (0, one plain process, without CUDA or for configs that ask for the CPU)."""
    import torch
    if not torch.cuda.is_available() or all(cfg["device"] == "cpu" for cfg in cfgs.values()):
        return 0
    return torch.cuda.device_count()


def check_batch(cfgs, world_size):
    """An error message for the first config whose batch does not divide over world_size processes, naming
    the numbers and the process counts that would work; None if all divide (train.py's own check)."""
    for path, cfg in cfgs.items():
        micro = cfg["batch_size"] * cfg["block_size"]
        if cfg["total_batch_tokens"] % (micro * world_size):
            fits = [n for n in (1, 2, 4, 8, 16, 32, 64) if cfg["total_batch_tokens"] % (micro * n) == 0]
            return (f"{path}: total_batch_tokens ({cfg['total_batch_tokens']}) is not divisible by batch_size x "
                    f"block_size x processes = {cfg['batch_size']} x {cfg['block_size']} x {world_size}; pass "
                    f"--nproc (x --nnodes) for {' or '.join(map(str, fits)) or 'no'} process(es) in all, or change "
                    f"total_batch_tokens / batch_size after `--`")
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--configs", nargs="+", help="config files (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="schemes and n of a published experiment")
    p.add_argument("--schemes", nargs="+", choices=hc.SCHEMES, help="default: all, or the preset's")
    p.add_argument("--n", nargs="+", type=int, help="n_streams for the non-plain schemes (default: 4, or the preset's)")
    p.add_argument("--seeds", nargs="+", default=["1"],
                   help="K: seeds 0..K-1 of every setting; A:B: seeds A..B-1; several values: those seeds (default: 1)")
    p.add_argument("--data_seed", "--data-seed", type=int, default=None,
                   help="the data order of every run (default: the first seed), so differences pair by seed")
    p.add_argument("--vary_data", "--vary-data", action="store_true",
                   help="a data order of its own for every seed (data_seed = seed) instead of a shared one")
    p.add_argument("--nproc", type=non_negative_int, default=None,
                   help="processes (GPUs) per node; 0 runs plain `python train.py`; default: this machine's GPUs, "
                        "or 0 without CUDA")
    p.add_argument("--nnodes", type=positive_int, default=1)
    p.add_argument("--out_root", default="out")
    p.add_argument("--run", action="store_true", help="run the commands one after another (default: print them)")
    args = p.parse_args(argv)
    if not args.configs:  # the preset's, as paths from here like any --configs
        args.configs = [os.path.relpath(os.path.join(REPO, c)) for c in PRESETS.get(args.preset, {}).get("configs", [])]
    if not args.configs:
        p.error("--configs is required (only a preset that names its configs goes without)")
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e) if str(e).startswith("--seeds") else f"--seeds: not integers ({e})")
    if args.vary_data and args.data_seed is not None:
        p.error("--vary_data gives every seed its own data order; --data_seed sets one for all: pass one of them")
    data_seed = None if args.vary_data else (args.seeds[0] if args.data_seed is None else args.data_seed)
    for c in args.configs:
        if not os.path.exists(c):
            p.error(f"config file {c} not found")
    if args.run and args.nnodes > 1:
        p.error("--run launches on this machine only; print the multi-node commands and start them on every node")
    error = passthrough_error(extra)
    if error:
        p.error(error)
    try:
        cfgs = load_configs(args.configs, extra)
    except ConfigError as e:
        p.error(str(e))
    if args.nproc is None:
        args.nproc = default_nproc(cfgs)
    error = check_batch(cfgs, max(1, args.nproc) * args.nnodes)
    if error:
        p.error(error)
    preset = PRESETS.get(args.preset, {})
    schemes = args.schemes or preset.get("schemes") or list(hc.SCHEMES)
    head = [c for c, cfg in cfgs.items() if cfg["readout"] == "hc_head"]
    if "plain" in schemes and head:
        p.error(f"{head[0]}: readout 'hc_head' weighs n streams and plain has one; name the n-stream schemes with "
                f"--schemes (e.g. --schemes {' '.join(s for s in hc.SCHEMES if s != 'plain')})")
    ns = args.n or preset.get("n") or [4]
    runs, left_out = [], {}
    for run in grid(args.configs, schemes, ns, args.seeds):
        scheme, n = run[1], run[2]
        if scheme == "mhc_lite" and n > hc.MAX_PERM_SIZE:  # in an n-scaling sweep the other schemes go on
            left_out[n] = f"sweep: leaving out mhc_lite at n={n}: it takes n_streams <= {hc.MAX_PERM_SIZE} " \
                          f"(n! = {math.factorial(n):,} permutation logits); kromhc and mhc take larger n"
            continue
        reason = unbuildable(scheme, n)
        if reason:
            p.error(f"{scheme} at n={n}: {reason}")
        try:  # train.py's value rules on the run's own config (e.g. a seed out of range)
            config.build({**cfgs[run[0]], "scheme": scheme, "n_streams": n, "seed": run[3]})
        except ConfigError as e:
            p.error(f"{run_name(*run, data_seed, extra)}: {e}")
        runs.append(run)
    for note in left_out.values():
        print(note, file=sys.stderr)
    if not runs:
        p.error("no runs left to make: every (scheme, n) was left out")
    cmds = [command(*run, nproc=args.nproc, nnodes=args.nnodes, out_root=args.out_root, extra=extra, data_seed=data_seed)
            for run in runs]
    for k, cmd in enumerate(cmds, 1):
        line = " ".join(a if "$" in a else shlex.quote(a) for a in cmd)
        print(f"sweep: run {k}/{len(cmds)}: {line}" if args.run else line, flush=True)
        if args.run:
            rc = subprocess.call(cmd, cwd=REPO)
            if rc != 0:
                print(f"sweep: command failed with exit code {rc}: {line}", file=sys.stderr)
                return rc
    # printed commands stay alone on stdout (a job file); what to run next goes beside them
    print(f"sweep: {len(cmds)} run(s) {'done' if args.run else 'printed'}; then compare and plot them:",
          *next_commands(args.out_root, schemes, args.seeds), sep="\n  ", file=sys.stdout if args.run else sys.stderr)
    return 0


def next_commands(out_root, schemes, seeds):
    """The scripts/compare.py and plot_runs.py commands for the runs under out_root."""
    runs = shlex.quote(os.path.normpath(out_root)) + "/*"
    plots = shlex.quote(os.path.join("plots", os.path.basename(os.path.normpath(out_root))))
    base = " --baseline scheme=plain" if "plain" in schemes else ""
    return [f"python scripts/compare.py {runs}{base}",
            f"python scripts/plot_runs.py {runs}{' --groups' if len(seeds) > 1 else ''} --out-dir {plots}"]


if __name__ == "__main__":
    sys.exit(main())
