"""
The import graph of hcgpt's own modules: who imports whom, and any cycle.

    python scripts/import_graph.py            # one line per module: what of the project it imports
    python scripts/import_graph.py --dot      # the same as a Graphviz digraph

Every import counts, also one inside a function (a lazy import still ties two modules together).
The rules it checks (exit status 1 where one is broken), tests/ not being part of the graph:
- no cycle among the modules;
- the library (every module outside scripts/) imports no script, and nothing imports train.py;
- only train.py and the scripts import the config loader (configurator.py), and the evaluations
  (evals/) import no config at all;
- no library function takes the whole config: a parameter named `cfg` (the flat dict of every key)
  is left to train.py, the scripts and config.py, which turns it into the owners' dataclasses.
"""

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "evals", "scripts")
CONFIG = ("config", "configurator", "train")   # what a module imports to see the whole config


def project_modules(repo=REPO):
    """{module name: path} for the top-level files, the modules of PACKAGES and each __init__.py with code."""
    mods = {p.stem: p for p in repo.glob("*.py")}
    for pkg in PACKAGES:
        mods.update({f"{pkg}.{p.stem}": p for p in (repo / pkg).glob("*.py") if p.stem != "__init__"})
        mods.update({pkg: p for p in (repo / pkg).glob("__init__.py") if p.read_text().strip()})
    return mods


def imports_of(name, path, mods):
    """The project modules that the file at path imports, anywhere in it."""
    found = set()
    here = name.split(".")[0] if "." in name else None
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from data import shards`
        else:
            continue
        for n in names:
            # a script may import a sibling by its bare name (scripts/ is on its sys.path)
            for candidate in (n, f"{here}.{n}" if here else None):
                if candidate in mods and candidate != name:
                    found.add(candidate)
    return found


def graph(repo=REPO):
    mods = project_modules(repo)
    return {name: sorted(imports_of(name, path, mods)) for name, path in sorted(mods.items())}


def cycles(g):
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def library_imports_of_scripts(g):
    """(library module, script) pairs: the library must not depend on a command line."""
    return [(m, d) for m, deps in g.items() if not m.startswith("scripts.") for d in deps if d.startswith("scripts.")]


def config_breaks(g, repo=REPO):
    """What breaks the config's layering: imports of train.py, of the loader outside train.py and the scripts,
    of any config by an evaluation, and library functions that take the whole config (a parameter `cfg`)."""
    bad = [f"{m} imports train.py (a script runs train.py, it does not import it)" for m, deps in g.items()
           if "train" in deps]
    bad += [f"{m} imports the config loader (only train.py and the scripts do)" for m, deps in g.items()
            if "configurator" in deps and m != "train" and not m.startswith("scripts.")]
    bad += [f"{m} imports {d}: an evaluation takes the values it uses" for m, deps in g.items()
            if m.startswith("evals.") for d in deps if d in CONFIG]
    for name, path in project_modules(repo).items():
        if name in ("train", "config") or name.startswith("scripts."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    "cfg" in [a.arg for a in node.args.args + node.args.kwonlyargs]:
                bad.append(f"{path.relative_to(repo)}:{node.lineno}: {node.name}() takes the whole config (cfg); "
                           f"pass the values it uses, or their owner's dataclass")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dot", action="store_true", help="print a Graphviz digraph")
    args = ap.parse_args(argv)
    g = graph()
    if args.dot:
        print("digraph hcgpt {")
        for m, deps in g.items():
            print("".join(f'  "{m}" -> "{d}";\n' for d in deps), end="")
        print("}")
    else:
        for m, deps in g.items():
            print(f"{m:24} -> {', '.join(deps) or '-'}")
    bad = [f"cycle: {' <-> '.join(c)}" for c in cycles(g)]
    bad += [f"{m} imports the script {d}" for m, d in library_imports_of_scripts(g)]
    bad += config_breaks(g)
    for line in bad:
        print(f"import_graph: {line}", file=sys.stderr)
    print(f"{len(g)} modules, {sum(len(d) for d in g.values())} imports, "
          f"{'no cycle, the library imports no script, the config layered' if not bad else f'{len(bad)} problem(s)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
