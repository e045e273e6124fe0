"""scripts/compare.py and setting.py: the statistics against values computed here from known numbers,
the grouping rules, and the refusals. The runs are log.jsonl files written by hand (no training)."""

import json
import math

import pytest
from scipy import stats

import config
import setting
from scripts import compare


def write_run(root, name, scheme="plain", seed=0, data_seed=None, val_loss=None, max_iters=100, last_step=None,
              records=(), **keys):
    """A run directory whose log holds a config header and evals at 0 and last_step (default max_iters)."""
    out = root / name
    out.mkdir()
    header = {"type": "config", **config.DEFAULTS, "scheme": scheme, "n_streams": 1 if scheme == "plain" else 4,
              "seed": seed, "data_seed": seed if data_seed is None else data_seed, "max_iters": max_iters,
              "out_dir": str(out), "wandb_run_name": name, "config_name": "tiny", "data_id": "d0", "tokenizer": "gpt2",
              "git_commit": "abc", **keys}
    last = max_iters if last_step is None else last_step
    lines = [header, {"type": "eval", "step": 0, "tokens": 0, "val_loss": 10.0, "val_bpb": 14.0},
             {"type": "train", "step": last, "tokens": last * 128, "loss": 1.0},
             {"type": "eval", "step": last, "tokens": last * 128, "val_loss": val_loss,
              "val_bpb": None if val_loss is None else val_loss * 1.5}, *records]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(out)


PLAIN = [3.00, 3.10, 2.95]
KROMHC = [2.90, 3.02, 2.88]  # differences -0.10, -0.08, -0.07: consistent
HC = [3.05, 3.00, 2.99]      # differences +0.05, -0.10, +0.04: not resolved at n = 3
SPREAD = {"plain": 1, "hc": 2, "kromhc": 3}  # of HellaSwag acc_norm over the seeds


@pytest.fixture
def sweep(tmp_path):
    runs = []
    for scheme, vals in (("plain", PLAIN), ("kromhc", KROMHC), ("hc", HC)):
        for seed, v in enumerate(vals):
            acc = {"plain": 0.30, "kromhc": 0.31, "hc": 0.28}[scheme] + [0.0, 0.004, 0.001][seed] * SPREAD[scheme]
            runs.append(write_run(tmp_path, f"{scheme}-s{seed}", scheme, seed, data_seed=0, val_loss=v,
                                  records=[{"type": "final", "step": 100, "tokens": 12800, "hellaswag_acc_norm": acc},
                                           {"type": "lm_eval", "step": 100, "tokens": 12800,
                                            "tasks": {"arc_easy": acc + 0.2}}]))
    return runs


def sample_stats(xs):
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, std


def test_group_statistics_and_paired_differences(sweep):
    res = compare.compare(sweep, config.KEYS, baseline=["scheme=plain"])
    groups = {g["label"]: g for g in res["groups"]}
    assert sorted(groups) == ["hc n=4", "kromhc n=4", "plain n=1"] and groups["plain n=1"]["baseline"]
    t = 4.302652729911275  # t_{0.975, 2}, from a table: the interval's quantile is Student's, not normal's 1.96
    assert stats.t.ppf(0.975, 2) == pytest.approx(t)
    for label, vals in (("plain n=1", PLAIN), ("kromhc n=4", KROMHC), ("hc n=4", HC)):
        s = groups[label]["metrics"]["val_loss"]
        mean, std = sample_stats(vals)
        assert (s["n"], s["step"]) == (3, 100)
        assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
        assert s["ci"] == pytest.approx([mean - t * std / math.sqrt(3), mean + t * std / math.sqrt(3)])
        assert groups[label]["metrics"]["val_bpb"]["mean"] == pytest.approx(1.5 * mean)
    for label, vals, verdict in (("kromhc n=4", KROMHC, "better"), ("hc n=4", HC, "not resolved at n = 3")):
        d = [a - b for a, b in zip(vals, PLAIN)]
        mean, std = sample_stats(d)
        t_stat = mean / (std / math.sqrt(3))
        v = groups[label]["metrics"]["val_loss"]["vs_baseline"]
        assert v["n_pairs"] == 3 and v["diff"] == pytest.approx(d)
        assert v["mean"] == pytest.approx(mean) and v["std"] == pytest.approx(std)
        assert v["ci"] == pytest.approx([mean - t * std / math.sqrt(3), mean + t * std / math.sqrt(3)])
        assert v["p"] == pytest.approx(2 * stats.t.sf(abs(t_stat), 2))
        assert v["verdict"] == verdict
    # the paired interval is far tighter than the unpaired one: the seeds' shared part cancels
    kv = groups["kromhc n=4"]["metrics"]["val_loss"]
    assert kv["vs_baseline"]["ci"][1] < 0 < kv["ci"][1] - groups["plain n=1"]["metrics"]["val_loss"]["ci"][0]
    assert kv["vs_baseline"]["p"] < 0.05


def test_later_metrics_by_name_and_their_direction(sweep):
    res = compare.compare(sweep, config.KEYS, metrics=["final/hellaswag_acc_norm", "tasks/arc_easy"],
                          baseline=["plain n=1"], higher=["tasks/arc_easy"])
    groups = {g["label"]: g for g in res["groups"]}
    hs = groups["hc n=4"]["metrics"]["hellaswag_acc_norm"]  # read from the "final" record
    assert hs["direction"] == "higher" and hs["mean"] == pytest.approx(0.28 + 0.010 / 3)
    assert hs["vs_baseline"]["diff"] == pytest.approx([-0.02, -0.016, -0.019])
    assert hs["vs_baseline"]["verdict"] == "worse"  # lower accuracy in every pair
    arc = groups["kromhc n=4"]["metrics"]["tasks/arc_easy"]  # a nested number of another record type
    assert arc["mean"] == pytest.approx(0.51 + 0.005) and arc["direction"] == "higher"
    assert arc["vs_baseline"]["verdict"] == "better"
    assert compare.direction("tasks/arc_easy") is None and compare.direction("val_bpb") == "lower"
    assert compare.direction("core") == "higher" and compare.direction("grad_norm") is None
    assert compare.verdict({"n_pairs": 3, "ci": [-0.3, -0.1], "p": 0.01, "mean": -0.2}, "higher", 0.95) == "worse"
    assert compare.verdict({"n_pairs": 3, "ci": [0.1, 0.3], "p": 0.01, "mean": 0.2}, None, 0.95) == "higher"


def test_grouping_rules(tmp_path):
    base = dict(val_loss=3.0)
    runs = [write_run(tmp_path, "a", seed=0, **base),
            # other seeds, out_dir, run name, eval and log cadence, wandb and checkpoint keys: the same setting
            write_run(tmp_path, "b", seed=1, data_seed=5, eval_interval=7, log_interval=3, wandb_log=True,
                      wandb_group="x", checkpoint=False, data_dir="/elsewhere", **base),
            write_run(tmp_path, "c", seed=2, learning_rate=1e-3, **base),        # another setting
            write_run(tmp_path, "d", seed=3, learning_rate=1e-3, **base)]
    groups = compare.group_runs([compare.load_run(r, config.KEYS) for r in runs])
    assert [[r["dir"] for r in g["runs"]] for g in groups] == [runs[:2], runs[2:]]
    assert [g["label"] for g in groups] == ["learning_rate=0.0006", "learning_rate=0.001"]
    name = groups[0]["name"]
    assert name.startswith("tiny-plain-n1-") and len(name.split("-")[-1]) == 8
    # 1 and 1.0 are one value (a config file may write either); a key older logs lack counts at its default
    items = setting.setting({**config.DEFAULTS, "max_iters": 100, "config_name": "c"}, config.KEYS)
    again = setting.setting({**config.DEFAULTS, "max_iters": 100.0, "config_name": "c"}, config.KEYS)
    old = {k: v for k, v in config.DEFAULTS.items() if k != "res_logit_init"}
    assert setting.setting_name(items) == setting.setting_name(again)
    assert setting.setting(old, config.KEYS) == setting.setting(config.DEFAULTS, config.KEYS)
    assert setting.changed_keys(items, {**items, "scheme": "hc", "data_id": "z"}) == ["data_id", "scheme"]
    # every key's declaration says whether it is part of a setting: True, or why not
    assert all(k.setting is True or (isinstance(k.setting, str) and k.setting) for k in config.KEYS.values())
    assert [setting.run_name("q", "hc", 4, 1, d) for d in (1, 0)] == ["q-hc-n4-s1", "q-hc-n4-s1-d0"]
    assert setting.run_name("q", "hc", 4, 0, 0, ["n_layer=2"], always_data_seed=True) == "q-hc-n4-n_layer=2-s0-d0"


def test_refusals(tmp_path):
    ok = [write_run(tmp_path, f"p{s}", seed=s, val_loss=3.0 + 0.01 * s) for s in range(2)]
    running = write_run(tmp_path, "running", "hc", seed=0, val_loss=2.9, last_step=50)
    with pytest.raises(compare.CompareError, match="running is unfinished: its last eval is at step 50 of max_iters "
                                                   "100.*--resume.*--step"):
        compare.compare(ok + [running], config.KEYS)
    res = compare.compare(ok + [running], config.KEYS, step=0)  # a step every run reached: fine
    assert res["groups"][1]["metrics"]["val_loss"]["vs_baseline"]["n_pairs"] == 1
    with pytest.raises(compare.CompareError, match="has no val_loss at step 50.*steps \\[0, 100\\]"):
        compare.compare(ok + [running], config.KEYS, step=50)
    other = write_run(tmp_path, "other", "hc", seed=0, val_loss=2.9, dataset="fwe", data_id="d1")
    with pytest.raises(compare.CompareError, match="different data or tokenizers.*'fwe'"):
        compare.compare(ok + [other], config.KEYS)
    tok = write_run(tmp_path, "tok", "hc", seed=0, val_loss=2.9, tokenizer="llama")
    with pytest.raises(compare.CompareError, match="different data or tokenizers.*llama"):
        compare.compare(ok + [tok], config.KEYS)
    twin = write_run(tmp_path, "twin", seed=0, val_loss=3.5)
    with pytest.raises(compare.CompareError, match="same seed \\(0, data_seed 0\\).*pass one of them"):
        compare.compare(ok + [twin], config.KEYS)
    bad = write_run(tmp_path, "bad", "mhc", seed=0, val_loss=2.9, last_step=40,
                    records=[{"type": "error", "step": 41, "tokens": 41 * 128, "message": "nan"}])
    with pytest.raises(compare.CompareError, match="bad diverged at step 41 \\(its log's error record\\); leave it "
                                                   "out.*earlier --step \\(its last finite val_loss is at step 40\\)"):
        compare.compare(ok + [bad], config.KEYS)
    with pytest.raises(compare.CompareError, match="bad diverged at step 41"):  # a step past it: not "missing"
        compare.compare(ok + [bad], config.KEYS, step=100)
    with pytest.raises(compare.CompareError, match="no hellaswag_acc_norm at step 100"):
        compare.compare(ok, config.KEYS, metrics=["hellaswag_acc_norm"])
    with pytest.raises(compare.CompareError, match="--baseline scheme=mhc matches 0 groups"):
        compare.compare(ok, config.KEYS, baseline=["scheme=mhc"])
    # n = 1 and a seed without a partner: said, not hidden
    lone = write_run(tmp_path, "lone", "hc", seed=7, val_loss=2.9)
    res = compare.compare(ok + [lone], config.KEYS)
    hc = res["groups"][1]["metrics"]["val_loss"]
    assert hc["n"] == 1 and hc["std"] is None and hc["ci"] is None
    assert hc["vs_baseline"]["verdict"] == "no common seeds"
    assert any("(7, 7)" in w and "no partner" in w for w in res["warnings"])
    assert "n = 1: none" in compare.text_table(res)


def test_a_nonfinite_value_is_a_divergence(tmp_path, capsys):
    """A NaN or inf val loss (json writes NaN, Infinity) is refused as a diverged run, like an unfinished one,
    not reported as missing; at an earlier step the run is compared."""
    ok = [write_run(tmp_path, f"p{s}", seed=s, val_loss=3.0 + 0.01 * s) for s in range(2)]
    nan = write_run(tmp_path, "nan", "hc", seed=0, val_loss=float("nan"))
    inf = write_run(tmp_path, "inf", "hc", seed=1, val_loss=float("inf"))
    assert "NaN" in (tmp_path / "nan" / "log.jsonl").read_text()  # what json.dumps writes for a NaN loss
    for run, value in ((nan, "nan"), (inf, "inf")):
        with pytest.raises(compare.CompareError, match=f"{run} diverged at step 100 \\(its val_loss is {value}, not "
                                                       f"finite\\); leave it out.*its last finite val_loss is at step 0"):
            compare.compare(ok + [run], config.KEYS)
    with pytest.raises(compare.CompareError, match="nan diverged at step 100 \\(its val_bpb is nan"):
        compare.compare(ok + [nan], config.KEYS, metrics=["val_bpb"], step=100)
    with pytest.raises(SystemExit) as e:  # --json: nothing on stdout, the refusal in one line on stderr
        compare.main([*ok, nan, "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and out == "" and err.count("\n") == 1 and "diverged at step 100" in err
    assert compare.main([*ok, nan, inf, "--json", "--step", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [g["metrics"]["val_loss"]["values"] for g in res["groups"]] == [[10.0, 10.0], [10.0, 10.0]]


def test_json_stays_json_when_a_log_was_cut_by_a_crash(sweep, capsys):
    """The note on the dropped line goes to stderr: stdout is one JSON object."""
    with open(f"{sweep[0]}/log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 10')  # a crash mid-write: no closing brace, no newline
    assert compare.main([*sweep, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["metrics"] == ["val_loss", "val_bpb"]
    assert "dropping its last line, cut by a crash" in err and "cut by a crash" not in out


def test_cli_tables_and_json(sweep, capsys):
    assert compare.main([*sweep, "--baseline", "scheme=plain", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**val_loss at step 100, lower is better**\n\n"
                          "| group | n | mean | std | 95% CI | Δ vs baseline")
    row = next(line for line in out.splitlines() if "kromhc" in line)  # val_loss's table comes first
    assert row.startswith("| kromhc n=4 | 3 | 2.9333 |") and row.endswith("| 0.011 | better |")
    assert compare.main([*sweep, "--json", "--metric", "val_bpb"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"] == ["val_bpb"] and len(res["groups"]) == 3 and res["groups"][0]["label"] == "plain n=1"
    with pytest.raises(SystemExit) as e:  # common.run_cli: one line, exit status 1
        compare.main([sweep[0], "--step", "3"])
    assert e.value.code == 1 and "compare.py: error: " in capsys.readouterr().err


def test_paths_that_are_not_runs_are_left_out_with_a_note(sweep, tmp_path, capsys):
    """`compare.py out/x/*` also matches the wandb/ folder of the wandb recipe: a note, not a failure."""
    from scripts import plot_runs
    (tmp_path / "wandb").mkdir()
    (tmp_path / "notes.txt").write_text("")
    paths = [*sweep, str(tmp_path / "wandb"), str(tmp_path / "notes.txt")]
    assert compare.main(paths) == 0
    err = capsys.readouterr().err
    assert f"compare.py: note: skipping {tmp_path / 'wandb'}: not a run directory (no log.jsonl)" in err
    assert err.count("note: skipping") == 2
    plot_runs.main([*paths, "--out-dir", str(tmp_path / "plots"), "--formats", "png"])
    assert capsys.readouterr().err.count("plot_runs.py: note: skipping") == 2
    with pytest.raises(SystemExit) as e:  # nothing left: one line
        compare.main(paths[-2:])
    assert e.value.code == 1
    assert "compare.py: error: none of the 2 path(s) is a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_runs.main(paths[-2:] + ["--out-dir", str(tmp_path / "plots")])
    assert "plot_runs.py: error: none of the 2 path(s) is a run directory" in capsys.readouterr().err


def test_plot_runs_groups_draws_each_setting_as_a_mean_with_a_band(sweep, tmp_path):
    from scripts import plot_runs
    groups = plot_runs.group_runs([plot_runs.read_run(p) for p in sweep])
    assert [(g["label"], len(g["runs"])) for g in groups] == [("plain n=1 (3 seeds)", 3), ("kromhc n=4 (3 seeds)", 3),
                                                              ("hc n=4 (3 seeds)", 3)]
    # at the x every seed has: the mean and its t interval; one seed: the line alone
    xs, mean, lo, hi = plot_runs.mean_band([([0, 1, 2], [1.0, 2.0, 3.0]), ([0, 2], [3.0, 5.0])])
    half = stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2)  # std of (1, 3) and of (3, 5) is sqrt(2)
    assert xs == [0, 2] and mean == [2.0, 4.0]
    assert lo == pytest.approx([2.0 - half, 4.0 - half]) and hi == pytest.approx([2.0 + half, 4.0 + half])
    assert plot_runs.mean_band([([0, 5], [1.0, 2.0])]) == ([0, 5], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
    written = plot_runs.main([*sweep, "--groups", "--out-dir", str(tmp_path / "plots"), "--formats", "png"])
    assert tmp_path / "plots" / "curves.png" in written and (tmp_path / "plots" / "curves.png").stat().st_size > 0


def test_plot_runs_groups_show_step_0_and_zoom_on_the_end(sweep, monkeypatch):
    """The val panels hold every point, step 0's val loss of 10 included (the x-axis starts at 0); an inset
    zooms on the end, where the groups' bands (means 2.9 to 3.1) are told apart; no two groups share a line."""
    from scripts import plot_runs
    figs = []
    monkeypatch.setattr(plot_runs, "save", lambda fig, *a: figs.append(fig) or [])
    plot_runs.plot_group_curves(plot_runs.group_runs([plot_runs.read_run(p) for p in sweep]), "unused", ["png"])
    val = next(ax for ax in figs[0].axes if ax.get_title().startswith("val loss"))
    lo, hi = val.get_ylim()
    assert hi > 10.0 and lo < 2.9  # step 0 and the end both in view
    inset, = val.child_axes
    assert inset.get_xlim()[0] > 0 and 2.7 < inset.get_ylim()[0] < inset.get_ylim()[1] < 3.5
    lines = [line for line in val.lines if line.get_label() and not line.get_label().startswith("_")]
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == len(lines) == 3


def test_plot_runs_groups_with_hellaswag_at_eval_time(sweep, monkeypatch):
    """Evals that log hellaswag_acc_norm add an accuracy panel: its groups' means, and no inset (accuracies)."""
    from scripts import plot_runs
    figs = []
    monkeypatch.setattr(plot_runs, "save", lambda fig, *a: figs.append(fig) or [])
    runs = [plot_runs.read_run(p) for p in sweep]
    for run in runs:
        for e in run["eval"]:
            e["hellaswag_acc_norm"] = 0.25 + e["step"] / 1000
    plot_runs.plot_group_curves(plot_runs.group_runs(runs), "unused", ["png"])
    acc = next(ax for ax in figs[0].axes if ax.get_title().startswith("HellaSwag acc_norm"))
    # the mean of 3 equal float64 values: a few ulp off; approx's default 1e-6 is far below a wrong value
    assert not acc.child_axes and list(acc.lines[0].get_ydata()) == pytest.approx([0.25, 0.35])
