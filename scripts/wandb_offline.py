"""
What offline wandb runs hold, read from their run files before (or instead of) `wandb sync`: each
run's id, name, group, job type and tags, then the groups with their members.

    python scripts/wandb_offline.py wandb                        # every offline-run-* under a wandb dir
    python scripts/wandb_offline.py wandb/offline-run-20260101_120000-abc123 --summary
    python scripts/wandb_offline.py out/wandb --json

--summary adds each run's results: its last step and tokens, val loss and BPB (min and last), the
last train loss, and the HellaSwag, CORE and lm-eval results it has; --full-summary every key of
the summary instead (the diagnostics too: 261 keys for the quickstart model with kromhc).

A run resumed offline writes one offline-run-* directory per start, all with the same run id: it is
listed once, from its latest start. A run file without its run record (its process killed at the start) is
left out with a note. The records are read by tracking.read_offline_run.
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import tracking  # noqa: E402
from common import HelpFormatter, run_cli  # noqa: E402
from errors import ConfigError, NotFound  # noqa: E402

# the summary keys --summary shows, in this order (then every lm_eval/ key)
SUMMARY = ["tokens", "val/loss", "val/bpb", "train/loss", "train/loss_ema", "val/hellaswag_acc_norm",
           "final/hellaswag_acc_norm", "final/hellaswag_n", "final/core"]


def run_files(paths):
    """The run-*.wandb files under the given wandb directories, offline-run-* directories or files, oldest first."""
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += p.glob("run-*.wandb" if p.name.startswith("offline-run-") else "**/offline-run-*/run-*.wandb")
        else:
            raise NotFound(f"{p}: no such file or directory; pass a wandb directory (WANDB_DIR/wandb) or an "
                           f"offline-run-* directory")
    if not files:
        online = [p for p in map(Path, paths) if p.is_dir() and (p.name.startswith("run-") or any(p.glob("run-*")))]
        raise ConfigError(f"no offline run files (offline-run-*/run-*.wandb) under {' '.join(paths)}"
                          + ("; its run-* folders are online runs, already on the wandb server" if online else "")
                          + "; pass the wandb folder of runs trained with --wandb_mode=offline (WANDB_DIR/wandb, "
                            "./wandb by default)")
    return sorted(set(files), key=lambda f: f.parent.name)  # offline-run-<date>_<time>-<id>: in time order


def read_runs(files):
    """The runs of the files, one per run id (its latest start wins), each with "file" and "starts"."""
    runs = {}
    for f in files:
        run = tracking.read_offline_run(str(f))
        if not run["id"]:  # wandb writes the run record first: its process died before that
            print(f"wandb_offline.py: note: {f}: no run record (the run stopped as it started); left out",
                  file=sys.stderr)
            continue
        runs[run["id"]] = {**run, "file": str(f), "starts": runs.get(run["id"], {}).get("starts", 0) + 1}
    if not runs:
        raise ConfigError(f"none of the {len(files)} run file(s) holds a run record; pass the wandb folder of runs "
                          f"that started")
    return runs


def brief(run):
    """The lines of --summary: [(key, value for reading)] of the results a reader looks for, those the run has."""
    s = run["summary"]
    keys = [k for k in SUMMARY if k in s] + sorted(k for k in s if k.startswith("lm_eval/"))
    step = [("step", fmt(run["step"]))] if run["step"] is not None else []
    return step + [(k, fmt(s[k])) for k in keys]


def fmt(v):
    """A summary value for reading: floats to 4 decimals, counts with separators, {min, last} in that order."""
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(v[k])}" for k in sorted(v, key=lambda k: (k != "min", k)))
    if isinstance(v, float):
        return f"{v:.4f}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", help="wandb directories, offline-run-* directories or run-*.wandb files")
    summary = p.add_mutually_exclusive_group()
    summary.add_argument("--summary", action="store_true", help="also print each run's results (step, tokens, val "
                                                                "loss and BPB, train loss, HellaSwag, CORE, lm-eval)")
    summary.add_argument("--full-summary", action="store_true", help="also print every key of each run's summary")
    p.add_argument("--json", action="store_true", help="print the runs as one JSON object (their whole summaries)")
    args = p.parse_args(argv)
    return run_cli(lambda: report(args), "wandb_offline.py")


def report(args):
    """The runs of main's arguments, printed: one line each (with --summary its results), then the groups -> 0."""
    runs = read_runs(run_files(args.paths))
    # in start order; runs started in the same second (the directory names' resolution) by name
    runs = sorted(runs.values(), key=lambda r: ((Path(r["file"]).parent.name.split("-") + ["", "", ""])[2], r["name"]))
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    for r in runs:
        print(f"{r['id']}  {r['name'] or '-'}  group={r['group'] or '-'}  job_type={r['job_type'] or '-'}  "
              f"tags={','.join(r['tags']) or '-'}" + (f"  ({r['starts']} starts)" if r["starts"] > 1 else ""))
        shown = sorted(r["summary"].items()) if args.full_summary else brief(r) if args.summary else []
        for k, v in shown:
            print(f"    {k} = {v}")
    groups = {}
    for r in runs:
        groups.setdefault(r["group"] or "(no group)", []).append(r["name"] or r["id"])
    print(f"\n{len(groups)} group(s):")
    for g, names in groups.items():
        print(f"  {g}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
