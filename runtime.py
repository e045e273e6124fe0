"""Where a process runs: its device, its rank among torchrun's processes, its autocast (one Runtime
object for what would otherwise be half a dozen loose values), and the config keys that choose them.

    SystemConfig       device, dtype, compile, seed
    Runtime            ddp, rank, local_rank, world_size, device, device_type, dtype, compile; .master,
                       .autocast(), .on_rank0(fn), .check_same(values), .barrier(), .close()
    start              the Runtime of train.py: CUDA checked when asked for, torchrun's group joined
    for_script         the Runtime of a script's --device / --dtype (cuda:N allowed)
    keep_freed_memory  on a CPU, freed memory stays in the process for the next step (no page faults)
"""

import ctypes
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import rendezvous
from errors import ConfigError, DistributedSetupError, HcgptError
from keys import check, key


@dataclass
class SystemConfig:
    """The process: device, precision, compilation, seed (the config keys of runtime.py)."""
    SECTION = "system (runtime.py)"
    device: str = key("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = key("auto", "auto (bfloat16 on CUDA, else float32) | float32 | bfloat16: autocast dtype",
                     choices=("auto", "float32", "bfloat16"))
    compile: bool | str = key("auto", "auto (on for CUDA) | True | False: torch.compile", choices=("auto", True, False))
    seed: int = key(1337, "init and dropout seed, in [0, 2**31)", at_least=0, below=2**31,
                    setting="varies within a group: the init and dropout")

    def __post_init__(self):
        check(self)


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str         # "cpu", "cuda:3"
    device_type: str    # "cpu" | "cuda"
    dtype: str          # "float32" | "bfloat16": the autocast dtype ("auto" resolved)
    compile: bool       # torch.compile ("auto" resolved)

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()

    def on_rank0(self, fn):
        """fn() on rank 0, which alone writes in out_dir and talks to wandb; its HcgptError is raised on every
        rank (a rank left waiting in a collective would hang). -> fn's result on rank 0, else None."""
        result, verdict = None, [None]
        if self.master:
            try:
                result = fn()
            except HcgptError as e:
                verdict = [e]
        if self.ddp:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise verdict[0]
        return result

    def check_same(self, values, what):
        """values (a dict) must be equal on every rank: a DistributedSetupError on every rank naming the keys that
        differ, e.g. two nodes launched with different flags (they would otherwise hang or fail inside DDP)."""
        if not self.ddp:
            return
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, values)
        for rank, theirs in enumerate(everyone):
            differ = sorted(k for k in values.keys() | theirs.keys() if everyone[0].get(k) != theirs.get(k))
            if differ:
                shown = "; ".join(f"{k}: {everyone[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}"
                                  for k in differ[:5])
                raise DistributedSetupError(f"the ranks were started with different settings in {what} ({shown}"
                                            f"{'; ...' if len(differ) > 5 else ''}); launch every node with the "
                                            f"same config file and flags")

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def resolve(device_type, dtype, compile):
    """dtype and compile with "auto" decided for device_type."""
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dtype, (device_type == "cuda") if compile == "auto" else compile


def start(sc):
    """The Runtime of a training process for SystemConfig sc: CUDA checked when asked for, torchrun's
    process group joined (one process without RANK)."""
    if sc.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use --device=cpu or --device=auto")
    cuda = sc.device == "cuda" or (sc.device == "auto" and torch.cuda.is_available())
    device_type = "cuda" if cuda else "cpu"
    if device_type == "cpu":
        keep_freed_memory()
    ddp, rank, local_rank, world_size, device = rendezvous.join(device_type)
    return Runtime(ddp, rank, local_rank, world_size, device, device_type, *resolve(device_type, sc.dtype, sc.compile))


def for_script(device, dtype):
    """The Runtime of a script's --device (auto, cpu, cuda, cuda:N) and --dtype; torchrun's group joined."""
    device = check_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        keep_freed_memory()
    ddp, rank, local_rank, world_size, ddp_device = rendezvous.join(device_type)
    return Runtime(ddp, rank, local_rank, world_size, ddp_device if ddp else device, device_type,
                   *resolve(device_type, dtype, False))


def check_device(device):
    """--device value -> a device this machine has ("auto": cuda if present, else cpu); ConfigError otherwise."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() "
                              f"is False); use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    return device


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
