"""
Config files and command-line overrides, nanoGPT style but strict.

    python train.py configs/quickstart.py --scheme=hc --n_streams=2 --learning_rate=1e-3

Arguments are applied left to right on top of the defaults: a path is a Python config file
whose top-level assignments set keys; `--key=value` sets one key (the value is a Python
literal, or a bare string); `--key` alone sets a bool key to True. An unknown key, or a
value whose type does not match the default's, is an error naming the key. Names in a config
file that start with "_", and imported modules, are not config keys. A config file that cannot
be read or compiled, or raises when run, is an error naming the file and line.

    load      the config: defaults, then config files and overrides in order
    validate  the values train.py's keys may take, each error naming its key
    usage     --help: every key with its default and comment, read from train.py's DEFAULTS
"""

import ast
import difflib
import io
import tokenize
import types

import hc
from model import READOUTS, RECOMPUTE, STREAM_DTYPES


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
            code = compile(f.read(), path, "exec")
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory; pass a Python file (configs/*.py)") from None
    except (OSError, ValueError) as e:  # not UTF-8, null bytes, no permission
        raise ConfigError(f"config file {path!r} cannot be read ({e})") from None
    except SyntaxError as e:
        where = f", line {e.lineno}" if e.lineno else ""
        raise ConfigError(f"config file {path!r}{where}: syntax error ({e.msg}); "
                          f"fix that line (a config file is Python: key = value)") from None
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
    return namespace


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
            for key, value in run_config_file(arg).items():
                if key.startswith("_") or isinstance(value, types.ModuleType):
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
    "wandb_mode": ("online", "offline", "disabled"),
    "lr_schedule": ("cosine", "linear"), "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
    "compile": ("auto", True, False), "arch": ("gpt2", "nanochat"), "optimizer": ("adamw", "muon"),
    "hc_optimizer": ("adamw", "muon"), "fused": ("auto", "on", "off"), "recompute": RECOMPUTE,
}
POSITIVE = ("eval_interval", "log_interval", "eval_tokens", "diag_batch_size", "batch_size", "block_size",
            "total_batch_tokens", "n_layer", "n_head", "n_embd", "sinkhorn_iters")
NON_NEGATIVE = ("hellaswag_limit", "eval_batch_size", "vocab_size", "n_streams", "max_iters", "weight_decay", "grad_clip",
                "warmup_iters", "lr_decay_iters", "learning_rate", "keep_checkpoints", "matrix_lr", "embedding_lr",
                "unembedding_lr", "muon_momentum_warmup", "adam_eps")


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
    for key in ("muon_momentum", "muon_momentum_start"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {cfg[key]}")
