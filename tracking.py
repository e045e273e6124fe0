"""A run's record outside out_dir: its first lines on the console, and Weights & Biases (docs/wandb.md).

    announce          what the run is, from its log header
    resolve_mode      the mode wandb runs in: WANDB_MODE in the environment, when set, wins over wandb_mode
    check_wandb       what wandb.init would refuse, said at start, before the data and the model are built
    start_wandb       the wandb run, resumed with the checkpoint's run id and group (a failed start: init_run)
    wandb_key         a log.jsonl metric's wandb name (the one mapping, both ways: log_key)
    log_record        one log.jsonl record to wandb (a "final" record also into the run summary)
    hres_image        every connection's token-averaged H_res as one image, logged at each eval
    log_to_run        results computed after a run (scripts/eval_lm.py) added to that run
    read_offline_run  the records of an offline run file (wandb/offline-run-*/run-*.wandb)

train.py imports wandb only when wandb_log is set.
"""

import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from data import tokenizer as toklib
from errors import ConfigError
from keys import check, key


@dataclass
class WandbConfig:
    """Weights & Biases (the config keys of tracking.py; none is part of a run's setting)."""
    SECTION = "wandb (tracking.py)"
    wandb_log: bool = key(False, "log to Weights & Biases", setting="tracking")
    wandb_project: str = key("hcgpt", "wandb project", applies={"wandb_log": (True,)}, setting="tracking")
    wandb_run_name: str = key("", '"" -> <config>-<scheme>-n<n_streams>-s<seed>[-d<data_seed>]; also names out_dir',
                              setting="a name")
    wandb_mode: str = key("online", "online | offline | disabled", choices=("online", "offline", "disabled"),
                          applies={"wandb_log": (True,)}, setting="tracking")
    wandb_group: str = key("", '"" -> the run\'s setting (setting.py): the seeds of one experiment share it',
                           setting="tracking (it overrides the group, not the setting)")
    wandb_tags: str = key("", 'comma-separated; "" -> scheme, n<n>, arch, optimizer, dataset, tokenizer',
                          setting="tracking")

    def __post_init__(self):
        check(self)


MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}
INIT_TIMEOUT = 60.0  # seconds; wandb's own default is 90
TAG_MAX = 64  # wandb.init refuses a longer tag


def announce(h, meta, horizon, skipped):
    """The run's first lines on the console, from its log header h (rundir.run_header); meta: its data's."""
    for msg in h["notes"]:
        print(f"note: {msg}")
    if h["type"] == "resume":
        print(f"resumed from step {h['step']} ({h['resume_from']})")
    print(f"{h['max_iters']:,} steps{horizon}, {h['max_iters'] * h['total_batch_tokens']:,} tokens; tokenizer "
          f"{toklib.describe(meta.get('tokenizer'))}")
    print(f"{h['wandb_run_name']}: {h['scheme']} n={h['n_streams']}, {h['num_params'] / 1e6:.2f}M params, "
          f"{h['world_size']} process(es) on {h['device_name']}, {h['grad_accum']} micro-step(s) of "
          f"{h['batch_size']} x {h['block_size']} per rank, {h['total_batch_tokens']:,} tokens/step, "
          f"out_dir {h['out_dir']}")
    print(f"residual path: {h['fused_path']} (fused={h['fused']}: {h['fused_reason']})")
    for msg in skipped:
        print(f"note: {msg}")


def resolve_mode(wc):
    """Set wc.wandb_mode (a WandbConfig) to the mode wandb will run in. The rule: WANDB_MODE in the
    environment, when set, wins over the config (as with wandb's other variables: a job script that
    exports WANDB_MODE=offline for nodes without network means it). -> a note for the user, or None."""
    env = os.environ.get("WANDB_MODE")
    if not wc.wandb_log or not env:
        return None
    mode = MODES.get(env.strip().lower())
    if mode is None:
        raise ConfigError(f"WANDB_MODE={env!r} in the environment is not a wandb mode; set it to online, offline "
                          f"or disabled, or unset it to use wandb_mode ({wc.wandb_mode!r})")
    old, wc.wandb_mode = wc.wandb_mode, mode
    if mode == old:
        return None
    return f"WANDB_MODE={env} in the environment overrides wandb_mode={old!r}: wandb runs {mode}"


def init_timeout():
    """WANDB_INIT_TIMEOUT in seconds (INIT_TIMEOUT when unset): a finite number > 0 (wandb refuses inf)."""
    text = os.environ.get("WANDB_INIT_TIMEOUT", "").strip()
    if not text:
        return INIT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"WANDB_INIT_TIMEOUT={text!r} in the environment is not a finite number of seconds > 0; "
                          f"set it to one (e.g. WANDB_INIT_TIMEOUT=120), or unset it for {INIT_TIMEOUT:g} s")
    return seconds


def user_tags(text):
    """The tags of config key wandb_tags (comma-separated), each once; a tag wandb would refuse is refused here."""
    tags = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    for t in tags:
        if len(t) > TAG_MAX:
            raise ConfigError(f"config key 'wandb_tags': the tag {t!r} has {len(t)} characters, but wandb takes at "
                              f"most {TAG_MAX}; shorten it (tags are comma-separated)")
    return tags


def wandb_dir():
    """Where wandb writes its run files: <WANDB_DIR, else the current folder>/wandb (.wandb where that exists)."""
    root = os.path.abspath(os.environ.get("WANDB_DIR") or os.getcwd())
    return os.path.join(root, ".wandb" if os.path.isdir(os.path.join(root, ".wandb")) else "wandb")


def check_wandb(wc):
    """What wandb.init would refuse, said now, not after the data and the model are built (or in a prompt
    on a cluster node): the tags, WANDB_INIT_TIMEOUT, the folder for wandb's files, and online, an API key.
    wc: the WandbConfig, its wandb_mode resolve_mode's."""
    if not wc.wandb_log:
        return
    init_timeout()
    user_tags(wc.wandb_tags)
    if wc.wandb_mode != "disabled":
        # else wandb (0.31) moves the run to the system temp folder, where `wandb sync` and wandb_offline.py do not look
        folder = place = wandb_dir()
        while not os.path.exists(place):  # wandb makes the missing folders
            place = os.path.dirname(place)
        if not (os.path.isdir(place) and os.access(place, os.W_OK | os.X_OK)):
            where = "WANDB_DIR" if os.environ.get("WANDB_DIR") else "the current folder (WANDB_DIR is unset)"
            raise ConfigError(f"wandb writes its run files in {folder} (under {where}), but {place} is not a "
                              f"writable folder; set WANDB_DIR to a writable folder, or --wandb_log=False")
    if wc.wandb_mode != "online" or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        if netrc.netrc(path).authenticators(host):
            return
    raise ConfigError(f"config key 'wandb_mode' is 'online' but no wandb API key was found (WANDB_API_KEY, or {host} "
                      f"in {path}); run `wandb login`, or pass --wandb_mode=offline (sync later with `wandb sync`)")


def wandb_tags(header):
    """The tags of a run, each once: wandb_tags (comma-separated) if set, else scheme, n<n>, arch, optimizer,
    dataset and tokenizer:<name> (GPT-2's BPE is also an arch): the filters of a sweep's dashboard."""
    if header["wandb_tags"]:
        return user_tags(header["wandb_tags"])
    tok = header.get("tokenizer")
    tags = [header["scheme"], f"n{header['n_streams']}", header["arch"], header["optimizer"], header["dataset"],
            tok and f"tokenizer:{tok}"]
    return list(dict.fromkeys(str(t)[:TAG_MAX] for t in tags if t))  # a long dataset name: cut, the user wrote no tag


def init_run(**kwargs):
    """wandb.init(resume="allow", **kwargs), given up after WANDB_INIT_TIMEOUT seconds; a failure is one line
    naming its cause and the fix (start_error) instead of wandb's traceback."""
    import wandb
    timeout = init_timeout()
    try:
        return wandb.init(resume="allow", settings=wandb.Settings(init_timeout=timeout), **kwargs)
    except Exception as e:  # wandb's own types, pydantic's, OSError: start_error sorts them
        raise ConfigError(start_error(e, kwargs.get("mode") or "online", timeout)) from None


def start_error(e, mode, timeout):
    """The message of a wandb.init that raised e in mode: only online mode talks to the server."""
    from wandb.errors import AuthenticationError, UsageError
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    what = f"{type(e).__name__}: {' '.join(lines)[:300]}"  # pydantic's cause is below its first line
    if isinstance(e, (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError)) or \
            (isinstance(e, OSError) and e.filename):  # its files, not the network (ConnectionError has no file)
        return (f"wandb could not write its run files in {wandb_dir()} ({what}); set WANDB_DIR to a writable folder "
                f"with free space")
    if isinstance(e, (ValueError, UsageError)):  # a value it validates: the tags, the name, the id, a WANDB_* setting
        return (f"wandb refused a value of the run ({what}); correct the value it names (config keys wandb_project, "
                f"wandb_run_name, wandb_group, wandb_tags, or a WANDB_* variable)")
    if isinstance(e, AuthenticationError):
        return (f"wandb rejected the API key ({what}); run `wandb login --relogin` with a valid key, or pass "
                f"--wandb_mode=offline and sync later with `wandb sync`")
    if mode != "online":
        return (f"wandb could not start the {mode} run ({what}; {mode} mode uses no network); its log is in "
                f"{wandb_dir()}/debug-internal.log; train without wandb with --wandb_log=False")
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return (f"wandb could not start the run at {url} within {timeout:g} s ({what}); check the network and the key, "
            f"or pass --wandb_mode=offline and sync later with `wandb sync` (WANDB_INIT_TIMEOUT sets the wait)")


def start_wandb(header, run_id=None, run_group=None):
    """The wandb run of this training run, on rank 0; header: the log header (the run's config and facts:
    rundir.run_header), which is also the wandb config. run_id and run_group (from the checkpoint) continue
    the same run in the same group; else the group is wandb_group or the run's setting (setting.py)."""
    group = header["wandb_group"] or run_group or header["setting"]
    if run_group and not header["wandb_group"] and run_group != header["setting"]:
        print(f"note: this resumed run's setting is now {header['setting']} (a config key changed at resume); "
              f"its wandb run stays in group {run_group}")
    run = init_run(project=header["wandb_project"], name=header["wandb_run_name"], mode=header["wandb_mode"],
                   config={k: v for k, v in header.items() if k not in ("type", "step")}, id=run_id, group=group,
                   job_type=header["config_name"], tags=wandb_tags(header), allow_val_change=True)
    run.define_metric("tokens")  # the x-axis: runs with other batch sizes line up (the step stays as _step)
    for section in ("train", "val", "diag"):
        run.define_metric(f"{section}/*", step_metric="tokens")
    for name in ("val/loss", "val/bpb"):
        run.define_metric(name, step_metric="tokens", summary="min,last")
    return run


# log.jsonl -> wandb: a record of type train, eval or final; its numbers keep their log.jsonl names under a
# section, eval's "val_" prefix dropped (val_loss -> val/loss); the diagnostics as diag/<name>.
SECTIONS = {"train": "train", "eval": "val", "final": "final"}


def wandb_key(kind, key):
    """The wandb name of log.jsonl's key in a record of type kind: train/loss, val/bpb, final/core, ..."""
    if kind == "eval" and key.startswith("val_"):
        key = key[len("val_"):]
    return f"{SECTIONS[kind]}/{key}"


def log_key(name):
    """The inverse of wandb_key: a wandb name -> (record type, log.jsonl key), or None for another name."""
    section, _, key = name.partition("/")
    kind = {v: k for k, v in SECTIONS.items()}.get(section)
    if kind is None or not key or "/" in key:
        return None
    return kind, ("val_" + key if kind == "eval" and key in ("loss", "bpb") else key)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def wandb_metrics(record):
    """The wandb row of a log.jsonl record: its numbers under wandb_key, one level of nested numbers as
    <name>/<sub> (the diagnostics as diag/<name>), and tokens; {} for a record of another type."""
    kind = record.get("type")
    if kind not in SECTIONS:
        return {}
    row = {"tokens": record["tokens"]}
    for name, v in record.items():
        if name in ("type", "step", "tokens"):
            continue
        if isinstance(v, dict):
            prefix = "diag" if name == "diag" else wandb_key(kind, name)
            row.update({f"{prefix}/{k}": x for k, x in v.items() if _number(x)})
        elif _number(v):
            row[wandb_key(kind, name)] = v
    return row


def log_record(run, record, extra=None):
    """Log a log.jsonl record to the wandb run at its step (with extra items, e.g. the H_res image); a
    "final" record (HellaSwag, CORE, later evaluations) also goes into the run summary under the same names."""
    row = wandb_metrics(record)
    if not row:
        return
    run.log({**row, **(extra or {})}, step=record["step"])
    if record["type"] == "final":
        run.summary.update({k: v for k, v in row.items() if k != "tokens"})


def hres_image(diag):
    """wandb.Image of residual_diagnostics' heatmaps: every connection's token-averaged H_res, then the composite."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb
    items = list(diag["matrices"].items()) + [("composite", diag["composite"])]
    cols = min(8, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, items):
        ax.imshow(np.array(m), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(name, fontsize=7)
    fig.tight_layout()
    image = wandb.Image(fig)
    plt.close(fig)
    return image


def log_to_run(project, name, mode, run_id, data, step_metric, run_group=None):
    """Add data to the finished wandb run run_id of project (resumed under its name, in its group; mode: its
    wandb_mode, WANDB_MODE overriding it as in train.py). The keys of data are plotted against data[step_metric]
    (the checkpoint's step), since the run's own step has moved past it."""
    mode = MODES.get(os.environ.get("WANDB_MODE", "").strip().lower()) or mode
    run = init_run(project=project, name=name or None, id=run_id, mode=mode, group=run_group)
    try:
        run.define_metric(step_metric, hidden=True)
        run.define_metric(f"{step_metric.split('/')[0]}/*", step_metric=step_metric)
        run.log(data)
    finally:
        run.finish()
    return run.id


# -----------------------------------------------------------------------------
# the offline run file: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB's log format (32 KiB
# blocks of chunks with a 7-byte header: crc32, length, type full / first / middle / last) holding
# protobuf Records (wandb.proto.wandb_internal_pb2)

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_records(path):
    """The protobuf Records of an offline run file, in order."""
    import zlib
    import wandb
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ConfigError(f"{path} is not a wandb run file (it starts {data[:4]!r}, not ':W&B')")
    records, parts, pos = [], None, 7
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0:  # zero padding
            continue
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            break  # a file still being written ends in a cut chunk
        if kind in (FULL, FIRST):
            parts = [chunk]
        elif parts is not None:
            parts.append(chunk)
        if kind in (FULL, LAST) and parts is not None:
            record = pb.Record()
            try:
                record.ParseFromString(b"".join(parts))
            except DecodeError as e:  # its checksum held: another wandb's record layout
                raise ConfigError(f"{path}: a record could not be decoded ({e}): the file is damaged, or written "
                                  f"by another wandb version than {wandb.__version__} (install that one to read it)"
                                  ) from None
            records.append(record)
            parts = None
    return records


def read_offline_run(path):
    """What an offline run file says: {"id", "name", "group", "job_type", "tags", "config", "metrics"
    ({name: {"step_metric", "summary"}}, from define_metric), "summary" (the last value of each key), "step"
    (the last step logged)}."""
    run = {"id": None, "name": None, "group": None, "job_type": None, "tags": [], "config": {}, "metrics": {},
           "summary": {}, "step": None}
    for r in offline_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type,
                       tags=list(r.run.tags))
            run["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in r.config.update if u.key != "_wandb"})
        elif kind == "metric":
            m = r.metric
            summary = [a for a in ("min", "max", "mean", "last", "first", "none") if getattr(m.summary, a)]
            run["metrics"][m.name or m.glob_name] = {"step_metric": m.step_metric or None, "summary": summary}
        elif kind == "summary":
            for u in r.summary.update:
                key = u.key or "/".join(u.nested_key)
                if key == "_step":
                    run["step"] = json.loads(u.value_json)
                elif not key.startswith("_"):
                    run["summary"][key] = json.loads(u.value_json)
    return run
