"""What hcgpt's commands share: how they end, and the numbers of a training step.

    env_seconds        a timeout from the environment
    bf16_peak / peak_flops   the one table of dense bf16 peaks, for MFU (train.py, scripts/bench.py)
    flag_nonfinite     the NaN/inf check of a training step without a host sync; nonfinite_message its report
    nonfinite_val_message  the report of a val loss that is not finite
    rng_state          every random stream of a process, saved in checkpoints for exact resume
    run_cli            a script's body: a user's mistake ends in one line and exit status 1
    HelpFormatter      a script's --help: its docstring as written, every option's default
"""

import argparse
import copy
import os
import random
import sys

import numpy as np
import torch

from errors import HcgptError


# -----------------------------------------------------------------------------
# devices and processes

def env_seconds(name, default):
    """A timeout from the environment variable name (default when unset); ValueError unless a finite number > 0."""
    text = os.environ.get(name)
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name}={text!r} must be a finite number of seconds > 0; set it to one (e.g. {name}="
                         f"{default:g}), or unset it for {default:g} s")
    return seconds



# -----------------------------------------------------------------------------
# throughput and numerics of a training step

PEAK_BF16 = [("H100", "PCIe", 756e12), ("H100", "NVL", 835e12), ("H100", "HBM3", 989e12), ("H100", "SXM", 989e12),
             ("H200", "", 989e12), ("A100", "", 312e12)]



def bf16_peak(name):
    """Dense bf16 FLOP/s of a device by its name, or None where it is not known."""
    for chip, part, flops in PEAK_BF16:
        if chip in name and part in name:
            return flops
    return None


def peak_flops(device_type):
    """The dense bf16 peak of this process's device for MFU, or None (CPU, an unknown GPU)."""
    return bf16_peak(torch.cuda.get_device_name()) if device_type == "cuda" else None


def skips_on_device(optimizer):
    """Whether optimizer.step() honours a device-side found_inf flag (fused Adam/AdamW: the flagged
    step leaves the weights, the moments and the step count as they were, as under GradScaler)."""
    return bool(getattr(optimizer, "defaults", {}).get("fused"))  # Muon + AdamW: no, Muon has no found_inf


def flag_nonfinite(nonfinite, step, loss, grad_norm, optimizer):
    """The NaN/inf check of one step without a host sync. nonfinite (float64 [step, loss, grad
    norm], step -1 while all is well) keeps the first non-finite step for the host to report; the
    step itself is skipped on the device where the optimizer supports it. Returns the new nonfinite."""
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if skips_on_device(optimizer):
        optimizer.found_inf = bad.float()
    now = torch.stack([torch.full_like(loss, step), loss, grad_norm.to(loss.dtype)]).double()
    return torch.where(bad & (nonfinite[0] < 0), now, nonfinite)


def nonfinite_message(nonfinite, step, optimizer, ckpt_dir, last_ckpt_step):
    """What a run says when it stops at its first non-finite step (nonfinite: [step, loss, grad norm] on the
    host; ckpt_dir None: checkpoints off) -> (that step, the message)."""
    bad_step, bad_loss, bad_norm = int(nonfinite[0]), nonfinite[1], nonfinite[2]
    where = last_good(ckpt_dir, last_ckpt_step)
    skipped = ("the optimizer skipped it on the device" if skips_on_device(optimizer)
               else "the optimizer took it: the weights are not finite from then on")
    fix = ("The first step's loss comes from the weights as initialised, before any update, so the learning rate "
           "is not the cause: check the model config (its init, dtype) and the data." if bad_step == 1 else
           "Lower learning_rate, raise warmup_iters or check the data.")
    return bad_step, (f"step {bad_step}: training loss is {bad_loss} (grad norm {bad_norm}); stopping at step {step}, "
                      f"where it was checked ({skipped}); {where}. {fix}")


def last_good(ckpt_dir, last_ckpt_step):
    """The checkpoint a stopped run can continue from (ckpt_dir None: checkpoints off), in words."""
    return (f"the last good checkpoint is {os.path.join(ckpt_dir, 'ckpt.pt')} (step {last_ckpt_step})"
            if last_ckpt_step is not None and ckpt_dir is not None else "no checkpoint had been written")


def nonfinite_val_message(step, val_loss, ckpt_dir, last_ckpt_step):
    """What a run says when its val loss at an eval is not finite (the step is not checkpointed)."""
    fix = ("the weights as initialised give it, so the learning rate is not the cause: check the model config (its "
           "init, dtype) and the data" if step == 0 else "lower learning_rate, raise warmup_iters or check the data")
    return (f"step {step}: val loss is {val_loss}; stopping without a checkpoint of this step; "
            f"{last_good(ckpt_dir, last_ckpt_step)}; {fix}")


class LossEMA:
    """nanochat's logged "train loss" (scripts/base_train.py): an EMA (beta 0.9) of the loss of rank 0's
    last micro-batch, debiased by 1 - beta^steps. Kept on the device: no host sync per step."""

    def __init__(self, device, state=None, beta=0.9):
        self.beta, self.steps = beta, 0
        self.ema = torch.zeros((), dtype=torch.float64, device=device)
        if state is not None:   # a checkpoint's (state_dict)
            self.load_state_dict(state)

    def update(self, loss):
        self.ema.mul_(self.beta).add_(loss.detach().double(), alpha=1 - self.beta)
        self.steps += 1

    def value(self):
        """The debiased EMA, a 0-d tensor (nan before the first step)."""
        return self.ema / (1 - self.beta ** self.steps) if self.steps else torch.full_like(self.ema, float("nan"))

    def state_dict(self):
        return {"ema": self.ema.item(), "steps": self.steps, "beta": self.beta}

    def load_state_dict(self, state):
        self.ema.fill_(state["ema"])
        self.steps, self.beta = int(state["steps"]), float(state["beta"])


# -----------------------------------------------------------------------------
# random state, time, command lines

def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def fmt_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def int_at_least(min_value):
    """argparse type: an integer >= min_value (a count of 0 or less would give a wrong or empty result)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < min_value:
            raise argparse.ArgumentTypeError(f"must be >= {min_value}, got {v}")
        return v
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A script's --help: its docstring as written, and each option's default after its help (unless the
    help says it already, or there is none to say: None, "", a flag's False)."""

    def _format_action(self, action):
        default, text = action.default, action.help or ""
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        if action.option_strings and "default" not in text and text is not argparse.SUPPRESS and \
                default is not None and default is not False and default != "" and default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = f"{text} (default: {str(default).replace('%', '%%')})".lstrip()
        return super()._format_action(action)


def run_cli(main_body, prog):
    """Run a script's body; a user's mistake (errors.HcgptError: a bad file, flag, checkpoint, device) or the
    system's (OSError: a full disk, a lost permission) ends in one line naming it and exit status 1. Anything
    else is a bug in hcgpt and keeps its traceback."""
    try:
        return main_body()
    except (HcgptError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
