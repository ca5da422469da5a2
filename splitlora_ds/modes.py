"""One `Mode` per run mode: its rank layout, its main rank, who computes the loss, its schedule.

The rest of the code asks the mode instead of comparing the mode's name: a new mode is one class
here and one schedule class in runtime/schedules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from .federation.participation import Participation
from .runtime.schedules import SCHEDULES, Schedule
from .topology import Role, Topology


@dataclass(frozen=True)
class Mode:
    name: ClassVar[str]
    clients: int
    server_stages: int
    # U-shaped split (split.client_tail_layers): clients hold the head too and compute the loss.
    u_shaped: bool = False

    @property
    def layout(self) -> Topology:
        """The ranks this mode runs on."""
        return Topology(self.clients, self.server_stages)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def role_of(self, rank: int) -> Role:
        return self.layout.role_of(rank)

    @property
    def main_rank(self) -> int:
        """The rank that prints the run's progress and holds the job-wide loss: the role that
        computes the loss (the last server stage; client 0 when the clients compute it)."""
        return 0 if self.u_shaped else self.layout.world_size - 1

    def computes_loss(self, role: Role) -> bool:
        if self.u_shaped:
            return role.is_client
        return role.is_server and role.index == self.server_stages - 1

    @property
    def whole_model_clients(self) -> bool:
        """Every client holds the whole model and scores its own data (no server)."""
        return False

    @property
    def loss_on_clients(self) -> bool:
        """Each client scores its own data: the job-wide loss is the sum over the clients."""
        return self.whole_model_clients or self.u_shaped

    @property
    def serves_all_clients(self) -> bool:
        """Every client trains in each step (not one at a time)."""
        return True

    @property
    def averages_adapters(self) -> bool:
        """Client adapters are aggregated every I steps (FedAvg or the low-rank exchange)."""
        return False

    def schedule(self, aggregate_every: int, max_steps: int, micro_batches: int = 1,
                 server_aggregates: bool = False, clip_global: bool = False,
                 participation: Optional[Participation] = None) -> Schedule:
        return SCHEDULES[self.name](self.layout, aggregate_every, max_steps, micro_batches,
                                    server_aggregates, clip_global, self.u_shaped, participation)


@dataclass(frozen=True)
class Split(Mode):
    name: ClassVar[str] = "split"

    @property
    def averages_adapters(self) -> bool:
        return True


@dataclass(frozen=True)
class Sequential(Mode):
    name: ClassVar[str] = "sequential"

    @property
    def serves_all_clients(self) -> bool:
        return False


@dataclass(frozen=True)
class FedLoRA(Mode):
    name: ClassVar[str] = "fedlora"

    @property
    def layout(self) -> Topology:
        return Topology(self.clients, 0)

    @property
    def main_rank(self) -> int:
        return 0

    def computes_loss(self, role: Role) -> bool:
        return role.is_client

    @property
    def whole_model_clients(self) -> bool:
        return True

    @property
    def averages_adapters(self) -> bool:
        return True


@dataclass(frozen=True)
class Centralized(Mode):
    name: ClassVar[str] = "centralized"

    @property
    def layout(self) -> Topology:
        return Topology(1, 0)

    def role_of(self, rank: int) -> Role:
        return Role("centralized", 0, 0)

    @property
    def main_rank(self) -> int:
        return 0

    def computes_loss(self, role: Role) -> bool:
        return True


MODES: dict[str, type[Mode]] = {m.name: m for m in (Split, Sequential, FedLoRA, Centralized)}


def get_mode(name: str, clients: int, server_stages: int, u_shaped: bool = False) -> Mode:
    """`u_shaped` applies to the modes with a server (split, sequential); the others have no split."""
    mode = MODES[name]
    return mode(clients, server_stages, u_shaped and mode in (Split, Sequential))
