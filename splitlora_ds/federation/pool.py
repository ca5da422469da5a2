"""The logical clients a client rank may serve (federation.client_ranks < federation.clients, or
federation.clients_per_round < federation.clients): their FedAvg weights among each round's
participants, and a data stream per client made when the rank starts serving it.

A stream is made afresh for every participation and fast-forwarded to the batches the client has
consumed in earlier rounds (a pure function of the sampling; see participation.py), so a rank
holds one client's stream at a time whatever N is, and a client may run on another rank of its
class next round without anything being handed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..data.loader import ClientBatches
from .participation import Participation, RoundPlan


@dataclass
class ClientPool:
    participation: Participation
    sample_counts: Sequence[int]  # every logical client's training samples
    # client -> its stream at position 0 (tokenizes its shard); None on a server rank, which
    # needs only who trains when and their weights
    make_stream: Optional[Callable[[int], ClientBatches]] = None

    def weight(self, client: int, plan: RoundPlan) -> float:
        """FedAvg weight of `client` among the round's participants: n_c / sum of their n."""
        total = sum(self.sample_counts[c] for c in plan.sampled)
        return self.sample_counts[client] / total

    def slot_weight(self, client: int, plan: RoundPlan, slot: int) -> float:
        """`client`'s share among the clients trained in the same slot: its weight in the global
        gradient norm when they clip together (train.clip_scope: global)."""
        active = [plan.client_of(r, slot) for r in plan.active_ranks(slot)]
        return self.sample_counts[client] / sum(self.sample_counts[c] for c in active)

    def stream(self, client: int, round_index: int) -> ClientBatches:
        """`client`'s stream where its participation in round `round_index` starts."""
        if self.make_stream is None:
            raise RuntimeError("ClientPool.stream: this rank reads no client data (a server rank)")
        stream = self.make_stream(client)
        stream.skip_to(self.participation.consumed(client, round_index))
        return stream
