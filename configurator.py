"""
Config files and command-line overrides, nanoGPT style but strict.

    python train.py configs/quickstart.py --scheme=hc --n_streams=2 --learning_rate=1e-3

Arguments are applied left to right on top of the defaults: a path is a Python config file
whose top-level assignments set keys; `--key=value` sets one key (the value is a Python
literal, or a bare string); `--key` alone sets a bool key to True. An unknown key, or a
value whose type does not match the default's, is an error naming the key. Names in a config
file that start with "_", and imported modules, are not config keys. A config file that cannot
be read or compiled, or raises when run, is an error naming the file and line.
"""

import ast
import difflib
import io
import tokenize
import types


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
