"""What hcgpt's commands share: where they run and how they end.

    init_distributed   torchrun's process group (or one process) and this rank's device
    check_device / setup_device / autocast   the --device and --dtype of the scripts
    bf16_peak / peak_flops   the one table of dense bf16 peaks, for MFU (train.py, scripts/bench.py)
    flag_nonfinite     the NaN/inf check of a training step without a host sync
    rng_state          every random stream of a process, saved in checkpoints for exact resume
    run_cli            a script's body: a user's mistake ends in one line and exit status 1
"""

import argparse
import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# devices and processes

def init_distributed(device_type):
    """Under torchrun (RANK set): join the process group (nccl on CUDA, gloo on CPU) and pick this
    rank's GPU. -> (ddp, rank, local_rank, world_size, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device_type
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True, rank, local_rank, world_size, device


def setup_device(device="auto"):
    """-> (device, device_type, rank, world_size); initialises torch.distributed under torchrun."""
    device = check_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if int(os.environ.get("RANK", -1)) != -1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device_type == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return device, device_type, dist.get_rank(), dist.get_world_size()
    return device, device_type, 0, 1


def check_device(device):
    """--device value -> a device this machine has ("auto": cuda if present, else cpu); ValueError otherwise."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() "
                             f"is False); use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device_type, dtype):
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


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


class LossEMA:
    """nanochat's logged "train loss" (scripts/base_train.py): an EMA (beta 0.9) of the loss of rank 0's
    last micro-batch, debiased by 1 - beta^steps. Kept on the device: no host sync per step."""

    def __init__(self, device, beta=0.9):
        self.beta, self.steps = beta, 0
        self.ema = torch.zeros((), dtype=torch.float64, device=device)

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


def positive_int(text):
    """argparse type: an integer >= 1 (a count or size of 0 or less would give a wrong or empty result)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def run_cli(main_body, prog):
    """Run a script's body; a user's mistake (bad file, flag, checkpoint, device) ends in one line
    naming it and exit status 1, not a traceback."""
    try:
        return main_body()
    except (OSError, ValueError, RuntimeError) as e:  # missing/bad files, checkpoints, devices, no network
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
