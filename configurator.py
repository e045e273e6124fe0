"""
Config files and command-line overrides, nanoGPT style but strict.

    python train.py configs/quickstart.py --scheme=hc --n_streams=2 --learning_rate=1e-3

Arguments are applied left to right on top of the defaults: a path is a Python config file
whose top-level assignments set keys; `--key=value` sets one key (the value is a Python
literal, or a bare string); `--key` alone sets a bool key to True. An unknown key is an error
naming the key (with the nearest known ones). Names in a config file that start with "_", that an
import binds (`import math`, `from math import sqrt`), or that hold a module, function or class are
not config keys, unless they are the name of a key. `key: value` (an annotation, which sets nothing)
is an error naming the line: write `key = value`. A config file that cannot be read or compiled, or
raises when run, is an error naming the file and line; an argument without `--` that is no file but
looks like `key=value` suggests `--key=value`.

The loader is generic: it takes the declared keys ({name: keys.Key}, e.g. config.KEYS) and knows
nothing of the model. It converts what is harmless (an int for a float key, a list for a tuple key);
every value is checked against its declaration where its owner is made (keys.check).

    load      the config: defaults, then config files and overrides in order -> {key: value}
"""

import ast
import difflib
import os
import types

from errors import ConfigError


def _unknown(key, known, where):
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def convert(value, types_):
    """value as a key of these types takes it: an int for a float key, a list for a tuple key; else unchanged."""
    if float in types_ and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in types_ and isinstance(value, list):
        return tuple(value)
    if float in types_ and isinstance(value, str) and value.strip().lower() in ("inf", "-inf", "nan"):
        return float(value)   # not Python literals: the owner's check names them as not finite
    return value


def parse_value(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s  # a bare string, e.g. --scheme=kromhc


def run_config_file(path):
    """The top-level names a config file sets; any error names the file (and line) instead of a traceback."""
    try:
        with open(path, encoding="utf-8-sig") as f:   # a byte-order mark (Windows editors) is not code
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


def load(keys, argv):
    """Apply config files and --key=value overrides in argv to the defaults of keys ({name: keys.Key})."""
    config = {name: k.default for name, k in keys.items()}

    def set_key(key, value, where):
        if key not in keys:
            raise _unknown(key, keys, where)
        config[key] = convert(value, keys[key].types)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                if key in keys and keys[key].types == (bool,):
                    val = "True"
                else:
                    raise ConfigError(f"override {arg!r}: expected --{key}=VALUE")
            set_key(key, parse_value(val), f"override {arg!r}")
        else:
            key, eq, val = arg.partition("=")
            if eq and not os.path.exists(arg):  # `python train.py n_layer=2`
                if key in keys:
                    raise ConfigError(f"argument {arg!r} is not a config file; to set the key write --{key}={val}")
                close = difflib.get_close_matches(key, list(keys), n=1)
                hint = f"; did you mean --{close[0]}={val}?" if close else ""
                raise ConfigError(f"config file {arg!r} not found, and {key!r} is not a config key either "
                                  f"(an override is written --key=value){hint}")
            namespace, imported = run_config_file(arg)
            for key, value in namespace.items():
                not_a_key = key in imported or isinstance(value, (types.ModuleType, types.FunctionType,
                                                                  types.BuiltinFunctionType, type))
                if key.startswith("_") or (key not in keys and not_a_key):
                    continue
                set_key(key, value, f"config file {arg!r}")
    return config
