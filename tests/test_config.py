"""Every config key declared once, beside its owner (keys.py): --help, docs/configs.md and the checks all
come from the declarations, no code holds a second copy of a key's default, and a scheme option is one
field of hc.SchemeConfig (the Identity-HC ablation, identity_res, shows it: hc.py, hc_kernels.py and
this test)."""

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import config
import configurator
import hc
import hc_verify
import keys
from conftest import read_log, tiny_args
from errors import ConfigError
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


PREPARATION = ("data/prepare.py", "data/sources.py", "data/tokenizer.py", "data/pydocs.py")   # their own options


def code_files():
    """The project's Python outside tests/ and configs/ (a config file sets keys: that is its job), and outside
    the data preparation tools, whose --seed and --overwrite are options of their own, not train.py's keys."""
    return [p for p in REPO.rglob("*.py") if not {"tests", "configs", ".git"} & set(p.relative_to(REPO).parts)
            and str(p.relative_to(REPO)) not in PREPARATION]


def _is_default(name, value):
    """value (an AST node) is a literal equal to the declared default of the key name."""
    return name in config.KEYS and isinstance(value, ast.Constant) and \
        type(value.value) is type(config.KEYS[name].default) and value.value == config.KEYS[name].default


def second_copies(path, library=True):
    """Places in a file that write a key's default again: a parameter named after a key whose default is the
    key's declared one; in the library also a keyword argument or dict entry setting a key to its declared
    default (a bool flag aside: passing False is not restating a default; and the scripts' models of their
    own, GPT-2 small's 12 layers say, are not copies either)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                node.args.kw_defaults
            found += [(d.lineno, a.arg) for a, d in zip(args, defaults) if d is not None and _is_default(a.arg, d)]
        if not library:
            continue
        pairs = []
        if isinstance(node, ast.Call):
            pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        elif isinstance(node, ast.Dict):
            pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
        found += [(v.lineno, name) for name, v in pairs if _is_default(name, v) and not isinstance(v.value, bool)]
    return [f"{path.relative_to(REPO)}:{line}: {name}" for line, name in sorted(found)]


def test_each_key_is_declared_once_and_its_default_written_once():
    assert len(config.KEYS) == len({f.name for owner in config.OWNERS.values() for f in fields(owner)})
    assert set(config.DEFAULTS) == set(config.KEYS) and all(k.help for k in config.KEYS.values())
    copies = [c for p in code_files() for c in second_copies(p, library="scripts" not in p.parts)]
    assert copies == [], "a key's default written outside its declaration:\n" + "\n".join(copies)


def test_the_check_finds_a_second_copy(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f(sinkhorn_iters=20, seed=0):\n    pass\nOPTS = {'gate_init': 0.01, 'n_layer': 2}\n"
                 "g(scheme='plain', dropout=0.1, bias=True)\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert second_copies(f) == ["x.py:1: sinkhorn_iters", "x.py:3: gate_init", "x.py:4: scheme"]
    finally:
        REPO = saved


def test_a_key_declared_twice_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Other:
        seed: int = keys.key(1, "again")
    with pytest.raises(TypeError, match="'seed' is declared twice"):
        keys.declared(*config.OWNERS.values(), Other)


def test_help_and_the_configs_page_come_from_the_declarations():
    text = config.usage()
    for name, k in config.KEYS.items():
        assert f"  --{name}=" in text and k.help in text
    page = (REPO / "docs" / "configs.md").read_text()
    table = config.markdown()
    assert table in page, "docs/configs.md is behind the declarations: python scripts/configs_doc.py"


def test_loader_converts_and_owners_check(tmp_path):
    f = tmp_path / "c.py"   # saved with a byte-order mark, as some Windows editors do: not part of the code
    f.write_text("\ufeffgate_init = 1\nkron_factors = [2, 2]\nscheme = 'kromhc'\n", encoding="utf-8")
    flat = configurator.load(config.KEYS, [str(f), "--n_layer=3"])
    assert flat["gate_init"] == 1.0 and type(flat["gate_init"]) is float and flat["kron_factors"] == (2, 2)
    c = config.build(flat, "c")
    assert (c.model.n_layer, c.model.n_streams, c.data.data_seed, c.rundir.out_dir) == (3, 4, 1337,
                                                                                         "out/c-kromhc-n4-s1337")
    for bad, message in ((["--n_layer=0"], "'n_layer' must be > 0, got 0"),
                         (["--learning_rate=inf"], "'learning_rate' must be a finite number, got inf"),
                         (["--param_data_ratio=nan"], "'param_data_ratio' must be"),
                         (["--max_iters=-1", "--param_data_ratio=inf"], "'param_data_ratio' must be a finite"),
                         (["--seed=-1"], r"'seed' must be in \[0, 2\*\*31\), got -1"),
                         (["--fused=yes"], "'fused' must be one of")):
        with pytest.raises(ConfigError, match=message):
            config.build(configurator.load(config.KEYS, bad))


# ----------------------------------------------------------------------------------------------- Identity-HC

@pytest.mark.parametrize("scheme", ["hc", "mhc", "mhc_lite", "kromhc"])
def test_identity_hc_keeps_the_streams_and_learns_the_read_and_write(scheme):
    C, n = 16, 4
    torch.manual_seed(0)
    conn = hc.make_connection(scheme, C, n, 1, identity_res=True)
    full = hc.make_connection(scheme, C, n, 1)
    assert not {"W_r", "A_r", "b_res", "alpha_res"} & {k for k, _ in conn.named_parameters()}
    assert sum(p.numel() for p in conn.parameters()) < sum(p.numel() for p in full.parameters())
    with torch.no_grad():   # non-trivial read and write
        for p in conn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    h = torch.randn(2, 5, n, C, requires_grad=True)
    branch = torch.nn.Linear(C, C)
    H_pre, H_post, H_res = conn.coefficients(h)
    assert torch.equal(H_res, torch.eye(n).expand(2, 5, n, n))
    out = conn(h, branch)
    x_in = (H_pre.unsqueeze(-1) * h).sum(-2)
    expected = h + H_post.unsqueeze(-1) * branch(x_in).unsqueeze(-2)   # h_new[i] = h[i] + H_post[i] y, exactly
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.parameters()), scheme
    assert "identity_res=True" in conn.extra_repr() and "identity_res" not in full.extra_repr()


def test_identity_hc_trains_and_the_fused_path_names_why_it_is_not_used(data_dir, tmp_path):
    out = tmp_path / "run"
    train_main = __import__("train").main
    train_main(tiny_args(data_dir, out, "--scheme=mhc", "--identity_res=True", "--max_iters=4", "--eval_interval=2"))
    log = read_log(out)
    assert log[0]["identity_res"] is True and log[-1]["val_loss"] < log[1]["val_loss"]
    evals = [r for r in log if r["type"] == "eval"]
    assert all(v == 0.0 for r in evals for k, v in r["diag"].items() if k.endswith("/dist_identity"))
    assert all(r["hres_composite"] == torch.eye(4).tolist() for r in evals)
    model_cfg = GPTConfig(scheme="kromhc", n_streams=4, identity_res=True, fused="on")
    why = hc_verify.setup_error(model_cfg, 32, "cpu")
    assert why is not None and "identity_res=True" in why


def test_identity_res_is_noted_where_it_does_not_apply(data_dir, tmp_path, capsys):
    __import__("train").main(tiny_args(data_dir, tmp_path / "o", "--scheme=mhc_v4", "--identity_res=True",
                                       "--max_iters=0"))
    assert ("note: identity_res=True is ignored: it applies with scheme='hc', 'mhc', 'mhc_lite' or 'kromhc' "
            "(this run: scheme='mhc_v4')") in capsys.readouterr().out


def test_model_and_scheme_options_are_one_declaration():
    """GPTConfig is SchemeConfig plus the architecture; make_connection takes exactly SchemeConfig's keys."""
    scheme_keys = {f.name for f in fields(hc.SchemeConfig)}
    assert scheme_keys <= {f.name for f in fields(GPTConfig)}
    with pytest.raises(ConfigError, match=r"unknown connection option\(s\) \['n_layer'\]"):
        hc.make_connection("hc", 8, 2, 0, n_layer=2)
    for name in scheme_keys - {"scheme", "n_streams"}:   # every declared option reaches a connection
        hc.make_connection("kromhc", 8, 4, 0, **{name: config.DEFAULTS[name]})
    assert GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16)).config.vocab_size == 16
