"""
Figures and a results table from train.py run directories (their log.jsonl).

    python scripts/plot_runs.py out/quickstart-*-s1337 --out-dir plots
    python scripts/plot_runs.py out/a out/b --labels "mHC n=4" "KromHC n=4" --formats png svg --step 200
    python scripts/plot_runs.py out/seeds_pydocs-* --groups --out-dir plots    # seeds: a mean and a band

An argument that is not a run (no log.jsonl: the wandb/ folder under an out root) is left out with a note,
unless --labels names every argument.

Writes into --out-dir:
    curves.{png,svg}      train loss, val loss and val BPB vs tokens, all runs on each panel (and HellaSwag
                          acc_norm when the eval records carry "hellaswag_acc_norm"); with --groups one curve
                          per setting (setting.py: the runs that differ only in their seeds), the mean of its
                          seeds at each step with a band: the 95% Student-t interval of that mean (unpaired:
                          scripts/compare.py gives the paired differences), each panel from step 0 with an
                          inset on the last 70% of the tokens; every run or setting has its own dashes and
                          hollow markers
    hres_<run>.{png,svg}  the token-averaged H_res of every connection (rows: attention, MLP; columns:
                          layers) and the composite through the whole stack, at the last eval (or --step)
    depth.{png,svg}       Amax gain (forward: max |row sum|, backward: max |column sum|) of each connection's
                          H_res and of the composite up to that depth, and the doubly-stochastic error
                          max(|row sum - 1|, |col sum - 1|) vs depth
    results.md            markdown table: final val loss and BPB, HellaSwag acc_norm (with its item count
                          when fewer than the 10,042 of the validation set) and CORE (from <run>/hellaswag.json
                          and core.json when they exist), training tokens/s, parameters and the residual
                          scheme's extra parameters

The composite-by-depth curve multiplies the logged token-averaged matrices (H_L ... H_1), which is not the
same as averaging the per-token products; the exact composite of the whole stack, as logged by train.py, is
drawn as a marker at the last depth. Plain runs have no H_res: they appear in the curves and the table only.
"""

import argparse
import itertools
import math
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import config  # noqa: E402
import rundir  # noqa: E402
from common import HelpFormatter, run_cli  # noqa: E402
from errors import ConfigError  # noqa: E402


# -----------------------------------------------------------------------------
# reading runs

def read_run(path, label=None):
    """A run from its directory (or its log.jsonl: rundir.read_run) -> dict with its config (the merged headers),
    train and eval records, and the HellaSwag / CORE results found next to it."""
    run = rundir.read_run(path, skip_damaged=True)
    config = {k: v for h in run["headers"] for k, v in h.items() if k not in ("type", "step")}
    train = [r for r in run["records"] if r.get("type") == "train" and isinstance(r.get("tokens"), (int, float))]
    evals = [r for r in run["records"] if r.get("type") == "eval" and isinstance(r.get("tokens"), (int, float))
             and isinstance(r.get("step"), int)]
    if not train and not evals:
        raise ConfigError(f"{run['dir'] / 'log.jsonl'}: no train or eval records; pass the out_dir of a run that "
                          f"has logged at least one step (--log_interval, --eval_interval)")
    return {"dir": run["dir"], "config": config, "train": train, "eval": evals, "hellaswag": run["hellaswag"],
            "core": run["core"], "label": label or default_label(config, run["dir"])}


def default_label(config, run_dir):
    if "scheme" not in config:
        return run_dir.name
    return config["scheme"] if config["scheme"] == "plain" else f"{config['scheme']} n={config.get('n_streams')}"


def unique_labels(runs):
    """Tell runs with the same label apart: by directory name, else by position."""
    for attempt in (lambda r, i: f"{r['label']} ({r['dir'].name})", lambda r, i: f"{r['label']} #{i + 1}"):
        counts = Counter(r["label"] for r in runs)
        for i, r in enumerate(runs):
            if counts[r["label"]] > 1:
                r["label"] = attempt(r, i)


def extra_params(config):
    """Parameters of the residual connections (2 per block): what a scheme adds over plain."""
    import torch
    import hc
    scheme = config.get("scheme")
    if scheme is None or scheme == "plain":
        return 0 if scheme == "plain" else None
    opts = {k: config.get(k) for k in ("sinkhorn_iters", "res_logit_init", "gate_init", "kron_factors")}
    with torch.device("meta"):
        conns = [hc.make_connection(scheme, config["n_embd"], config["n_streams"], i, **opts)
                 for i in range(2 * config["n_layer"])]
    return sum(p.numel() for c in conns for p in c.parameters())


def pick_eval(run, step=None):
    """The eval record at step (default: the last one with H_res matrices, else the last)."""
    evals = run["eval"]
    if step is not None:
        match = [e for e in evals if e["step"] == step]
        if not match:
            raise ConfigError(f"--step: {run['dir']} has no eval at step {step}; its evals are at "
                              f"{[e['step'] for e in evals]}")
        return match[-1]
    with_hres = [e for e in evals if e.get("hres")]
    return (with_hres or evals or [None])[-1]


# -----------------------------------------------------------------------------
# plotting helpers

def fmt_tokens(x, _pos=None):
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def save(fig, out_dir, name, formats):
    paths = [Path(out_dir) / f"{name}.{ext}" for ext in formats]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def ema_alpha(n, alpha=None):
    """The EMA factor for n points: alpha, or (None) a window of about 1/25 of them; 0 is no smoothing."""
    return 1.0 - 1.0 / max(1.0, n / 25) if alpha is None else alpha


def ema(values, alpha=None):
    alpha = ema_alpha(len(values), alpha)
    return list(itertools.accumulate(values, lambda s, v: alpha * s + (1 - alpha) * v))


def focus_ylim(ax, series, skip_frac=0.1):
    """y-limits that ignore the first skip_frac of training (the initial loss ~ ln(vocab) would
    squash everything else)."""
    lo, hi = math.inf, -math.inf
    for xs, ys in series:
        cut = skip_frac * max(xs, default=0)
        kept = [y for x, y in zip(xs, ys) if x >= cut and math.isfinite(y)] or [y for y in ys if math.isfinite(y)]
        if kept:
            lo, hi = min(lo, min(kept)), max(hi, max(kept))
    if math.isfinite(lo) and hi > lo:
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)


EVAL_PANELS = [("val_loss", "val loss", "nats / token"), ("val_bpb", "val BPB", "bits / byte"),
               ("hellaswag_acc_norm", "HellaSwag acc_norm", "accuracy")]  # the last if logged at eval time


LINE_STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def style(i):
    """The line of run (or group) i: its own dash pattern and hollow marker, slightly transparent, so that two
    curves that coincide (two schemes with the same mean) both stay visible."""
    return dict(ls=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)], mfc="none", alpha=0.85)


def points(records, key):
    """(tokens, values) of the records that hold a key."""
    kept = [r for r in records if r.get(key) is not None]
    return [r["tokens"] for r in kept], [r[key] for r in kept]


def curve_axes(runs):
    """-> (figure, its axes, the EVAL_PANELS the runs logged): the train loss panel, then one per eval metric."""
    evals = [p for p in EVAL_PANELS if any(e.get(p[0]) is not None for r in runs for e in r["eval"])]
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(5 * (1 + len(evals)), 4.2), squeeze=False)
    for ax, ylabel in zip(axes[0], ["nats / token"] + [y for _, _, y in evals]):
        ax.set(xlabel="tokens", ylabel=ylabel)
        ax.xaxis.set_major_formatter(fmt_tokens)
        ax.grid(alpha=0.3)
    return fig, axes[0], evals


def plot_curves(runs, out_dir, formats, smooth=None):
    """One panel per metric, every run on each: train loss (raw, faint, and EMA), then the eval
    metrics present in the logs."""
    fig, axes, evals = curve_axes(runs)
    series = [[] for _ in axes]
    smoothed = False  # "EMA" in the title only when some curve is smoothed (few points: none is)
    for i, run in enumerate(runs):
        color = run.get("color", f"C{i % 10}")
        xs, ys = points(run["train"], "loss")
        if xs:
            if ema_alpha(len(ys), smooth) > 0:
                smoothed = True
                axes[0].plot(xs, ys, color=color, alpha=0.25, lw=0.8)
            axes[0].plot(xs, ema(ys, smooth), color=color, lw=1.6, ls=style(i)["ls"], alpha=0.85, label=run["label"])
            series[0].append((xs, ys))
        for j, (key, _, _) in enumerate(evals, 1):
            xs, ys = points(run["eval"], key)
            if xs:
                axes[j].plot(xs, ys, color=color, ms=4, lw=1.6, label=run["label"], **style(i))
                series[j].append((xs, ys))
    titles = ["train loss" + (" (EMA)" if smoothed else "")] + [t for _, t, _ in evals]
    for j, (ax, title, ser) in enumerate(zip(axes, titles, series)):
        ax.set_title(title)
        if j == 0:  # the noisy train loss: its first steps (~ ln(vocab)) would squash the rest
            focus_ylim(ax, ser)
        elif ax.get_ylabel() != "accuracy":  # the few eval points, step 0 included, all in view
            focus_ylim(ax, ser, skip_frac=0.0)
        if ser:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out_dir, "curves", formats)


def group_runs(runs):
    """[{"label", "color", "runs"}]: the runs grouped by setting (setting.py), as scripts/compare.py does."""
    import setting
    groups = {}
    for run in runs:
        items = setting.setting(run["config"], config.KEYS)
        groups.setdefault(setting.setting_name(items), {"setting": items, "runs": []})["runs"].append(run)
    groups = list(groups.values())
    varying = setting.varying_keys([g["setting"] for g in groups])
    for i, g in enumerate(groups):
        name = setting.label(g["setting"], varying) or setting.setting_name(g["setting"])
        g["label"] = f"{name} ({len(g['runs'])} seeds)"
        g["color"] = f"C{i % 10}"
    return groups


def mean_band(series, confidence=0.95):
    """[(xs, ys)] of the seeds of a group -> (xs, mean, lo, hi) at the x every series has; the band is the
    Student-t interval of the mean (lo = hi = mean for one series)."""
    import setting
    common = sorted(set.intersection(*(set(xs) for xs, _ in series)))
    at = [dict(zip(xs, ys)) for xs, ys in series]
    mean, lo, hi = [], [], []
    for x in common:
        m, _, _, ci = setting.mean_interval([a[x] for a in at], confidence)
        mean.append(m)
        lo.append(ci[0] if ci else m)
        hi.append(ci[1] if ci else m)
    return common, mean, lo, hi


def plot_group_curves(groups, out_dir, formats, smooth=None, zoom=0.3):
    """curves.* with one curve per group: the mean over its seeds (train loss: of each seed's EMA) and a band.
    Each panel shows the whole run, step 0 included; an inset zooms on the tokens after the first zoom fraction,
    where the curves separate (not on accuracies)."""
    runs = [r for g in groups for r in g["runs"]]
    fig, axes, evals = curve_axes(runs)
    insets = {j: ax.inset_axes([0.42, 0.42, 0.55, 0.5]) for j, ax in enumerate(axes) if ax.get_ylabel() != "accuracy"}
    series = [[] for _ in axes]
    for i, g in enumerate(groups):
        train = [points(r["train"], "loss") for r in g["runs"]]
        panels = [[(xs, ema(ys, smooth)) for xs, ys in train]] + [[points(r["eval"], key) for r in g["runs"]]
                                                                  for key, _, _ in evals]
        for j, (ax, per) in enumerate(zip(axes, panels)):
            if not all(xs for xs, _ in per):
                continue
            xs, mean, lo, hi = mean_band(per)
            for target in [ax] + ([insets[j]] if j in insets else []):
                target.plot(xs, mean, color=g["color"], ms=4, lw=1.6, label=g["label"],
                            **dict(style(i), marker=None if j == 0 else style(i)["marker"]))
                target.fill_between(xs, lo, hi, color=g["color"], alpha=0.2, lw=0)
            series[j] += [(xs, lo), (xs, hi)]
    smoothed = any(ema_alpha(len(r["train"]), smooth) > 0 for r in runs)
    titles = [f"train loss ({'EMA, ' if smoothed else ''}mean of seeds)"] + [t for _, t, _ in evals]
    for j, (ax, title, ser) in enumerate(zip(axes, titles, series)):
        ax.set_title(title + (" (mean, 95% CI)" if j else ""))
        if j in insets and ser:  # ser: the lower and upper edges of the bands
            focus_ylim(ax, ser, skip_frac=0.0)  # the whole run: step 0 in view
            ins, end = insets[j], max(max(xs) for xs, _ in ser)
            ins.set_xlim(zoom * end, 1.02 * end)
            focus_ylim(ins, ser, skip_frac=zoom)
            ins.xaxis.set_major_formatter(fmt_tokens)
            ins.tick_params(labelsize=7)
            ins.grid(alpha=0.3)
            ins.set_title(f"after {zoom:.0%} of the tokens", fontsize=7)
            ax.indicate_inset_zoom(ins, edgecolor="0.5")
        elif j in insets:
            insets[j].remove()
        if ser:
            ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return save(fig, out_dir, "curves", formats)


def connection_grid(names):
    """Place connection names like 'L03.attn' on a (sublayer, layer) grid; other names fill
    rows of the same width in order."""
    parsed = [re.match(r"\D*(\d+)\D*?(attn|mlp)", n) for n in names]
    if all(parsed):
        layers = sorted({int(m.group(1)) for m in parsed})
        col = {layer: j for j, layer in enumerate(layers)}
        return 2, len(layers), {n: ((0 if m.group(2) == "attn" else 1), col[int(m.group(1))])
                                for n, m in zip(names, parsed)}
    cols = min(8, len(names))
    return math.ceil(len(names) / cols), cols, {n: divmod(i, cols) for i, n in enumerate(names)}


def plot_hres(run, out_dir, formats, step=None):
    """Heatmaps of every connection's token-averaged H_res and of the composite, with their values when n <= 4."""
    e = pick_eval(run, step)
    if not e or not e.get("hres"):
        return []
    rows, cols, where = connection_grid(list(e["hres"]))
    comp = e.get("hres_composite")
    panels = [(where[name], name, m) for name, m in e["hres"].items()]
    panels += [((0, cols), "composite", comp)] if comp is not None else []
    mats = [np.array(m, dtype=float) for _, _, m in panels]
    allv = np.concatenate([m.ravel() for m in mats])
    if allv.min() < -1e-6:  # HC: unconstrained, signed entries
        vmax = float(np.abs(allv).max())
        cmap, vmin = "RdBu_r", -vmax
    else:
        cmap, vmin, vmax = "viridis", 0.0, max(1.0, float(allv.max()))
    width = cols + (comp is not None)
    fig, axes = plt.subplots(rows, width, figsize=(1.35 * width + 1.0, 1.45 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ((row, col), title, _), m in zip(panels, mats):
        ax = axes[row, col]
        ax.axis("on")
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set(xticks=[], yticks=[])
        ax.set_title(title, fontsize=8)
        if len(m) <= 4:
            for (i, j), v in np.ndenumerate(m):
                r, g, b, _ = im.cmap(im.norm(v))
                light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5  # text in the contrasting colour
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5, color="black" if light else "white")
    fig.suptitle(f"{run['label']}: token-averaged H_res (rows = outputs) at step {e['step']:,} "
                 f"({fmt_tokens(e['tokens'])} tokens)", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", run["label"]).strip("_")
    return save(fig, out_dir, f"hres_{slug}", formats)


def depth_profile(e):
    """From an eval record -> per-connection names and arrays of Amax gains, DS errors, and the
    gains of the composite product up to each depth (of the token-averaged matrices)."""
    names = list(e["hres"])
    diag = e.get("diag") or {}
    H = [np.array(e["hres"][n], dtype=float) for n in names]

    def gains(m):
        a = np.abs(m)
        return a.sum(1).max(), a.sum(0).max()

    prof = {"names": names, "fwd": [], "bwd": [], "ds_err": [], "comp_fwd": [], "comp_bwd": []}
    P = np.eye(H[0].shape[0])
    for n, m in zip(names, H):
        P = m @ P  # later connections act on the left
        f, b = gains(m)
        prof["fwd"].append(diag.get(f"{n}/amax_fwd", f))
        prof["bwd"].append(diag.get(f"{n}/amax_bwd", b))
        row, col = diag.get(f"{n}/ds_row_err"), diag.get(f"{n}/ds_col_err")
        if row is None or col is None:  # not logged: from the token-averaged matrix
            row, col = np.abs(m.sum(1) - 1).max(), np.abs(m.sum(0) - 1).max()
        prof["ds_err"].append(max(row, col))
        cf, cb = gains(P)
        prof["comp_fwd"].append(cf)
        prof["comp_bwd"].append(cb)
    prof["exact_comp"] = (diag.get("composite/amax_fwd"), diag.get("composite/amax_bwd"))
    return prof


def plot_depth(runs, out_dir, formats, step=None):
    runs = [(r, pick_eval(r, step)) for r in runs]
    runs = [(r, e) for r, e in runs if e and e.get("hres")]
    if not runs:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    floor = 1e-9
    for i, (run, e) in enumerate(runs):
        color = run.get("color", f"C{i % 10}")
        p = depth_profile(e)
        d = np.arange(1, len(p["names"]) + 1)
        for ax, key, exact in zip(axes, ("fwd", "bwd"), p["exact_comp"]):
            # single connections on top, with markers: for a doubly-stochastic H_res both lines sit at 1
            ax.plot(d, p[f"comp_{key}"], "-", color=color, lw=3.0, alpha=0.45, zorder=2, label=run["label"])
            ax.plot(d, p[key], "--", color=color, lw=1, marker="o", ms=3.5, mfc="white", zorder=3)
            if exact is not None:
                ax.plot([d[-1]], [exact], "*", color=color, ms=11, mec="black", mew=0.5)
        axes[2].plot(d, np.maximum(p["ds_err"], floor), "o-", color=color, ms=3, lw=1.4, label=run["label"])
    titles = ("Amax gain, forward (max |row sum|)", "Amax gain, backward (max |column sum|)",
              "doubly-stochastic error of H_res")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("connection depth (2 per layer: attention, MLP)")
        ax.grid(alpha=0.3, which="both")
    gains = [v for line in axes[0].lines + axes[1].lines for v in line.get_ydata() if np.isfinite(v) and v > 0]
    for ax in axes[:2]:
        if gains and max(gains) / min(gains) > 10:  # HC-style blow-up: a log axis
            ax.set_yscale("log")
        elif gains:  # near 1 (doubly stochastic): linear, at least 0.95 to 1.05 so float noise stays flat
            ax.set_ylim(min(0.95, 0.98 * min(gains)), max(1.05, 1.02 * max(gains)))
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.plot([], [], "k--", lw=1, marker="o", ms=3.5, mfc="white", label="single connection")
        ax.plot([], [], "k-", lw=3.0, alpha=0.45, label="composite up to depth")
        ax.plot([], [], "k*", ms=9, lw=0, label="composite, exact (logged)")
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_ylabel(f"max(|row sum - 1|, |col sum - 1|), floored at {floor:g}")
    axes[2].legend(fontsize=7)
    steps = sorted({e["step"] for _, e in runs})
    fig.suptitle(f"H_res through depth at step {', '.join(f'{s:,}' for s in steps)}", fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, "depth", formats)


# -----------------------------------------------------------------------------
# the table

def results_rows(runs):
    rows = []
    for run in runs:
        cfg = run["config"]
        last = next((e for e in reversed(run["eval"]) if e.get("val_loss") is not None), {})
        tps = [r["tok_per_s"] for r in run["train"][1:] if r.get("tok_per_s")]  # the first includes warm-up
        hs = run["hellaswag"] or last
        hs_acc, hs_n = hs.get("acc_norm", hs.get("hellaswag_acc_norm")), hs.get("n", hs.get("hellaswag_n"))
        core = run["core"] or {}
        try:
            extra = extra_params(cfg)
        except Exception:  # a config this hc.py cannot build
            extra = None
        rows.append({
            "run": run["label"], "scheme": cfg.get("scheme"), "n": cfg.get("n_streams"),
            "params": cfg.get("num_params"), "extra_params": extra, "tokens": last.get("tokens"),
            "val_loss": last.get("val_loss"), "val_bpb": last.get("val_bpb"), "hellaswag": hs_acc,
            "hellaswag_n": hs_n, "core": core.get("core"), "core_complete": core.get("complete"),
            "tok_per_s": statistics.median(tps) if tps else None,
        })
    return rows


HELLASWAG_ITEMS = 10042  # the validation split (evals.hellaswag.NUM_ITEMS["val"])


def hellaswag_subset(row):
    """A HellaSwag score over fewer items than the validation set (a limit, a test fixture), or an unknown number."""
    return row["hellaswag"] is not None and row["hellaswag_n"] != HELLASWAG_ITEMS


def markdown_table(rows):
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| run | scheme | n | tokens | val loss | val BPB | HellaSwag acc_norm | CORE | tok/s | params | extra params |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = f"{r['hellaswag_n']:,}" if r["hellaswag_n"] else "?"
        hs = f(r["hellaswag"], ".4f") + (f" ({n})" if hellaswag_subset(r) else "")
        core = f(r["core"], ".4f") + ("*" if r["core"] is not None and not r["core_complete"] else "")
        params = "–" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
        extra = "–" if r["extra_params"] is None else f"{r['extra_params']:,}"
        tokens = "–" if r["tokens"] is None else fmt_tokens(r["tokens"])
        lines.append(f"| {r['run']} | {r['scheme'] or '–'} | {r['n'] or '–'} | {tokens} | {f(r['val_loss'], '.4f')} | "
                     f"{f(r['val_bpb'], '.4f')} | {hs} | {core} | {f(r['tok_per_s'], ',.0f')} | {params} | {extra} |")
    notes = []
    if any(hellaswag_subset(r) for r in rows):
        notes.append(f"HellaSwag (N): scored on N items, not the full {HELLASWAG_ITEMS:,}-item validation set, so not "
                     f"comparable to HellaSwag; (?): a log that did not record how many.")
    if any(r["core"] is not None and not r["core_complete"] for r in rows):
        notes.append("CORE*: not all 22 tasks in full (a subset or --max-per-task), so not comparable to CORE.")
    notes.append("tok/s: median training throughput; val loss in nats/token; extra params: the residual "
                 "connections' parameters (0 for plain).")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{n}  " for n in notes) + "\n"


# -----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (train.py out_dir) or their log.jsonl files")
    ap.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: scheme and n)")
    ap.add_argument("--out-dir", default="plots")
    ap.add_argument("--formats", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"])
    ap.add_argument("--step", type=int, default=None, help="eval step for the H_res figures (default: the last)")
    ap.add_argument("--groups", action="store_true",
                    help="curves: one per setting (its seeds' mean and 95%% interval band) instead of one per run")
    ap.add_argument("--smooth", type=float, default=None,
                    help="EMA factor in [0, 1) for the train loss (0: none; default: a window of 1/25 of the "
                         "points, none for 25 points or fewer)")
    args = ap.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        ap.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    if args.smooth is not None and not 0 <= args.smooth < 1:
        ap.error(f"argument --smooth: must be in [0, 1) (0: no smoothing), got {args.smooth}")
    return run_cli(lambda: _main(args), "plot_runs.py")


def _main(args):
    paths = args.runs if args.labels else rundir.run_dirs(args.runs, "plot_runs.py")  # labels: one per path
    runs = [read_run(p, label) for p, label in zip(paths, args.labels or [None] * len(paths))]
    unique_labels(runs)
    for i, run in enumerate(runs):
        run["color"] = f"C{i % 10}"  # the same colour for a run in every figure
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = (plot_group_curves(group_runs(runs), out, args.formats, args.smooth) if args.groups
               else plot_curves(runs, out, args.formats, args.smooth))
    for run in runs:
        written += plot_hres(run, out, args.formats, args.step)
    written += plot_depth(runs, out, args.formats, args.step)
    table = markdown_table(results_rows(runs))
    (out / "results.md").write_text(table)
    written.append(out / "results.md")
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
