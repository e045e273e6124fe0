"""scripts/plot_runs.py and scripts/sample.py on tiny train.py runs made here (kromhc, hc and
plain on a tiny pydocs dataset), with HellaSwag and CORE results from the evaluation CLIs on
the same checkpoints feeding the results table."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
import checkpoint  # noqa: E402
from scripts import eval_core, eval_hellaswag, plot_runs, sample  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
SCHEMES = {"kromhc": 4, "hc": 2, "plain": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Three 6-step runs of a 2-layer model; eval (and diagnostics) at steps 0, 3, 6."""
    data = data_dir
    root = tmp_path_factory.mktemp("runs")
    for scheme, n in SCHEMES.items():
        train.main([f"--data_dir={data}", f"--out_dir={root / scheme}", "--device=cpu", "--compile=False",
                    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                    "--total_batch_tokens=128", "--eval_tokens=512", "--eval_interval=3", "--log_interval=1",
                    "--warmup_iters=2", "--learning_rate=1e-2", "--max_iters=6", "--diag_batch_size=2",
                    f"--scheme={scheme}", f"--n_streams={n}"])
    return {scheme: root / scheme for scheme in SCHEMES}


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def table_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {r[0]: dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


# ----------------------------------------------------------------------------- plot_runs

def test_plot_runs_end_to_end(runs, tmp_path):
    kromhc = runs["kromhc"]
    eval_hellaswag.main(["--ckpt", str(kromhc), "--data-file", str(FIXTURES / "hellaswag" / "hellaswag_val_sample.jsonl"),
                         "--device", "cpu"])
    eval_core.main(["--ckpt", str(kromhc), "--bundle-dir", str(FIXTURES / "core" / "eval_bundle"), "--device", "cpu"])
    out = tmp_path / "plots"
    written = plot_runs.main([str(runs[s]) for s in SCHEMES] + ["--out-dir", str(out), "--formats", "png", "svg"])
    names = sorted(p.name for p in written)
    assert names == sorted(["curves.png", "curves.svg", "depth.png", "depth.svg", "hres_kromhc_n_4.png",
                            "hres_kromhc_n_4.svg", "hres_hc_n_2.png", "hres_hc_n_2.svg", "results.md"])
    import matplotlib.image
    for p in written:
        assert p.stat().st_size > 500, p
        if p.suffix == ".png":
            assert matplotlib.image.imread(p).ndim == 3
        if p.suffix == ".svg":
            assert "<svg" in p.read_text()[:2000]

    rows = table_rows((out / "results.md").read_text())
    assert set(rows) == {"kromhc n=4", "hc n=2", "plain"}
    for scheme, label in (("kromhc", "kromhc n=4"), ("hc", "hc n=2"), ("plain", "plain")):
        last = [r for r in read_log(runs[scheme]) if r["type"] == "eval"][-1]
        assert rows[label]["val loss"] == f"{last['val_loss']:.4f}"
        assert rows[label]["val BPB"] == f"{last['val_bpb']:.4f}"
        assert rows[label]["tokens"] == "768"
        assert rows[label]["tok/s"] != "–"
        ckpt = torch.load(runs[scheme] / "ckpt.pt", weights_only=False)
        model, _ = checkpoint.load_model(runs[scheme])
        extra = sum(p.numel() for c in model.connections() for p in c.parameters())
        assert rows[label]["extra params"] == f"{extra:,}"
        assert (extra == 0) == (scheme == "plain")
        assert ckpt["step"] == 6
    hs = json.loads((kromhc / "hellaswag.json").read_text())
    assert rows["kromhc n=4"]["HellaSwag acc_norm"] == f"{hs['acc_norm']:.4f} (7)"
    core = json.loads((kromhc / "core.json").read_text())
    assert rows["kromhc n=4"]["CORE"] == f"{core['core']:.4f}*"  # 4 toy tasks: not CORE
    assert rows["plain"]["HellaSwag acc_norm"] == "–"


def test_labels_step_and_a_run_still_writing(runs, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    text = (runs["kromhc"] / "log.jsonl").read_text()
    (partial / "log.jsonl").write_text(text + '{"type": "train", "step": 7, "tok')  # a half-written line
    out = tmp_path / "plots"
    written = plot_runs.main([str(partial), str(runs["kromhc"] / "log.jsonl"), "--labels", "A", "B",
                              "--out-dir", str(out), "--formats", "png", "--step", "3"])
    assert {p.name for p in written} == {"curves.png", "hres_A.png", "hres_B.png", "depth.png", "results.md"}
    run = plot_runs.read_run(partial)
    assert [r["step"] for r in run["train"]] == list(range(1, 7))
    assert plot_runs.pick_eval(run, 3)["step"] == 3 and plot_runs.pick_eval(run)["step"] == 6
    with pytest.raises(ValueError, match="no eval at step 4"):
        plot_runs.pick_eval(run, 4)
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        plot_runs.read_run(tmp_path / "nothing")
    # two runs with the same default label are told apart by their directory names
    a, b = plot_runs.read_run(runs["hc"]), plot_runs.read_run(runs["hc"])
    plot_runs.unique_labels([a, b])
    assert (a["label"], b["label"]) == ("hc n=2 (hc) #1", "hc n=2 (hc) #2")


def test_depth_profile_by_hand():
    """Two connections: H1 = [[1, 1], [0, 1]] (row sums 2, 1; column sums 1, 2) and a
    permutation H2; the composite up to depth 2 is H2 @ H1 = [[0, 1], [1, 1]]."""
    e = {"step": 0, "tokens": 0, "hres": {"L00.attn": [[1, 1], [0, 1]], "L00.mlp": [[0, 1], [1, 0]]},
         "hres_composite": [[0, 1], [1, 1]], "diag": {"composite/amax_fwd": 2.0, "composite/amax_bwd": 2.0}}
    p = plot_runs.depth_profile(e)
    assert p["names"] == ["L00.attn", "L00.mlp"]
    assert p["fwd"] == [2, 1] and p["bwd"] == [2, 1]
    assert p["comp_fwd"] == [2, 2] and p["comp_bwd"] == [2, 2]
    assert p["ds_err"] == [1, 0]  # |row sum - 1| of H1 is 1; a permutation is doubly stochastic
    assert p["exact_comp"] == (2.0, 2.0)
    e["hres"]["L00.attn"] = [[2, 0], [0, 0.5]]  # order matters: H2 @ H1 = [[0, .5], [2, 0]]
    p = plot_runs.depth_profile(e)
    assert p["comp_fwd"][1] == 2 and p["comp_bwd"][1] == 2 and p["ds_err"][0] == 1


def test_connection_grid():
    rows, cols, where = plot_runs.connection_grid(["L00.attn", "L00.mlp", "L01.attn", "L01.mlp"])
    assert (rows, cols) == (2, 2) and where["L01.attn"] == (0, 1) and where["L00.mlp"] == (1, 0)
    rows, cols, where = plot_runs.connection_grid([f"c{i}" for i in range(10)])
    assert (rows, cols) == (2, 8) and where["c9"] == (1, 1)


def test_extra_params_match_the_model():
    from model import GPT, GPTConfig
    for scheme, n, kron in (("mhc", 4, None), ("mhc_lite", 3, None), ("kromhc", 6, [3, 2]), ("plain", 1, None)):
        cfg = dict(n_layer=3, n_embd=32, n_head=2, scheme=scheme, n_streams=n, kron_factors=kron)
        model = GPT(GPTConfig(block_size=8, vocab_size=64, **{**cfg, "kron_factors": tuple(kron) if kron else None}))
        want = sum(p.numel() for c in model.connections() for p in c.parameters())
        assert plot_runs.extra_params({**cfg, "sinkhorn_iters": 20, "res_logit_init": -8.0, "gate_init": 0.01}) == want


# ----------------------------------------------------------------------------- sample

def test_sample(runs, capsys):
    texts = sample.main(["--ckpt", str(runs["kromhc"]), "--prompt", "The list", "--num-samples", "2",
                         "--max-new-tokens", "8", "--seed", "7", "--device", "cpu"])
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    printed = capsys.readouterr()
    assert printed.out.count("The list") == 2 and "kromhc n=4, step 6" in printed.out
    assert "sampling 2 x 8 tokens" in printed.err and "8/8" in printed.err  # the progress bar, on stderr
    # a token at a time (for the bar) draws what one generate() call draws
    model, meta = checkpoint.load_model(runs["kromhc"], "cpu")
    enc = checkpoint.load_tokenizer(meta)
    ids = torch.tensor([enc.encode_ordinary("The list")] * 2)
    torch.manual_seed(7)
    whole = model.generate(ids, 8, temperature=0.8, top_k=200)
    assert [sample.decode(enc, row[ids.size(1):].tolist()) for row in whole] == texts
    again = sample.main(["--ckpt", str(runs["kromhc"] / "ckpt.pt"), "--prompt", "The list", "--num-samples", "2",
                         "--max-new-tokens", "8", "--seed", "7", "--device", "cpu"])
    assert again == texts  # same seed, same samples
    greedy = sample.main(["--ckpt", str(runs["plain"]), "--num-samples", "2", "--max-new-tokens", "6",
                          "--temperature", "0", "--device", "cpu"])
    assert greedy[0] == greedy[1]
    prompt = runs["plain"].parent / "prompt.txt"
    prompt.write_text("import os")
    assert len(sample.main(["--ckpt", str(runs["plain"]), "--prompt", f"FILE:{prompt}", "--num-samples", "1",
                            "--max-new-tokens", "3", "--device", "cpu"])) == 1


def test_decode_drops_padded_vocabulary_ids():
    from data.tokenizer import get_encoding
    enc = get_encoding()
    assert sample.decode(enc, [31373, 50300, 995]) == "hello world"


def test_results_mark_a_hellaswag_score_over_a_subset(runs):
    """A score from a test fixture (7 items) or a limit is marked with its item count, one whose count a log did
    not record with (?); the 10,042 items of the validation set stand alone."""
    run = plot_runs.read_run(runs["plain"])
    last = run["eval"][-1]
    rows = {}
    for n in (7, None, 10042):
        last.update(hellaswag_acc_norm=0.25, hellaswag_n=n)
        rows[n] = plot_runs.markdown_table(plot_runs.results_rows([run]))
    assert "| 0.2500 (7) |" in rows[7] and "| 0.2500 (?) |" in rows[None] and "| 0.2500 |" in rows[10042]
    assert "HellaSwag (N): scored on N items" in rows[7] and "HellaSwag (N)" not in rows[10042]


def test_training_evals_record_how_many_hellaswag_items(data_dir, tmp_path):
    from conftest import read_log as log_of, tiny_args
    train.main(tiny_args(data_dir, tmp_path / "hs", "--max_iters=2", "--eval_interval=2", "--hellaswag=True",
                         f"--hellaswag_file={FIXTURES / 'hellaswag' / 'hellaswag_val_sample.jsonl'}"))
    evals = [r for r in log_of(tmp_path / "hs") if r["type"] == "eval"]
    assert [e["hellaswag_n"] for e in evals] == [7, 7]
    rows = table_rows(plot_runs.markdown_table(plot_runs.results_rows([plot_runs.read_run(tmp_path / "hs")])))
    assert rows["plain"]["HellaSwag acc_norm"] == f"{evals[-1]['hellaswag_acc_norm']:.4f} (7)"


def test_curves_panels(runs, monkeypatch):
    """Train loss, val loss, val BPB; a HellaSwag panel when eval records carry it."""
    figs = []
    monkeypatch.setattr(plot_runs, "save", lambda fig, *a: figs.append(fig) or [])
    run = plot_runs.read_run(runs["plain"])
    plot_runs.plot_curves([run], "unused", ["png"])
    assert [ax.get_title() for ax in figs[-1].axes] == ["train loss", "val loss", "val BPB"]  # 6 points: no EMA
    for e in run["eval"]:
        e["hellaswag_acc_norm"] = 0.25 + e["step"] / 100
    plot_runs.plot_curves([run], "unused", ["png"], smooth=0)
    axes = figs[-1].axes
    assert [ax.get_title() for ax in axes] == ["train loss", "val loss", "val BPB", "HellaSwag acc_norm"]
    assert list(axes[3].lines[0].get_ydata()) == [0.25, 0.28, 0.31]
    assert list(axes[1].lines[0].get_xdata()) == [e["tokens"] for e in run["eval"]]
    # two runs on the same numbers: both lines stay visible (their own dashes and hollow markers, see-through)
    plot_runs.plot_curves([run, dict(run, label="again", color="C1")], "unused", ["png"], smooth=0)
    a, b = figs[-1].axes[1].lines
    assert list(a.get_ydata()) == list(b.get_ydata())
    assert a.get_linestyle() != b.get_linestyle() and a.get_marker() != b.get_marker()
    assert a.get_markerfacecolor() == "none" and a.get_alpha() < 1
