"""Roles, ranks and process groups of one split federated job.

World of W = C + S ranks: ranks 0..C-1 are clients (each holds the client stage), ranks
C..C+S-1 are the server's pipeline stages. The layout is plain data, checked before any
collective call so that a wrong launch fails with a clear message on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class Role:
    kind: str  # "client" | "server" | "centralized"
    index: int  # client index, or server stage index (0-based)
    rank: int

    @property
    def name(self) -> str:
        return "centralized" if self.kind == "centralized" else f"{self.kind}{self.index}"

    @property
    def is_client(self) -> bool:
        return self.kind == "client"

    @property
    def is_server(self) -> bool:
        return self.kind == "server"


@dataclass(frozen=True)
class Topology:
    clients: int
    server_stages: int

    @property
    def world_size(self) -> int:
        return self.clients + self.server_stages

    @property
    def client_ranks(self) -> list[int]:
        return list(range(self.clients))

    @property
    def server_ranks(self) -> list[int]:
        return list(range(self.clients, self.world_size))

    def server_rank(self, stage: int) -> int:
        return self.clients + stage

    def role_of(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        if rank < self.clients:
            return Role("client", rank, rank)
        return Role("server", rank - self.clients, rank)

    def check_world_size(self, world_size: int, clients_field: str = "federation.clients") -> None:
        """`clients_field`: what sets the client rank count (federation.client_ranks with logical
        clients), for the message."""
        if world_size != self.world_size:
            raise ConfigError(
                f"world size {world_size} != {clients_field} ({self.clients}) + "
                f"split.server_stages ({self.server_stages}) = {self.world_size}; "
                f"launch with `deepspeed --num_gpus {self.world_size} ...` or change the recipe")


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by the deepspeed launcher or torchrun; 0/1/0 alone."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


class SingleRankMPU:
    """The `mpu` handed to `deepspeed.initialize` so each rank's engine is its own data-parallel
    world: DeepSpeed must not average gradients across clients every step (FedAvg does that every
    I steps), and never across client and server ranks, whose parameters differ."""

    def __init__(self, group: dist.ProcessGroup, rank: int):
        self._group = group
        self._rank = rank

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._group

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [self._rank]

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


@dataclass
class Groups:
    clients: Optional[dist.ProcessGroup]  # the client ranks' all-reduce group (None off-group)
    own: dist.ProcessGroup  # this rank alone, for its DeepSpeed engine
    # Heterogeneous aggregation: the clients plus server stage 0 when it holds shared blocks,
    # else the client group (None off-group).
    aggregation: Optional[dist.ProcessGroup] = None
    # Global gradient clipping: a group per set of ranks that train together (None off-group).
    clip: dict[tuple[int, ...], Optional[dist.ProcessGroup]] = field(default_factory=dict)
    # Point-to-point metadata (headers, integer tensors) from host memory: a gloo group over every
    # rank beside an NCCL default group (comm.P2P); None where the default group is gloo already.
    meta: Optional[dist.ProcessGroup] = None


def make_groups(topology: Topology, rank: int, timeout: timedelta, server_aggregates: bool = False,
                clip_sets: Sequence[tuple[int, ...]] = (), host_channel: bool = False) -> Groups:
    """Create process groups; every rank must call this, in the same order, at the same time.

    The timeout is passed explicitly: new groups do not inherit the default group's timeout.
    `host_channel`: also make the gloo group over all ranks that carries point-to-point metadata
    through host memory (wanted when the default group's tensors live on the device: NCCL).
    """
    clients = dist.new_group(topology.client_ranks, timeout=timeout)
    own = None
    for r in range(topology.world_size):
        g = dist.new_group([r], timeout=timeout)
        if r == rank:
            own = g
    assert own is not None
    members = list(topology.client_ranks)
    aggregation = clients if rank in members else None
    if server_aggregates:
        members.append(topology.server_rank(0))
        group = dist.new_group(members, timeout=timeout)
        aggregation = group if rank in members else None
    clip = {}
    for ranks in clip_sets:
        group = dist.new_group(list(ranks), timeout=timeout)
        clip[tuple(ranks)] = group if rank in ranks else None
    meta = dist.new_group(backend="gloo", timeout=timeout) if host_channel else None
    return Groups(clients if rank in topology.client_ranks else None, own, aggregation, clip, meta)
