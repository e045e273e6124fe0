"""The module layout: dependencies point one way (scripts/import_graph.py)."""

from scripts import import_graph


def test_no_import_cycle_and_the_library_imports_no_script():
    g = import_graph.graph()
    assert {"train", "model", "hc", "hc_kernels", "hc_verify", "evals", "rundir", "common"} <= set(g)
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
