"""Joining the job: the rendezvous store, the backend every rank agrees on, the process group.

The store is torch's own TCPStore at MASTER_ADDR:MASTER_PORT (what `env://` would build), made
here so that the ranks can agree on a backend through it before the process group exists (see
placement.py), and so that a rank that fails can leave its cause there for the others
(failures.FailureBoard). torchrun's agent may already host the store: then rank 0 joins it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .placement import Placement, agree_backend
from .topology import env_world


@dataclass
class Rendezvous:
    store: dist.Store  # the job's key-value store, prefixed for this run (and torchrun restart)
    rank: int
    world: int
    backend: str  # what the process group talks over: nccl or gloo
    device: torch.device  # where this rank computes
    timeout_s: float
    store_address: tuple[str, int]  # where the store listens (MASTER_ADDR, MASTER_PORT)


def join(placement: Placement, timeout_s: float) -> Rendezvous:
    """Meet every rank, agree on the backend, start torch.distributed and DeepSpeed's comm.

    A single process without launcher variables still gets a 1-rank world (mode=centralized), so
    the same DeepSpeed engine code serves both modes.
    """
    rank, world, _ = env_world()
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    timeout = timedelta(seconds=timeout_s)
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    root = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    # A torchrun restart meets in the same store: its keys must not see the last attempt's.
    store = dist.PrefixStore(f"splitlora_ds/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", root)
    if placement.on_gpu:
        torch.cuda.set_device(placement.device)
    store.set(f"device/{rank}", placement.device.type)
    types = [store.get(f"device/{r}").decode() for r in range(world)]
    backend = agree_backend(placement.backend, types)
    kwargs = {"device_id": placement.device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=timeout, **kwargs)
    _start_deepspeed_comm(backend, timeout)
    return Rendezvous(store, rank, world, backend, placement.device, timeout_s,
                      (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))


def _start_deepspeed_comm(backend: str, timeout: timedelta) -> None:
    """deepspeed.comm over the process group just made (DeepSpeed sees it initialised and wraps it)."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-builds a shared-memory all-reduce op at init on CPU (~30 s of compiling per
    # fresh machine). It only speeds up large CPU all-reduces, which this job never does: our
    # collectives are adapter averages. Marking it incompatible makes DeepSpeed skip it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
