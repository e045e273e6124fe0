"""What hcgpt's commands share: where they run and how they end.

    init_distributed   torchrun's process group (or one process) and this rank's device; a rendezvous
                       that does not complete ends after $HCGPT_RENDEZVOUS_TIMEOUT s, naming the missing ranks
    keep_freed_memory  on a CPU, freed memory stays in the process for the next step (no page faults)
    check_device / setup_device / autocast   the --device and --dtype of the scripts
    bf16_peak / peak_flops   the one table of dense bf16 peaks, for MFU (train.py, scripts/bench.py)
    flag_nonfinite     the NaN/inf check of a training step without a host sync; nonfinite_message its report
    rng_state          every random stream of a process, saved in checkpoints for exact resume
    run_cli            a script's body: a user's mistake ends in one line and exit status 1
    HelpFormatter      a script's --help: its docstring as written, every option's default
    out_file_error     a results file that cannot be written, said before the work that produces it
"""

import argparse
import copy
import ctypes
import os
import random
import socket
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# devices and processes

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_TIMEOUT_ENV = "HCGPT_RENDEZVOUS_TIMEOUT"  # seconds every rank waits for the others at start
RENDEZVOUS_TIMEOUT = 300.0


class DistributedSetupError(RuntimeError):
    """The torchrun environment is incomplete, or the ranks did not all meet in time."""


def torchrun_env():
    """(rank, local_rank, world_size, master_addr, master_port) from torchrun's variables, or None
    without RANK (one process); DistributedSetupError naming what is missing or wrong."""
    env = {k: os.environ.get(k) for k in TORCHRUN_ENV}
    if env["RANK"] in (None, "", "-1"):
        return None
    seen = ", ".join(f"{k}={env[k]}" if env[k] is not None else f"{k} unset" for k in TORCHRUN_ENV)
    missing = [k for k in TORCHRUN_ENV if not env[k]]
    if missing:
        raise DistributedSetupError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                                    f"({seen}); launch with torchrun (e.g. `torchrun --standalone --nproc_per_node=N "
                                    f"train.py ...`), or unset RANK to run one process")
    try:
        rank, local_rank, world_size, port = (int(env[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"))
    except ValueError:
        raise DistributedSetupError(f"RANK, LOCAL_RANK, WORLD_SIZE and MASTER_PORT must be integers ({seen})") from None
    if not (0 <= rank < world_size and 0 <= local_rank <= rank and 0 < port < 2**16):
        raise DistributedSetupError(f"inconsistent torchrun environment ({seen}): need 0 <= LOCAL_RANK <= RANK < "
                                    f"WORLD_SIZE and MASTER_PORT in 1..65535")
    return rank, local_rank, world_size, env["MASTER_ADDR"], port


def env_seconds(name, default):
    """A timeout from the environment variable name (default when unset); ValueError unless a number > 0."""
    text = os.environ.get(name)
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{name}={text!r} must be a number of seconds > 0")
    return seconds


def rendezvous_timeout():
    """Seconds to wait for every rank at start: $HCGPT_RENDEZVOUS_TIMEOUT, default 300."""
    try:
        return env_seconds(RENDEZVOUS_TIMEOUT_ENV, RENDEZVOUS_TIMEOUT)
    except ValueError as e:
        raise DistributedSetupError(str(e)) from None


def rendezvous(rank, world_size, addr, port):
    """The TCPStore of the process group, once all world_size ranks have joined it; after
    rendezvous_timeout() seconds a DistributedSetupError naming the ranks that did not come.
    (torch's own env:// rendezvous waits its 30-minute collective timeout and names no one.)"""
    from datetime import timedelta
    timeout = rendezvous_timeout()
    wait = timedelta(seconds=timeout)
    seen = ", ".join(f"{k}={os.environ.get(k)}" for k in TORCHRUN_ENV)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    host = not agent and rank == 0
    deadline = time.monotonic() + timeout
    while not host:  # rank 0's store up? (polled here: torch's own retries print C++ stack traces)
        try:
            socket.create_connection((addr, port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise DistributedSetupError(f"rank {rank}: the rendezvous at {addr}:{port} was not reachable within "
                                            f"{timeout:g} s: rank 0 has not started, or MASTER_ADDR/MASTER_PORT point "
                                            f"elsewhere ({seen}; {RENDEZVOUS_TIMEOUT_ENV} sets the wait)") from None
            time.sleep(0.1)
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=host, timeout=wait, wait_for_workers=False,
                              multi_tenant=host)
    except Exception as e:  # DistNetworkError / DistStoreError / RuntimeError, by torch version
        why = "is MASTER_PORT in use by another program?" if host else "did rank 0 stop?"
        raise DistributedSetupError(f"rank {rank}: the rendezvous at {addr}:{port} failed "
                                    f"({str(e).splitlines()[0][:200]}); {why} ({seen})") from None
    prefix = f"hcgpt/joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{rank}", "1")
    joined, verdict, missing = store.add(f"{prefix}count", 1), f"{prefix}missing", None
    while joined < world_size and time.monotonic() < deadline:  # polled: a timed-out store.wait prints C++ noise
        time.sleep(0.05)
        try:
            joined = store.add(f"{prefix}count", 0)
            if not host and store.check([verdict]):  # rank 0 gave up: its count, not a dropped connection
                missing = store.get(verdict).decode()
                break
        except Exception:  # DistNetworkError: the store's host failed
            raise DistributedSetupError(f"rank {rank}: the rendezvous at {addr}:{port} closed before all "
                                        f"{world_size} ranks joined ({seen})") from None
    if joined < world_size:
        if missing is None:
            gone = [r for r in range(world_size) if not store.check([f"{prefix}{r}"])]
            missing = ", ".join(map(str, gone[:16])) + (f" ... ({len(gone)} in all)" if len(gone) > 16 else "")
        if host and joined > 1:  # tell the ranks that did come, then stop hosting
            store.set(verdict, missing)
            time.sleep(0.5)
        raise DistributedSetupError(f"rank {rank}: rank(s) {missing} of {world_size} did not join the rendezvous at "
                                    f"{addr}:{port} within {timeout:g} s ({seen}); start every rank (torchrun "
                                    f"--nproc_per_node, the same command on every node), or raise "
                                    f"{RENDEZVOUS_TIMEOUT_ENV}")
    store.set_timeout(timedelta(minutes=30))  # torch's default for what follows (collectives, NCCL set-up)
    return store


def init_distributed(device_type):
    """Under torchrun (RANK set): join the process group (nccl on CUDA, gloo on CPU), after every rank
    has met within $HCGPT_RENDEZVOUS_TIMEOUT seconds, and pick this rank's GPU.
    -> (ddp, rank, local_rank, world_size, device)."""
    env = torchrun_env()
    if env is None:
        return False, 0, 0, 1, device_type
    rank, local_rank, world_size, addr, port = env
    device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(device)
    store = rendezvous(rank, world_size, addr, port)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size)
    return True, rank, local_rank, world_size, device


def keep_freed_memory():
    """Keep freed memory in the process for the next step rather than handing it back to the system (glibc's
    malloc returns every block over 32 MiB at once, and the next step faults the same memory in again page
    by page). A CPU training step frees and takes its logits, batch x vocab floats, every time: the quick
    start spent 40% of its CPU time in the kernel on that (11.7 M page faults in 20 steps; 0.7 M after).
    What CUDA's caching allocator does for GPU memory. -> whether it took effect (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):   # not Linux / not glibc: the system's own allocator
        return False


def setup_device(device="auto"):
    """-> (device, device_type, rank, world_size); initialises torch.distributed under torchrun."""
    device = check_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        keep_freed_memory()
    ddp, rank, _, world_size, ddp_device = init_distributed(device_type)
    return (ddp_device if ddp else device), device_type, rank, world_size


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


def nonfinite_message(nonfinite, step, optimizer, ckpt_dir, last_ckpt_step):
    """What a run says when it stops at its first non-finite step (nonfinite: [step, loss, grad norm] on the
    host; ckpt_dir None: checkpoints off) -> (that step, the message)."""
    bad_step, bad_loss, bad_norm = int(nonfinite[0]), nonfinite[1], nonfinite[2]
    where = (f"the last good checkpoint is {os.path.join(ckpt_dir, 'ckpt.pt')} (step {last_ckpt_step})"
             if last_ckpt_step is not None and ckpt_dir is not None else "no checkpoint had been written")
    skipped = ("the optimizer skipped it on the device" if skips_on_device(optimizer)
               else "the optimizer took it: the weights are not finite from then on")
    return bad_step, (f"step {bad_step}: training loss is {bad_loss} (grad norm {bad_norm}); stopping at step {step}, "
                      f"where it was checked ({skipped}); {where}. Lower learning_rate, raise warmup_iters or check "
                      f"the data.")


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


def out_file_error(path):
    """Why a script cannot write its results file at path, or None ("-" or None: no file). Checked
    when the script starts: a long evaluation must not end in a missing folder."""
    if path in (None, "-"):
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory; pass a file path"
    if not os.path.isdir(parent):
        return f"the folder {parent} does not exist; create it, or pass another path"
    if not os.access(parent, os.W_OK):
        return f"cannot write in {parent}; pass another path"
    return None


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
