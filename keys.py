"""Config keys, each declared once as a field of the dataclass of the code that uses it.

    @dataclass
    class SchemeConfig:
        sinkhorn_iters: int = key(20, "Sinkhorn-Knopp iterations", above=0, applies={"scheme": ("mhc", "mhc_v4")})

A declaration holds the key's default, its type (the annotation), the values it may take (choices, a
range or a check), its help line, when it applies, and whether it is part of a run's setting. From
these alone: the loader checks a config (configurator.py), an owner's dataclass checks itself on
construction (check), --help and docs/configs.md are written, a run names the keys it ignores, and
setting.py groups runs. Nothing else in hcgpt lists keys.

    key(default, help, ...)   a declared dataclass field
    declared(*owners)         {name: Key} of the owners' declared fields, in declaration order
    check(obj)                every declared field of a dataclass instance against its declaration
    Key                       one declaration: .name .default .types .help .section, .problem(value), .applies_to(values)
"""

import math
import os
import types
import typing
from dataclasses import dataclass, field, fields

from errors import ConfigError


def key(default, help, *, choices=None, above=None, at_least=None, below=None, at_most=None, check=None,
        applies=None, setting=True, path=False, section=None):
    """A dataclass field declaring a config key. choices: the allowed values; above / at_least / below / at_most:
    a range; check: value -> a problem (the words after "config key 'k' must be") or None; applies: {key: values}
    under which the key is used (else a value set away from its default is noted as ignored); setting: False or
    why the key is not part of a run's setting (setting.py); path: a file or folder ("~" expanded)."""
    meta = dict(help=help, choices=None if choices is None else tuple(choices), above=above, at_least=at_least,
                below=below, at_most=at_most, check=check, applies=applies, setting=setting, path=path,
                section=section)
    return field(default=default, metadata={"key": meta})


@dataclass(frozen=True)
class Key:
    name: str
    default: object
    types: tuple
    help: str
    section: str
    choices: tuple | None = None
    above: float | None = None
    at_least: float | None = None
    below: float | None = None
    at_most: float | None = None
    check: object = None
    applies: dict | None = None
    setting: object = True
    path: bool = False

    def problem(self, value):
        """What is wrong with value for this key (the rest of "config key 'k' must be ..."), or None."""
        number = float in self.types and isinstance(value, int)   # an int where a float is declared
        if isinstance(value, bool) and bool not in self.types or not (isinstance(value, self.types) or number):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in self.types)
            return f"{names}, got {value!r} ({type(value).__name__})"
        if self.choices is not None and value not in self.choices:
            return f"one of {self.choices}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"a finite number, got {value!r}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo = (">", self.above) if self.above is not None else (">=", self.at_least)
            hi = ("<", self.below) if self.below is not None else ("<=", self.at_most)
            if lo[1] is not None and hi[1] is not None and not (_holds(value, *lo) and _holds(value, *hi)):
                return (f"in {'(' if lo[0] == '>' else '['}{_num(lo[1])}, {_num(hi[1])}{')' if hi[0] == '<' else ']'}, "
                        f"got {value!r}")
            if lo[1] is not None and not _holds(value, *lo):
                return f"{lo[0]} {_num(lo[1])}, got {value!r}"
            if hi[1] is not None and not _holds(value, *hi):
                return f"{hi[0]} {_num(hi[1])}, got {value!r}"
        return self.check(value) if self.check is not None else None

    def applies_to(self, values):
        """Whether a run with these values (a dict or an object with the keys as attributes) uses this key."""
        get = values.get if isinstance(values, dict) else lambda k: getattr(values, k)
        return self.applies is None or any(get(k) in values for k, values in self.applies.items())


def _holds(v, op, bound):
    return {">": v > bound, ">=": v >= bound, "<": v < bound, "<=": v <= bound}[op]


def _num(x):
    return "2**31" if x == 2**31 else f"{x:g}"


def _types(annotation):
    """The types a field's annotation admits: int, float | None, tuple | None, bool | str, ..."""
    if isinstance(annotation, types.UnionType):
        return tuple(type(None) if t is None else t for t in annotation.__args__)
    return (annotation,)


def declared(*owners):
    """{name: Key} of every declared field of the owner dataclasses, in their order, each under the SECTION of
    the class that declares it (a base class's fields stay its own); a name declared twice is an error."""
    out = {}
    for owner in owners:
        hints = typing.get_type_hints(owner)   # also where `from __future__ import annotations` made them strings
        for f in fields(owner):
            meta = f.metadata.get("key")
            if meta is None:
                continue
            if f.name in out:
                raise TypeError(f"config key {f.name!r} is declared twice ({out[f.name].section} and {owner.__name__})")
            home = next(c for c in reversed(owner.__mro__) if f.name in getattr(c, "__dataclass_fields__", {}))
            out[f.name] = Key(f.name, f.default, _types(hints[f.name]),
                              **{**meta, "section": meta["section"] or getattr(home, "SECTION", home.__name__)})
    return out


def check(obj):
    """ConfigError naming the first declared field of a dataclass instance whose value is not allowed; a
    path's "~" expanded (no shell expands it after --key=)."""
    for name, k in declared(type(obj)).items():
        why = k.problem(getattr(obj, name))
        if why:
            raise ConfigError(f"config key {name!r} must be {why}")
        if k.path:
            setattr(obj, name, os.path.expanduser(getattr(obj, name)))
