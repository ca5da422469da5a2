"""Which device each rank computes on and which backend the job talks over, decided before the
first collective (and before DeepSpeed picks its accelerator).

A host's facts: how many ranks its launch started (`LOCAL_SIZE` from the deepspeed launcher,
`LOCAL_WORLD_SIZE` from torchrun) and how many GPUs it sees. NCCL needs one GPU per rank: two
ranks on one device are refused ("Duplicate GPU detected"), so a host with more ranks than GPUs
never gets nccl. With `dist.backend: auto` such a host runs all its ranks on the CPU (and says so
in one line); `gloo` lets its ranks share the GPUs (tensors travel through host memory); `nccl`
is refused in one line naming the launch and the GPU count.

Each host decides its ranks' devices alone; the job's backend is then agreed by every rank
(`agree_backend`, through the rendezvous store): nccl only when every rank of every host is on
a GPU, gloo otherwise (CPU-only client machines and a GPU server in one job).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """One rank's device, and the note its host prints once (empty: nothing to say)."""

    device: torch.device
    backend: str  # the recipe's dist.backend: auto, gloo or nccl (the job's is agreed later)
    note: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def plan_device(backend: str, local_rank: int, local_size: int, gpus: int) -> Placement:
    """This rank's device from its host's facts (pure; `gpus`: the GPUs this host sees)."""
    if gpus == 0:
        if backend == "nccl":
            raise ConfigError("dist.backend: nccl needs a GPU per rank, but this host sees no GPU; "
                              "use dist.backend: auto or gloo to run on the CPU")
        return Placement(torch.device("cpu"), backend)
    if local_size <= gpus:
        return Placement(torch.device("cuda", local_rank), backend)
    if backend == "nccl":
        raise ConfigError(
            f"dist.backend: nccl needs one GPU per rank, but this host's launch started {local_size} ranks "
            f"(--num_gpus {local_size}) and it sees {gpus} GPU(s): launch --num_gpus {gpus} per host with a "
            f"recipe that fits, or set dist.backend: gloo (ranks share the GPUs) or auto (the CPU)")
    if backend == "gloo":
        return Placement(torch.device("cuda", local_rank % gpus), backend,
                         f"this host runs {local_size} ranks on {gpus} GPU(s): they share them over gloo "
                         "(dist.backend: gloo), tensors travel through host memory")
    return Placement(torch.device("cpu"), backend,
                     f"this host runs {local_size} ranks but sees {gpus} GPU(s): all its ranks use the CPU "
                     f"with gloo (dist.backend: auto never puts two ranks on one GPU); launch --num_gpus {gpus} "
                     "to use the GPUs, or set dist.backend: gloo to let the ranks share them")


def agree_backend(backend: str, device_types: Sequence[str]) -> str:
    """The job's backend from every rank's device type (pure): nccl needs every rank on a GPU."""
    if backend != "auto":
        return backend
    return "nccl" if device_types and all(t == "cuda" for t in device_types) else "gloo"


def local_launch() -> tuple[int, int]:
    """(local rank, ranks this host's launch started): deepspeed sets LOCAL_SIZE, torchrun
    LOCAL_WORLD_SIZE; a launch that sets neither is taken to be all of WORLD_SIZE on this host."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    size = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE", "1")
    return local_rank, max(int(size), local_rank + 1)


def visible_gpus() -> int:
    """GPUs this process sees (0 without CUDA): the one place the count is read, so tests can fake it."""
    return torch.cuda.device_count()


def place_this_rank(backend: str) -> Placement:
    """Decide this rank's device; on a host whose GPUs go unused, make DeepSpeed use the CPU too."""
    local_rank, local_size = local_launch()
    gpus = visible_gpus()
    placement = plan_device(backend, local_rank, local_size, gpus)
    if gpus and not placement.on_gpu:
        use_cpu_accelerator()
    if placement.note and local_rank == 0:
        # One write: ranks of several hosts may share a console.
        sys.stdout.flush()
        os.write(1, f"[splitlora_ds] {placement.note}\n".encode())
    return placement


def use_cpu_accelerator() -> None:
    """DeepSpeed moves engines to its accelerator's device: make that the CPU on a host with GPUs.
    The environment variable serves a DeepSpeed not imported yet; an imported one is switched."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    if "deepspeed.accelerator" in sys.modules:
        from deepspeed.accelerator import get_accelerator, set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        if get_accelerator().device_name() != "cpu":
            set_accelerator(CPU_Accelerator())
