"""A training run's config keys, gathered from the modules that declare them (keys.key), in --help's order.

    KEYS      {name: keys.Key}: every key's default, type, allowed values, help, when it applies
    DEFAULTS  {name: default}
    Config    one run's owner dataclasses: .rundir .evals .wandb .data .model .optim .system, and .name
    build     a Config from the loader's flat dict (configurator.load): every value checked where its owner
              is made, and what the config leaves to the run filled in (n_streams, data_seed, data_dir, the
              run's name and out_dir, resume_from implying resume, the checkpoint it names)
    flat      a Config as the flat dict the log header and the checkpoint record
    ignored   the keys set away from their default that the run does not use, each with a note
    usage     --help
    markdown  the key table of docs/configs.md (tests/test_layout.py keeps the page in step)
"""

import os
from dataclasses import dataclass, fields

import keys
from data.loader import DataConfig
from evals.training import EvalConfig
from model import GPTConfig
from optim import OptimConfig
from rundir import RunDirConfig, resume_path
from runtime import SystemConfig
from setting import run_name
from tracking import WandbConfig

OWNERS = {"rundir": RunDirConfig, "evals": EvalConfig, "wandb": WandbConfig, "data": DataConfig,
          "model": GPTConfig, "optim": OptimConfig, "system": SystemConfig}
KEYS = keys.declared(*OWNERS.values())
DEFAULTS = {name: k.default for name, k in KEYS.items()}


@dataclass
class Config:
    rundir: RunDirConfig
    evals: EvalConfig
    wandb: WandbConfig
    data: DataConfig
    model: GPTConfig
    optim: OptimConfig
    system: SystemConfig
    name: str = "default"   # the config file's name (configs/fwe_s.py -> fwe_s), "default" without one


def build(cfg, name="default"):
    """The Config of a flat dict of every key (configurator.load's), each owner checking its values."""
    c = Config(**{attr: owner(**{f.name: cfg[f.name] for f in fields(owner)}) for attr, owner in OWNERS.items()},
               name=name)
    if c.data.data_seed == -1:
        c.data.data_seed = c.system.seed
    c.wandb.wandb_run_name = c.wandb.wandb_run_name or run_name(name, c.model.scheme, c.model.n_streams,
                                                                c.system.seed, c.data.data_seed)
    c.rundir.out_dir = c.rundir.out_dir or os.path.join("out", c.wandb.wandb_run_name)
    c.rundir.resume = c.rundir.resume or bool(c.rundir.resume_from)
    c.rundir.resume_from = resume_path(c.rundir)
    return c


def flat(c):
    """{key: value} of every key of a Config, in KEYS' order."""
    values = {f.name: getattr(part, f.name) for attr in OWNERS for part in [getattr(c, attr)] for f in fields(part)}
    return {name: values[name] for name in KEYS}


def ignored(cfg):
    """{key: note} for every key of the flat dict cfg set away from its default that the run does not use."""
    notes = {}
    for name, k in KEYS.items():
        if cfg[name] != k.default and not k.applies_to(cfg):
            need = " or ".join(f"{on}={_one_of(values)}" for on, values in k.applies.items())
            have = ", ".join(f"{on}={cfg[on]!r}" for on in k.applies)
            notes[name] = f"{name}={cfg[name]!r} is ignored: it applies with {need} (this run: {have})"
    return notes


def _one_of(values):
    vals = [repr(v) for v in values]
    return vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " or " + vals[-1]


def _shown(value):
    return (value or '""') if isinstance(value, str) else repr(value)


def usage():
    """--help: every key with its default and help, under its owner's section."""
    lines = ["usage: python train.py [CONFIG.py ...] [--key=value ...]   (or torchrun ... train.py ...)", "",
             "Config files and --key=value overrides apply in order on top of these defaults."]
    section = None
    for name, k in KEYS.items():
        if k.section != section:
            section = k.section
            lines += ["", f"{section}:"]
        lines.append(f"  --{name}={_shown(k.default)}".ljust(40) + f" {k.help}")
    return "\n".join(lines)


def markdown():
    """docs/configs.md's table of every key, one section per owner."""
    lines, section = [], None
    for name, k in KEYS.items():
        if k.section != section:
            section = k.section
            lines += ["", f"### {section}", "", "| key | default | meaning |", "|---|---|---|"]
        meaning = k.help.replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        lines.append(f"| `{name}` | `{_shown(k.default)}` | {meaning} |")
    return "\n".join(lines[1:]) + "\n"
