"""The module layout: dependencies point one way (scripts/import_graph.py); training on CPU needs no Triton."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_args
from scripts import import_graph

REPO = Path(__file__).resolve().parents[1]


def test_no_import_cycle_and_the_library_imports_no_script():
    g = import_graph.graph()
    assert {"train", "model", "hc", "hc_kernels", "hc_verify", "rundir", "common"} <= set(g)
    evals = {"evals", "evals.val", "evals.hellaswag", "evals.core", "evals.harness", "evals.stories", "evals.results",
             "evals.training"}
    assert evals <= set(g)
    # the evaluations read no config and no run directory; the package's __init__ imports none of its modules
    assert not {d for m in evals for d in g[m]} & {"configurator", "train", "rundir"}
    assert not [d for d in g["evals"] if d.startswith("evals.")]
    assert import_graph.cycles(g) == []
    assert import_graph.library_imports_of_scripts(g) == []
    # the reference path never imports its safety net; the check depends on what it checks
    assert "hc_verify" not in g["hc"] and {"hc", "hc_kernels"} <= set(g["hc_verify"])
    assert not any(d.startswith("scripts.") for d in g["train"])


def test_the_checks_see_a_cycle_and_a_lazy_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("from scripts import tool\nimport a\n")
    for pkg in ("data", "scripts"):
        (tmp_path / pkg).mkdir()
    (tmp_path / "scripts" / "tool.py").write_text("import sibling\n")
    (tmp_path / "scripts" / "sibling.py").write_text("")
    g = import_graph.graph(tmp_path)
    assert g == {"a": ["b"], "b": ["c"], "c": ["a", "scripts.tool"], "scripts.sibling": [],
                 "scripts.tool": ["scripts.sibling"]}
    assert import_graph.cycles(g) == [["a", "b", "c"]]
    assert import_graph.library_imports_of_scripts(g) == [("c", "scripts.tool")]


def test_the_scripts_and_cpu_training_need_no_triton(data_dir, tmp_path):
    """Triton (1 GB) is a test dependency: on CUDA torch brings its own, and the CPU path never imports it. With
    it unimportable every script imports and train.py trains an n-stream model on CPU; lm-eval, which
    scripts/eval_lm.py needs, is a user requirement."""
    code = ("import importlib, pkgutil, sys\nsys.modules['triton'] = None  # import triton: ImportError\n"
            "for m in pkgutil.iter_modules(['scripts']):\n    importlib.import_module('scripts.' + m.name)\n"
            "import train\ntrain.main(sys.argv[1:])\n")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", code, *tiny_args(data_dir, out, "--scheme=kromhc", "--max_iters=2")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["fused_path"] == "torch" and [r["step"] for r in log if r["type"] == "eval"] == [0, 2]

    def requirements(name):
        lines = (REPO / name).read_text().splitlines()
        return {line.split("#")[0].split(";")[0].strip() for line in lines} - {""}
    assert "lm-eval==0.4.13" in requirements("requirements.txt")
    assert not any(r.startswith("triton") for r in requirements("requirements.txt"))
    assert any(r.startswith("triton") for r in requirements("requirements-test.txt"))
