"""A run's setting: what the seeds of one experiment share, so that runs can be grouped and compared.

    setting       the config keys that define the experiment (all but those declared setting=<why not>,
                  keys.key), with the config name and the data identity -> a dict
    setting_name  its short name, "<config>-<scheme>-n<n>-<hash of the whole setting>": the wandb
                  group (tracking.py) and the group of scripts/compare.py and plot_runs.py --groups
    changed_keys  the keys in which two settings differ (to say why two runs are not one group)
    label         a group's short label from the keys that vary between groups ("kromhc n=4")
    run_name      a run's default name: the setting's readable part and its seeds (and a sweep's)
    mean_interval mean, sample std and the Student-t confidence interval of a group's values

Two runs are seeds of one setting when they differ only in `seed` (init and dropout), `data_seed`
(the data order) and keys that change neither the trained weights nor a logged number: names and
paths, tracking, checkpoint and log cadence, resume mechanics, and which optional evaluations run
(each such key's declaration says why). Everything else is in the setting, also the keys that change a result
only in its last bits (device, dtype, compile, fused, recompute, eval_batch_size): comparing those is
an experiment too. The data enters by its identity (data_id: the preparation fingerprint and shard
list) rather than its path, so the same shards under two paths are one setting.
"""

import hashlib
import json
import math

IDENTITY = ("config_name", "data_id", "tokenizer")  # log-header facts that are part of the setting


def _canonical(v):
    """JSON-stable values: 1 and 1.0 alike (a config file may write either), tuples as lists."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in v.items()}
    return str(v)


def setting(header, keys):
    """The setting of a run from its log header (train.py's config plus the run's facts): every key of keys
    (config.KEYS) that its declaration keeps in the setting, a key the header lacks (a run older than the
    key) at its default, and the IDENTITY facts the header has."""
    items = {name: header.get(name, k.default) for name, k in keys.items() if k.setting is True}
    items.update({k: header[k] for k in IDENTITY if header.get(k) is not None})
    return items


def setting_name(items):
    """'<config>-<scheme>-n<n>-<8 hex digits>': readable, and a hash of the whole setting."""
    blob = json.dumps(_canonical(items), sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return f"{items.get('config_name', 'run')}-{items['scheme']}-n{items['n_streams']}-{digest}"


def changed_keys(a, b):
    """The keys whose values differ between two settings (a key missing on one side counts)."""
    return sorted(k for k in set(a) | set(b) if _canonical(a.get(k)) != _canonical(b.get(k)))


def varying_keys(settings):
    """The keys in which any of the settings differs from the first."""
    return sorted({k for s in settings for k in changed_keys(settings[0], s)})


def label(items, keys):
    """A group's short label from the keys that vary between groups: 'kromhc n=4', 'hc n=4 gate_init=0.1'."""
    first = {"config_name": 0, "scheme": 1, "n_streams": 2}
    parts = []
    for k in sorted(keys, key=lambda k: (first.get(k, 3), k)):
        v = items.get(k)
        parts.append(str(v) if k in ("config_name", "scheme") else f"n={v}" if k == "n_streams" else f"{k}={v}")
    return " ".join(parts)


def run_name(config_name, scheme, n_streams, seed, data_seed, parts=(), always_data_seed=False):
    """'<config>-<scheme>-n<n>[-<part>...]-s<seed>', with '-d<data_seed>' when the data order has its own seed
    (or always: a sweep with one data order names all its runs alike). parts: what else tells the run apart
    (a sweep's overrides, 'n_layer=2')."""
    name = "-".join([config_name, scheme, f"n{n_streams}", *parts, f"s{seed}"])
    return name + (f"-d{data_seed}" if always_data_seed or data_seed != seed else "")


def mean_interval(values, confidence=0.95):
    """-> (mean, sample std, n, (lo, hi)): the Student-t interval mean +- t_{(1+c)/2, n-1} s / sqrt(n);
    std and interval are None for n = 1 (one run says nothing about the seed-to-seed spread)."""
    from scipy import stats
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, n, None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return mean, std, n, (mean - half, mean + half)
