"""torchrun's rendezvous, with a deadline: every rank meets the others within $HCGPT_RENDEZVOUS_TIMEOUT
seconds (default 300) or the run ends in one line naming the ranks that did not come (torch's own env://
rendezvous waits its 30-minute collective timeout and names no one).

    torchrun_env   (rank, local_rank, world_size, master_addr, master_port), or None for one process
    rendezvous     the process group's TCPStore once every rank has joined it
    join           the process group (nccl on CUDA, gloo on CPU) and this rank's device
"""

import os
import socket
import time

import torch
import torch.distributed as dist

from common import env_seconds
from errors import DistributedSetupError

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_TIMEOUT_ENV = "HCGPT_RENDEZVOUS_TIMEOUT"  # seconds every rank waits for the others at start
RENDEZVOUS_TIMEOUT = 300.0


def torchrun_env():
    """(rank, local_rank, world_size, master_addr, master_port) from torchrun's variables, or None
    without RANK (one process); DistributedSetupError naming what is missing or wrong."""
    env = {k: os.environ.get(k) for k in TORCHRUN_ENV}
    if env["RANK"] in (None, "", "-1"):
        if env["WORLD_SIZE"] not in (None, "", "1"):   # a launcher's environment without RANK: not one process
            raise DistributedSetupError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but RANK is not (LOCAL_RANK="
                                        f"{env['LOCAL_RANK']}): this process would train alone; launch with torchrun "
                                        f"(which sets RANK), or unset WORLD_SIZE to run one process")
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


def join(device_type):
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
