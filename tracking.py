"""A run's record outside out_dir: Weights & Biases.

    resolve_mode  the mode wandb runs in: WANDB_MODE in the environment, when set, wins over wandb_mode
    check_wandb   online mode needs an API key: said at start, not after the first eval
    start_wandb   the wandb run (resumed with the checkpoint's run id), given up after WANDB_INIT_TIMEOUT
                  seconds (default 60) with a message that suggests offline mode
    hres_image    every connection's token-averaged H_res as one image, logged at each eval
    log_to_run    results computed after a run (scripts/eval_lm.py) added to that run

train.py imports wandb only when wandb_log is set.
"""

import math
import os

import numpy as np

from configurator import ConfigError


MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}
INIT_TIMEOUT = 60.0  # seconds; wandb's own default is 90


def resolve_mode(cfg):
    """Set cfg["wandb_mode"] to the mode wandb will run in. The rule: WANDB_MODE in the environment,
    when set, wins over the config (as with wandb's other variables: a job script that exports
    WANDB_MODE=offline for nodes without network means it). -> a note for the user, or None."""
    env = os.environ.get("WANDB_MODE")
    if not cfg["wandb_log"] or not env:
        return None
    mode = MODES.get(env.strip().lower())
    if mode is None:
        raise ConfigError(f"WANDB_MODE={env!r} in the environment is not a wandb mode; set it to online, offline "
                          f"or disabled, or unset it to use wandb_mode ({cfg['wandb_mode']!r})")
    if mode == cfg["wandb_mode"]:
        return None
    note = f"WANDB_MODE={env} in the environment overrides wandb_mode={cfg['wandb_mode']!r}: wandb runs {mode}"
    cfg["wandb_mode"] = mode
    return note


def init_timeout():
    text = os.environ.get("WANDB_INIT_TIMEOUT")
    try:
        seconds = float(text) if text else INIT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"WANDB_INIT_TIMEOUT={text!r} must be a number of seconds > 0")
    return seconds


def check_wandb(cfg):
    """wandb online needs an API key: say so now, not after the first eval or in a prompt on a cluster node.
    cfg["wandb_mode"] is resolve_mode's."""
    init_timeout()
    if not cfg["wandb_log"] or cfg["wandb_mode"] != "online":
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(f"config key 'wandb_mode' is 'online' but no wandb API key was found (WANDB_API_KEY, or {host} "
                      f"in {path}); run `wandb login`, or pass --wandb_mode=offline (sync later with `wandb sync`)")



def start_wandb(cfg, run_id=None):
    """The wandb run of this training run; run_id (from the checkpoint) continues the same run."""
    import wandb
    timeout = init_timeout()
    try:
        return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg,
                          mode=cfg["wandb_mode"], id=run_id, resume="allow",
                          settings=wandb.Settings(init_timeout=timeout))
    except Exception as e:  # no network, a rejected key, a dead server, a bad WANDB_* variable: wandb's own types
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        raise ConfigError(f"wandb could not start the run at {url} within {timeout:g} s ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:300]}); "
                          f"check the network and the key, or pass --wandb_mode=offline and sync later with "
                          f"`wandb sync` (WANDB_INIT_TIMEOUT sets the wait)") from None


def hres_figure(matrices, composite):
    """A grid of heatmaps: every connection's token-averaged H_res, then the composite."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = list(matrices.items()) + [("composite", composite)]
    cols = min(8, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, items):
        ax.imshow(np.array(m), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(name, fontsize=7)
    fig.tight_layout()
    return fig



def hres_image(diag):
    """wandb.Image of residual_diagnostics' matrices and composite."""
    import matplotlib.pyplot as plt
    import wandb
    fig = hres_figure(diag["matrices"], diag["composite"])
    image = wandb.Image(fig)
    plt.close(fig)
    return image



def log_to_run(cfg, run_id, data, step_metric):
    """Add data to the finished wandb run run_id (resumed; cfg: the run's config from its checkpoint,
    wandb_mode honoured, WANDB_MODE overriding it as in train.py). The keys of data are plotted
    against data[step_metric] (the checkpoint's step), since the run's own step has moved past it."""
    mode = os.environ.get("WANDB_MODE") or cfg.get("wandb_mode", "online")
    run = start_wandb(dict(cfg, wandb_mode=mode), run_id)
    try:
        prefix = step_metric.split("/")[0]
        run.define_metric(step_metric, hidden=True)
        run.define_metric(f"{prefix}/*", step_metric=step_metric)
        run.log(data)
    finally:
        run.finish()
    return run.id
