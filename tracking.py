"""A run's record outside out_dir: Weights & Biases.

    check_wandb   online mode needs an API key: said at start, not after the first eval
    start_wandb   the wandb run (resumed with the checkpoint's run id)
    hres_image    every connection's token-averaged H_res as one image, logged at each eval

train.py imports wandb only when wandb_log is set.
"""

import math
import os

import numpy as np

from configurator import ConfigError


def check_wandb(cfg):
    """wandb online needs an API key: say so now, not after the first eval or in a prompt on a cluster node."""
    if not cfg["wandb_log"] or cfg["wandb_mode"] != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
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
    return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg, mode=cfg["wandb_mode"],
                      id=run_id, resume="allow")


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
