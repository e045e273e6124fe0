"""
Compare training runs with their seed-to-seed uncertainty: runs grouped by setting, every group's
mean, std and confidence interval, and every group's difference from a baseline paired by seed,
with its interval, the paired t-test p-value and a verdict.

    python scripts/compare.py out/quickstart-*                          # final val loss and BPB
    python scripts/compare.py out/seeds_pydocs-* --baseline scheme=plain --markdown
    python scripts/compare.py out/fwe_s-* --metric val_bpb core --step 5000 --json > compare.json

A group is the runs of one setting (setting.py: every config key but the seeds and bookkeeping, the
config name and the data identity); its runs are its seeds. Per group and metric: mean, sample std,
n and the Student-t interval mean +- t_{(1+c)/2, n-1} s / sqrt(n). Against the baseline group
(--baseline KEY=VALUE ..., or the first group): runs paired by (seed, data_seed), so the pairs share
their random streams, the differences d_i = group_i - baseline_i, their mean with the t interval, and
the p-value of the paired t-test of mean d = 0 (scipy.stats.ttest_rel). The verdict is "better" or
"worse" when the interval excludes 0 (p < 1 - confidence), in the metric's good direction (lower for
loss, BPB and perplexity; higher for accuracies and CORE), else "not resolved at n = K". A group of
one run gets no interval, and says so.

Metrics: any number of a log.jsonl record at a step other than the train records: the eval records
(val_loss, val_bpb, hellaswag_acc_norm, ...), the "final" record (hellaswag_acc_norm, core, ...), and
any later evaluation's record, by its key (a nested number as key/sub); a later record at a step
overrides an earlier one of the same name. The wandb names (val/bpb, final/core) are accepted too.

An argument that is not a run (no log.jsonl: the wandb/ folder under an out root) is left out with a
note. Refused with a named error, never averaged: an unfinished run (without --step), a diverged one (its
log's error record, or a NaN or inf value at the step), a run without the metric at the step, two runs of
one seed in a group, groups on other data or tokenizers. Notes and warnings go to stderr: with --json,
stdout is the JSON object alone.
A warning names seeds without a partner in the baseline and groups compared at different steps.
"""

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import setting  # noqa: E402
import tracking  # noqa: E402
from common import HelpFormatter, run_cli  # noqa: E402
import config  # noqa: E402
from errors import ConfigError  # noqa: E402
from rundir import read_run, run_dirs  # noqa: E402

DEFAULT_METRICS = ["val_loss", "val_bpb"]
LOWER = ("loss", "bpb", "ppl", "perplexity", "nll")  # a metric whose name holds one of these: lower is better
HIGHER = ("acc", "core", "score", "exact_match", "f1")
NOT_METRICS = {"type", "step", "tokens"}


class CompareError(ConfigError):
    """Runs that cannot be compared (unfinished, diverged, on other data, ...): the message names them and the fix."""


def direction(metric, lower=(), higher=()):
    """'lower' or 'higher' is better, or None when the name does not say (--lower / --higher tell)."""
    for way, names in (("lower", lower), ("higher", higher)):
        if metric in names:
            return way
    for way, words in (("lower", LOWER), ("higher", HIGHER)):
        if any(w in metric.lower() for w in words):
            return way
    return None


# -----------------------------------------------------------------------------
# runs and groups

def load_run(path, keys):
    """A run directory (or its log.jsonl) -> {"dir", "header", "setting", "name", "seed", "data_seed",
    "values": {step: {metric: value}}, "nonfinite": {step: {metric: NaN or inf}}, "max_iters", "last_step",
    "diverged" (the step of its error record), "warnings"}."""
    if os.path.exists(path) and not os.path.isdir(path) and not path.endswith(".jsonl"):  # missing: read_run names it
        raise CompareError(f"{path}: not a run directory or a log.jsonl; pass train.py out_dirs")
    run = read_run(path)
    records, headers = run["records"], run["headers"]
    if not headers:
        raise CompareError(f"{path}: no config record in its log.jsonl; not a train.py log")
    header, warnings = run["config"], []  # a resume may change keys (e.g. max_iters): the last header ran last
    items = setting.setting(header, keys)
    changed = setting.changed_keys(setting.setting(headers[0], keys), items)
    if changed:
        warnings.append(f"{path}: its setting changed at a resume ({', '.join(changed)}); grouped by the last one")
    values, nonfinite, diverged = {}, {}, None
    for r in records:
        kind = r.get("type")
        if kind == "error":
            diverged = r.get("step")
        if kind in ("config", "resume", "train", "error") or not isinstance(r.get("step"), int):
            continue
        row, bad = values.setdefault(r["step"], {}), nonfinite.setdefault(r["step"], {})
        flat = {f"{key}/{k}": x for key, v in r.items() if isinstance(v, dict) for k, x in v.items()}
        flat.update({key: v for key, v in r.items() if not isinstance(v, dict) and key not in NOT_METRICS})
        for name, x in flat.items():  # a later record's value replaces an earlier one, finite or not
            if _number(x):
                row[name] = x
                bad.pop(name, None)
            elif isinstance(x, float):  # NaN or inf: the run diverged there (json reads NaN, Infinity)
                bad[name] = x
                row.pop(name, None)
    data_seed = header.get("data_seed", header.get("seed"))
    if data_seed == -1:  # a header written before the run resolved it
        data_seed = header.get("seed")
    return {"dir": path, "header": header, "setting": items, "name": setting.setting_name(items),
            "seed": header.get("seed"), "data_seed": data_seed, "values": values,
            "max_iters": header.get("max_iters"), "last_step": max(values, default=None), "diverged": diverged,
            "nonfinite": nonfinite, "warnings": warnings}


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_runs(runs):
    """The runs (each with its setting's "name" and "setting") by setting, in the order of first appearance:
    [{"name", "setting", "runs", "label" (the keys that vary between the groups, or the name), "keys"}].
    Two runs of one (seed, data_seed) in a group are an error (a rerun: pass one of them)."""
    groups = {}
    for run in runs:
        g = groups.setdefault(run["name"], {"name": run["name"], "setting": run["setting"], "runs": []})
        twin = next((r for r in g["runs"] if (r["seed"], r["data_seed"]) == (run["seed"], run["data_seed"])), None)
        if twin:
            raise CompareError(f"{twin['dir']} and {run['dir']} are the same seed ({run['seed']}, data_seed "
                               f"{run['data_seed']}) of one setting ({run['name']}); pass one of them")
        g["runs"].append(run)
    groups = list(groups.values())
    varying = setting.varying_keys([g["setting"] for g in groups])
    for g in groups:
        g["label"] = setting.label(g["setting"], varying) or g["name"]
        g["keys"] = {k: g["setting"].get(k) for k in varying}
    return groups


def check_data(groups):
    """Groups on other data or tokenizers measure other numbers: an error naming them."""
    ident = {}
    for g in groups:
        ident.setdefault(tuple(g["setting"].get(k) for k in ("dataset", "data_id", "tokenizer")), []).append(g["label"])
    if len(ident) > 1:
        where = "; ".join(f"{', '.join(labels)}: dataset {d!r}, data_id {i}, tokenizer {t}"
                          for (d, i, t), labels in ident.items())
        raise CompareError(f"the runs are on different data or tokenizers ({where}); their val loss and BPB are "
                           f"not comparable: compare runs on one prepared dataset")


def pick_baseline(groups, spec):
    """The baseline group: the one whose setting matches every KEY=VALUE of spec (or whose name or label
    is spec), else the first."""
    if not spec:
        return groups[0]
    match = [g for g in groups if " ".join(spec) in (g["name"], g["label"])]
    if not match:
        want = [part.partition("=") for s in spec for part in s.split(",")]
        for part, eq, _ in want:
            if not eq:
                raise CompareError(f"--baseline {part!r}: give KEY=VALUE (e.g. scheme=plain), or a group's name")
        match = [g for g in groups if all(_matches(g["setting"].get(k.strip()), v.strip()) for k, _, v in want)]
    if len(match) != 1:
        raise CompareError(f"--baseline {' '.join(spec)} matches {len(match)} groups "
                           f"({', '.join(g['label'] for g in match) or 'none'}); the groups are: "
                           f"{', '.join(g['label'] for g in groups)}")
    return match[0]


def _matches(value, text):
    try:
        same_number = _number(value) and float(text) == float(value)
    except ValueError:  # text is not a number
        same_number = False
    return str(value) == text or json.dumps(value) == text or same_number


# -----------------------------------------------------------------------------
# values and statistics

def values_at(group, metric, step):
    """{(seed, data_seed): the metric at step (None: at the run's end)} -> ({pair: value}, step). Refuses an
    unfinished run (at its end), a diverged one (at its end, at or past its error record, or where the metric
    is NaN or inf), a run without the metric there, and mixed steps."""
    out, steps = {}, set()
    for run in group["runs"]:
        at = step
        if at is None:
            if run["diverged"] is not None:
                raise diverged_error(run, metric, run["diverged"], "its log's error record")
            if run["last_step"] is None or run["max_iters"] is None or run["last_step"] < run["max_iters"]:
                raise CompareError(f"{run['dir']} is unfinished: its last eval is at step {run['last_step']} of "
                                   f"max_iters {run['max_iters']} (still running, or stopped); finish it with the "
                                   f"same command and --resume, leave it out, or compare at a step every run "
                                   f"reached with --step")
            at = run["max_iters"]
        row = run["values"].get(at, {})
        if metric in run["nonfinite"].get(at, {}):
            raise diverged_error(run, metric, at, f"its {metric} is {run['nonfinite'][at][metric]}, not finite")
        if metric not in row and run["diverged"] is not None and at >= run["diverged"]:
            raise diverged_error(run, metric, run["diverged"], "its log's error record")
        if metric not in row:
            have = sorted(s for s, r in run["values"].items() if metric in r)
            raise CompareError(f"{run['dir']} has no {metric} at step {at} (it has {metric} at steps "
                               f"{have or 'none'}; its metrics there: {', '.join(sorted(row)) or 'none'})")
        out[(run["seed"], run["data_seed"])] = row[metric]
        steps.add(at)
    if len(steps) > 1:
        raise CompareError(f"group {group['label']}: its runs end at different steps {sorted(steps)}; pick one "
                           f"with --step")
    return out, steps.pop()


def diverged_error(run, metric, step, why):
    """The refusal of a run that diverged at step (why: what says so)."""
    earlier = [s for s, r in run["values"].items() if metric in r and s < step]
    return CompareError(f"{run['dir']} diverged at step {step} ({why}); leave it out and report it as diverged"
                        + (f", or compare at an earlier --step (its last finite {metric} is at step {max(earlier)})"
                           if earlier else ""))


def paired(values, base, confidence):
    """The paired comparison of two {pair: value} dicts over their common pairs -> dict (JSON-able)."""
    from scipy import stats
    keys = sorted(set(values) & set(base))
    d = [values[k] - base[k] for k in keys]
    res = {"n_pairs": len(keys), "pairs": [list(k) for k in keys], "diff": d, "mean": None, "std": None,
           "ci": None, "p": None}
    if not keys:
        return res
    res["mean"], res["std"], _, ci = setting.mean_interval(d, confidence)
    res["ci"] = list(ci) if ci else None
    if len(keys) > 1:
        p = stats.ttest_rel([values[k] for k in keys], [base[k] for k in keys]).pvalue
        res["p"] = None if math.isnan(p) else float(p)  # nan: identical differences of 0, nothing to test
    return res


def verdict(res, good, confidence):
    """better / worse when the paired interval excludes 0, else not resolved (n = 1: no interval)."""
    if res["n_pairs"] == 0:
        return "no common seeds"
    if res["ci"] is None:
        return "n = 1: no interval"
    if res["p"] is None or res["p"] >= 1 - confidence or res["ci"][0] <= 0 <= res["ci"][1]:
        return f"not resolved at n = {res['n_pairs']}"
    up = res["mean"] > 0
    if good is None:
        return "higher" if up else "lower"
    return "better" if up == (good == "higher") else "worse"


def compare(paths, keys, metrics=None, step=None, baseline=None, confidence=0.95, lower=(), higher=()):
    """The whole comparison as one JSON-able dict: groups, their statistics, the paired differences."""
    # a wandb name (val/bpb, final/core) -> its log.jsonl name; a log name as it is
    metrics = [(tracking.log_key(m) or (None, m))[1] for m in (metrics or DEFAULT_METRICS)]
    runs = [load_run(p, keys) for p in paths]
    warnings = [w for r in runs for w in r["warnings"]]
    groups = group_runs(runs)
    check_data(groups)
    base = pick_baseline(groups, baseline)
    out = {"confidence": confidence, "step": step, "metrics": metrics, "baseline": base["name"],
           "groups": [], "warnings": warnings}
    base_values = {m: values_at(base, m, step) for m in metrics}
    for g in [base] + [g for g in groups if g is not base]:  # the baseline first, the others as they came
        entry = {"name": g["name"], "label": g["label"], "keys": g["keys"], "baseline": g is base,
                 "runs": [r["dir"] for r in g["runs"]], "seeds": [[r["seed"], r["data_seed"]] for r in g["runs"]],
                 "metrics": {}}
        for m in metrics:
            vals, at = values_at(g, m, step)
            mean, std, n, ci = setting.mean_interval(list(vals.values()), confidence)
            stat = {"step": at, "values": [vals[k] for k in sorted(vals)], "mean": mean, "std": std, "n": n,
                    "ci": list(ci) if ci else None, "direction": direction(m, lower, higher)}
            bvals, bstep = base_values[m]
            if at != bstep:
                warnings.append(f"{m}: {g['label']} is at step {at}, the baseline {base['label']} at step {bstep}")
            if g is not base:
                res = paired(vals, bvals, confidence)
                res["verdict"] = verdict(res, stat["direction"], confidence)
                alone = sorted(set(vals) ^ set(bvals))
                if alone:
                    warnings.append(f"{m}: {g['label']} vs {base['label']}: seeds (seed, data_seed) {alone} have no "
                                    f"partner in the other group and are left out of the paired difference")
                stat["vs_baseline"] = res
            entry["metrics"][m] = stat
        out["groups"].append(entry)
    out["warnings"] = list(dict.fromkeys(warnings))
    return out


# -----------------------------------------------------------------------------
# tables

def fmt(v):
    return "-" if v is None else f"{v:.4f}"


def fmt_p(p):
    return "-" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def rows(result, m):
    """The header and one row per group of metric m: the cells of both tables."""
    pct = f"{round(100 * result['confidence'])}%"
    head = ["group", "n", "mean", "std", f"{pct} CI", "Δ vs baseline (paired)", f"{pct} CI of Δ", "p", "verdict"]
    out = []
    for g in result["groups"]:
        s = g["metrics"][m]
        ci = f"[{fmt(s['ci'][0])}, {fmt(s['ci'][1])}]" if s["ci"] else "n = 1: none"
        if g["baseline"]:
            cells = ["baseline", "", "", ""]
        else:
            v = s["vs_baseline"]
            dci = f"[{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]" if v["ci"] else "-"
            cells = [f"{v['mean']:+.4f}" if v["mean"] is not None else "-", dci, fmt_p(v["p"]), v["verdict"]]
        out.append([g["label"], str(s["n"]), fmt(s["mean"]), fmt(s["std"]), ci, *cells])
    return head, out


def title(result, m):
    s = result["groups"][0]["metrics"][m]
    steps = sorted({g["metrics"][m]["step"] for g in result["groups"]})
    good = {"lower": ", lower is better", "higher": ", higher is better"}.get(s["direction"], "")
    return f"{m} at step {', '.join(map(str, steps))}{good}"


def text_table(result):
    out = []
    for m in result["metrics"]:
        head, body = rows(result, m)
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out += [title(result, m), *lines, ""]
    return "\n".join(out).rstrip()


def markdown_table(result):
    out = []
    for m in result["metrics"]:
        head, body = rows(result, m)
        out += [f"**{title(result, m)}**", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body] + [""]
    return "\n".join(out).rstrip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (train.py out_dir) or their log.jsonl files")
    p.add_argument("--metric", nargs="+",
                   help=f"log.jsonl (or wandb) metric names (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--step", type=int, help="compare at this step (default: every run's end)")
    p.add_argument("--baseline", nargs="+", help="KEY=VALUE ... selecting the baseline group (e.g. scheme=plain), "
                                                 "or its name (default: the first group)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the intervals (default: 0.95)")
    p.add_argument("--lower", nargs="+", default=(), help="metrics where lower is better (beyond loss, bpb, ...)")
    p.add_argument("--higher", nargs="+", default=(), help="metrics where higher is better (beyond acc, core, ...)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    out.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args(argv)
    if not 0 < args.confidence < 1:
        p.error(f"--confidence must be in (0, 1), got {args.confidence}")
    return run_cli(lambda: report(args), "compare.py")


def report(args):
    """The comparison of main's arguments, printed: warnings on stderr, then the JSON or the tables -> 0."""
    result = compare(run_dirs(args.runs, "compare.py"), config.KEYS, args.metric, args.step, args.baseline,
                     args.confidence, args.lower, args.higher)
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(markdown_table(result) if args.markdown else text_table(result))
    print()
    for g in result["groups"]:
        print(f"{g['label']}: {g['name']}, {len(g['runs'])} run(s), seeds {', '.join(str(s[0]) for s in g['seeds'])}"
              + (" (baseline)" if g["baseline"] else ""))
    print(f"Δ: group - baseline, paired by (seed, data_seed); p: paired t-test; {round(100 * args.confidence)}% "
          f"Student-t intervals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
