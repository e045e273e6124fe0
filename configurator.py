"""
Config files and command-line overrides, nanoGPT style but strict.

    python train.py configs/quickstart.py --scheme=hc --n_streams=2 --learning_rate=1e-3

Arguments are applied left to right on top of the defaults: a path is a Python config file
whose top-level assignments set keys; `--key=value` sets one key (the value is a Python
literal, or a bare string); `--key` alone sets a bool key to True. An unknown key, or a
value whose type does not match the default's, is an error naming the key. Names in a config
file that start with "_", that an import binds (`import math`, `from math import sqrt`), or
that hold a module, function or class are not config keys, unless they are the name of a key.
`key: value` (an annotation, which sets nothing) is an error naming the line: write `key = value`.
A config file that cannot be read or compiled, or raises when run, is an error naming the file
and line; an argument without `--` that is no file but looks like `key=value` suggests `--key=value`.

    load      the config: defaults, then config files and overrides in order
    validate  the values train.py's keys may take, each error naming its key
    ignored   the keys set to something the run does not use (APPLIES: which key applies to what)
    usage     --help: every key with its default and comment, read from train.py's DEFAULTS
"""

import ast
import difflib
import io
import os
import tokenize
import types

import hc
from model import EMBEDDING_DTYPES, NANOCHAT_INITS, READOUTS, RECOMPUTE, STREAM_DTYPES


class ConfigError(ValueError):
    pass


def _unknown(key, defaults, where):
    close = difflib.get_close_matches(key, list(defaults), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def check_type(key, value, default, allowed=None):
    """Return value, converted if harmless (int -> float, list -> tuple), or raise ConfigError.
    allowed: the accepted types when the default alone does not say (e.g. a None default)."""
    if allowed is None:
        allowed = (type(default),)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in allowed and isinstance(value, list):
        return tuple(value)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"config key {key!r} must be {names}, got {value!r} ({type(value).__name__})")
    return value


def parse_value(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s  # a bare string, e.g. --scheme=kromhc


def run_config_file(path):
    """The top-level names a config file sets; any error names the file (and line) instead of a traceback."""
    try:
        with open(path) as f:
            code_text = f.read()
        code = compile(code_text, path, "exec")
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None  # load() words the `key=value` case
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory; pass a Python file (configs/*.py)") from None
    except (OSError, ValueError) as e:  # not UTF-8, null bytes, no permission
        raise ConfigError(f"config file {path!r} cannot be read ({e})") from None
    except SyntaxError as e:
        where = f", line {e.lineno}" if e.lineno else ""
        raise ConfigError(f"config file {path!r}{where}: syntax error ({e.msg}); "
                          f"fix that line (a config file is Python: key = value)") from None
    tree = ast.parse(code_text, path)
    for node in tree.body:  # `n_layer: 2` (YAML habit) is an annotation: Python sets nothing
        if isinstance(node, ast.AnnAssign) and node.value is None and isinstance(node.target, ast.Name):
            raise ConfigError(f"config file {path!r}, line {node.lineno}: `{ast.unparse(node)}` is an annotation, "
                              f"which sets nothing; write `{node.target.id} = {ast.unparse(node.annotation)}`")
    imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names if a.name != "*"}
    namespace = {}
    try:
        exec(code, namespace)
    except Exception as e:  # a config may compute values; its own bug is still a config error
        tb, line = e.__traceback__, None
        while tb is not None:  # the deepest line of the config file itself
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else line
            tb = tb.tb_next
        where = f", line {line}" if line else ""
        raise ConfigError(f"config file {path!r}{where} raised {type(e).__name__}: {e}; fix the file") from None
    return namespace, imported


def load(defaults, argv, allowed_types=None):
    """Apply config files and --key=value overrides in argv to a copy of defaults."""
    allowed_types = allowed_types or {}
    config = dict(defaults)

    def set_key(key, value, where):
        if key not in defaults:
            raise _unknown(key, defaults, where)
        config[key] = check_type(key, value, defaults[key], allowed_types.get(key))

    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                if key in defaults and isinstance(defaults[key], bool):
                    val = "True"
                else:
                    raise ConfigError(f"override {arg!r}: expected --{key}=VALUE")
            set_key(key, parse_value(val), f"override {arg!r}")
        else:
            key, eq, val = arg.partition("=")
            if eq and not os.path.exists(arg):  # `python train.py n_layer=2`
                if key in defaults:
                    raise ConfigError(f"argument {arg!r} is not a config file; to set the key write --{key}={val}")
                close = difflib.get_close_matches(key, list(defaults), n=1)
                hint = f"; did you mean --{close[0]}={val}?" if close else ""
                raise ConfigError(f"config file {arg!r} not found, and {key!r} is not a config key either "
                                  f"(an override is written --key=value){hint}")
            namespace, imported = run_config_file(arg)
            for key, value in namespace.items():
                not_a_key = key in imported or isinstance(value, (types.ModuleType, types.FunctionType,
                                                                  types.BuiltinFunctionType, type))
                if key.startswith("_") or (key not in defaults and not_a_key):
                    continue
                set_key(key, value, f"config file {arg!r}")
    return config


def usage(path, defaults, name="DEFAULTS"):
    """--help: every key of the dict `name = dict(...)` in the file at path, with its default and the
    comment beside it (the file is the one source), under the section comments between them."""
    with open(path) as f:
        src = f.read()
    comments = {t.start[0]: t.string.lstrip("# ") for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    call = next(n.value for n in ast.parse(src).body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == name)
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value ...]   (or torchrun ... train.py ...)", "",
             "Config files and --key=value overrides apply in order on top of these defaults."]
    prev = call.lineno
    for kw in call.keywords:
        for i in range(prev + 1, kw.lineno):  # section headers
            lines += ["", f"{comments[i]}:"] if i in comments else []
        value = defaults[kw.arg]
        value = (value or '""') if isinstance(value, str) else repr(value)
        lines.append(f"  --{kw.arg}={value}".ljust(40) + f" {comments.get(kw.end_lineno, '')}")
        prev = kw.end_lineno
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the values train.py's keys may take (its DEFAULTS say what each key is)

CHOICES = {
    "scheme": hc.SCHEMES, "stream_dtype": STREAM_DTYPES, "readout": READOUTS, "sinkhorn_end": hc.SINKHORN_ENDS,
    "coeff_norm": hc.COEFF_NORMS,
    "wandb_mode": ("online", "offline", "disabled"),
    "lr_schedule": ("cosine", "linear"), "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
    "compile": ("auto", True, False), "arch": ("gpt2", "nanochat"), "optimizer": ("adamw", "muon"),
    "hc_optimizer": ("adamw", "muon"), "fused": ("auto", "on", "off"), "recompute": RECOMPUTE,
    "nanochat_init": NANOCHAT_INITS, "embedding_dtype": EMBEDDING_DTYPES,
}
POSITIVE = ("eval_interval", "log_interval", "eval_tokens", "diag_batch_size", "batch_size", "block_size",
            "total_batch_tokens", "n_layer", "n_head", "n_embd", "sinkhorn_iters")
NON_NEGATIVE = ("hellaswag_limit", "eval_batch_size", "vocab_size", "n_streams", "weight_decay", "grad_clip",
                "warmup_iters", "lr_decay_iters", "learning_rate", "keep_checkpoints", "matrix_lr", "embedding_lr",
                "unembedding_lr", "muon_momentum_warmup", "adam_eps", "hc_eps", "param_data_ratio",
                "muon_weight_decay")


def validate(cfg):
    """Errors that do not need the data or the device, each naming its key."""
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise ConfigError(f"config key {key!r} must be one of {options}, got {cfg[key]!r}")
    for key in POSITIVE:
        if cfg[key] <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {cfg[key]!r}")
    for key in NON_NEGATIVE:
        if cfg[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {cfg[key]!r}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ConfigError(f"config key 'dropout' must be in [0, 1), got {cfg['dropout']}")
    if not 0.0 <= cfg["min_lr_ratio"] <= 1.0:
        raise ConfigError(f"config key 'min_lr_ratio' must be in [0, 1], got {cfg['min_lr_ratio']}")
    if not 0.0 < cfg["warmdown_frac"] <= 1.0:
        raise ConfigError(f"config key 'warmdown_frac' must be in (0, 1], got {cfg['warmdown_frac']}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"config key 'n_embd' ({cfg['n_embd']}) must be divisible by 'n_head' ({cfg['n_head']})")
    if cfg["max_iters"] < -1:
        raise ConfigError(f"config key 'max_iters' must be >= 0 (steps), or -1 for steps from 'param_data_ratio', "
                          f"got {cfg['max_iters']}")
    if cfg["max_iters"] == -1 and cfg["param_data_ratio"] <= 0:
        raise ConfigError("config key 'max_iters' is -1 (steps from 'param_data_ratio') but 'param_data_ratio' is 0; "
                          "set one of them")
    if cfg["keep_checkpoints"] and not cfg["checkpoint"]:
        raise ConfigError("config key 'keep_checkpoints' needs checkpoints; drop it or drop --checkpoint=False")
    if not (cfg["dataset"] or cfg["data_dir"]):
        raise ConfigError("config key 'dataset' is empty; name a prepared dataset (--dataset=pydocs) or set 'data_dir'")
    if not 0 <= cfg["seed"] < 2**31:  # numpy takes seed + rank below 2**32
        raise ConfigError(f"config key 'seed' must be in [0, 2**31), got {cfg['seed']}")
    if not -1 <= cfg["data_seed"] < 2**31:
        raise ConfigError(f"config key 'data_seed' must be in [0, 2**31), or -1 for the seed, got {cfg['data_seed']}")
    if cfg["optimizer"] == "muon" and cfg["arch"] != "nanochat":
        raise ConfigError(f"config key 'optimizer' is 'muon', nanochat's optimizer, which takes arch='nanochat' "
                          f"(got arch={cfg['arch']!r}); add --arch=nanochat or use --optimizer=adamw")
    for key in ("beta1", "beta2", "muon_momentum", "muon_momentum_start"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {cfg[key]}")


PATHS = ("out_dir", "data_dir", "resume_from", "hellaswag_file", "core_bundle_dir")  # "~" is expanded (train.resolve)

# Which keys apply to what: a key set (away from its default) where its condition does not hold is
# accepted, so one config file can serve every scheme, and noted once at the start of the run.
NOT_PLAIN = tuple(s for s in hc.SCHEMES if s != "plain")
APPLIES = [
    (("kron_factors",), "scheme", ("kromhc",)),
    (("sinkhorn_iters",), "scheme", ("mhc", "mhc_v4")),
    (("sinkhorn_end",), "scheme", ("mhc",)),
    (("res_logit_init", "coeff_norm"), "scheme", ("mhc", "mhc_lite", "kromhc")),
    (("gate_init",), "scheme", ("hc", "mhc", "mhc_lite", "kromhc")),  # mhc_v4 has no gates of that kind
    (("hc_eps",), ("scheme", "readout"), {"scheme": ("mhc_v4",), "readout": ("hc_head",)}),
    (("decay_static",), "scheme", ("hc", "mhc")),  # the schemes with 2-D static coefficients
    (("readout", "hc_branch_init_scale_sqrt_n", "diag_batch_size"), "scheme", NOT_PLAIN),
    (("nanochat_init", "embedding_dtype"), "arch", ("nanochat",)),
    (("matrix_lr", "embedding_lr", "unembedding_lr", "muon_momentum", "muon_momentum_start", "muon_momentum_warmup",
      "hc_optimizer", "muon_weight_decay"), "optimizer", ("muon",)),
    (("param_data_ratio",), "max_iters", (-1,)),
    (("warmdown_frac",), "lr_schedule", ("linear",)),
    (("hellaswag_limit",), "hellaswag", (True,)),
    (("hellaswag_file",), ("hellaswag", "final_hellaswag"), (True,)),
    (("core_bundle_dir", "core_max_per_task"), "final_core", (True,)),
    (("wandb_project", "wandb_mode"), "wandb_log", (True,)),
]


def _condition(key):
    """{config key: the values under which `key` applies}, or None where it always applies."""
    for keys, on, values in APPLIES:
        if key in keys:
            on = (on,) if isinstance(on, str) else on
            return values if isinstance(values, dict) else {k: values for k in on}
    return None


def applies(key, cfg):
    """Whether this run uses key (APPLIES)."""
    cond = _condition(key)
    return cond is None or any(cfg[k] in values for k, values in cond.items())


def ignored(cfg, defaults):
    """{key: why} for every key set away from its default that this run does not use (APPLIES)."""
    notes = {}
    for key in defaults:
        if cfg[key] != defaults[key] and not applies(key, cfg):
            cond = _condition(key)

            def one_of(values):
                vals = [repr(v) for v in values]
                return vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " or " + vals[-1]
            need = " or ".join(f"{k}={one_of(values)}" for k, values in cond.items())
            have = ", ".join(f"{k}={cfg[k]!r}" for k in cond)
            notes[key] = f"{key}={cfg[key]!r} is ignored: it applies with {need} (this run: {have})"
    return notes
