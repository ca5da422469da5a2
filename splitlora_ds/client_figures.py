"""Per-client TensorBoard figures that stay readable for many clients.

Up to PER_CLIENT_TAGS clients, each gets its own tags (client<i>/loss, client<i>/tokens). With
more (logical clients: federation.clients may be 100 or 1000), a step's participants are
summarised instead: clients/loss_min, _max, _mean, _std and clients/active; after every round,
clients/participations_min, _max (how many rounds each client has taken part in so far) and
clients/participated (how many clients have taken part at least once).
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

PER_CLIENT_TAGS = 16


def step_client_figures(client_loss: Sequence[float], client_tokens: Sequence[int],
                        client_ids: Sequence[Optional[int]], num_clients: int) -> dict[str, float]:
    """`client_loss`/`client_tokens` per slot (a client, or a client rank with logical clients),
    `client_ids[i]`: the client slot i trained this step (None: none)."""
    trained = [(cid, loss, tokens) for cid, loss, tokens in zip(client_ids, client_loss, client_tokens)
               if cid is not None and tokens]  # a sequential server serves one client per step
    if num_clients <= PER_CLIENT_TAGS:
        values: dict[str, float] = {}
        for cid, loss, tokens in trained:
            values[f"client{cid}/loss"] = loss
            values[f"client{cid}/tokens"] = tokens
        return values
    if not trained:
        return {}
    losses = [loss for _, loss, _ in trained]
    return {"clients/active": len(trained), "clients/loss_min": min(losses), "clients/loss_max": max(losses),
            "clients/loss_mean": statistics.fmean(losses),
            "clients/loss_std": statistics.pstdev(losses) if len(losses) > 1 else 0.0}


def participation_figures(participations: Sequence[int]) -> dict[str, float]:
    """After a round: how often the clients have taken part so far."""
    return {"clients/participations_min": min(participations), "clients/participations_max": max(participations),
            "clients/participated": sum(1 for p in participations if p)}
