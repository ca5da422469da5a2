"""Aggregation with logical clients (federation/participation.py): a client rank trains several
clients one after another in a round, so what it brings to the round's aggregation is all of
its participants, not one set of adapters. The executor tells the strategy about each
participation as it ends (`participated`) and asks for the round's aggregate at its end
(`aggregate_round_`).

- FedAvgRound: each rank adds w_c x adapters_c over its participants (w_c: client c's weight
  among the round's participants) and the wrapped FedAvg (or secure FedAvg) at weight 1 sums the
  ranks' shares: the round's FedAvg over its K participants.
- LowRankRound (heterogeneous device classes: a rank's class is its split point and rank): every
  participant's factors go into the low-rank exchange as a participant of its own, so `stacked`
  stays exact; a rank with no participant this round takes part with weight 0, to receive the
  new global adapters of its class; server stage 0 speaks for its copies of the shared blocks
  with the weight of the round's participants that cut earlier.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .exchange import exchange_entries_, layer_of, lora_modules
from .lowrank import factor_names
from .participation import RoundPlan
from .pool import ClientPool
from .strategy import Aggregator


class FedAvgRound:
    def __init__(self, inner: Aggregator):
        self.inner = inner
        self.setup_bytes = inner.setup_bytes
        self.sums: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def participated(self, client: int, masters: dict[str, torch.Tensor], weight: float) -> None:
        if self.sums is None:
            self.sums = [torch.zeros_like(m, dtype=torch.float32) for m in masters.values()]
        for share, m in zip(self.sums, masters.values()):
            share.add_(m.float(), alpha=weight)

    @torch.no_grad()
    def aggregate_round_(self, masters: dict[str, torch.Tensor], plan: RoundPlan) -> int:
        for i, m in enumerate(masters.values()):  # a rank without participants brings zeros
            m.copy_(self.sums[i] if self.sums is not None else torch.zeros_like(m))
        self.sums = None
        return self.inner.aggregate_(masters)


class LowRankRound:
    def __init__(self, stage: nn.Module, method: str, group: Optional[dist.ProcessGroup], pool: ClientPool,
                 shared_layers: Optional[set[int]] = None):
        """`shared_layers`: server stage 0's, the blocks it holds for clients that cut earlier
        (None: a client rank)."""
        self.stage, self.method, self.group, self.pool = stage, method, group, pool
        self.shared_layers = shared_layers
        self.setup_bytes = (0, 0)
        self.entries: list[tuple[dict, float]] = []  # (factor state, weight) per participation

    def _modules(self) -> dict[str, tuple]:
        modules = lora_modules(self.stage)
        if self.shared_layers is not None:
            modules = {m: v for m, v in modules.items() if layer_of(m) in self.shared_layers}
        return modules

    def _state(self, masters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = factor_names(dict(self.stage.named_parameters()))
        return {k: masters[k].detach().float().cpu().clone() for m in self._modules() for k in keys[m]}

    def participated(self, client: int, masters: dict[str, torch.Tensor], weight: float) -> None:
        self.entries.append((self._state(masters), weight))

    def aggregate_round_(self, masters: dict[str, torch.Tensor], plan: RoundPlan) -> int:
        modules = self._modules()
        scales = {m: scale for m, (_a, _b, scale) in modules.items()}
        if self.shared_layers is not None:
            # server stage 0: its copy of block i trained on the rows of the participants that cut
            # before i, so it speaks with their weight
            entry = {c: self.pool.participation.client_class[c][0] + 1 for c in plan.sampled}
            weights = {m: sum(self.pool.weight(c, plan) for c in plan.sampled if entry[c] <= layer_of(m))
                       for m in modules}
            own = [(self._state(masters), weights, scales)]
        elif self.entries:
            own = [(state, {m: w for m in modules}, scales) for state, w in self.entries]
        else:  # no participant this round: take part with weight 0, to receive the new adapters
            own = [(self._state(masters), {m: 0.0 for m in modules}, scales)]
        self.entries = []
        nbytes = exchange_entries_(own, self.method, self.group, masters)
        return 0 if self.shared_layers is not None else nbytes
