"""Which aggregation strategy a rank runs, from plain facts about the run (no recipe, no Prepared):
the trainer calls `build_aggregator` once, at the same point on every rank, and hands the result
to the engine, which calls `aggregate_` at every AverageAdapters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from ..topology import Groups, Role
from .exchange import LowRankExchange, LowRankSetup
from .fedavg import FedAvg
from .private import Private
from .secure import SecureFedAvg
from .secure_lowrank import SecureLowRankExchange
from .strategy import Aggregator

if TYPE_CHECKING:
    from ..privacy.dp import ClientPrivacy


def build_aggregator(role: Role, clients: int, groups: Groups, stage: nn.Module, client_weights: Sequence[float],
                     staging: Optional[torch.device], *, averages: bool, lowrank: Optional[LowRankSetup] = None,
                     secure: bool = False, privacy: Optional["ClientPrivacy"] = None) -> Optional[Aggregator]:
    """This rank's strategy, or None where it never aggregates.

    `clients`: the client count; `client_weights`: every client's FedAvg weight n_c / sum(n)
    (`fedavg.sample_weights`); `staging`: where collective buffers travel from (host memory under
    gloo); `averages`: whether the mode averages client adapters at all (split and fedlora; not
    sequential, which hands adapters over, nor centralized); `lowrank`: set when the run aggregates
    through the heterogeneous exchange (hetero.setup's ClientSetup.exchanges); `secure`:
    federation.secure_aggregation; `privacy`: this client's DP mechanisms (its update clipping
    and noise wrap the FedAvg sum).

    Secure aggregation's key agreement is a collective: every client (and, under the low-rank
    exchange, server stage 0 when it holds shared blocks) must call this together.
    """
    update_dp = privacy is not None and privacy.cfg.update_clip is not None
    if lowrank is not None and update_dp:
        # Config refuses this combination (config.py); reaching here is a bug.
        raise ValueError(f"privacy.update_clip={privacy.cfg.update_clip}: supports FedAvg of equal ranks and "
                         f"split points, not the low-rank exchange (method {lowrank.method!r})")
    if not averages or clients < 2:
        return None  # no AverageAdapters in the schedule
    takes_part = groups.aggregation is not None if lowrank is not None else role.is_client
    if not takes_part:
        return None  # server stages (stage 0 joins the low-rank exchange when it holds shared blocks)
    if len(client_weights) != clients:
        raise ValueError(f"client_weights: need one per client ({clients}), got {list(client_weights)}")
    if lowrank is not None:
        client = role.index if role.is_client else None
        if secure:  # its key agreement: a collective of the whole aggregation group
            return SecureLowRankExchange.for_participant(stage, client, lowrank, list(client_weights),
                                                         groups.aggregation, staging)
        return LowRankExchange.for_participant(stage, client, lowrank, list(client_weights), groups.aggregation)
    weight = client_weights[role.index]
    inner: Aggregator
    if secure:
        inner = SecureFedAvg(role.index, groups.clients, clients, weight, staging)
    else:
        inner = FedAvg(weight, groups.clients, staging)
    return Private(inner, privacy, weight) if update_dp else inner
