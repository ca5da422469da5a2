"""The training loss as a pure function: token cross-entropy over the scored positions, with
each client's share (for the client<i>/ figures)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.examples import IGNORE_INDEX as IGNORE  # a position that predicts nothing (prompt, padding, segment end)


@dataclass
class TokenLoss:
    total: torch.Tensor  # sum of the token losses (differentiable)
    client_sum: torch.Tensor  # [clients] each client's summed token loss (detached, where the logits are)
    client_tokens: torch.Tensor  # [clients] each client's scored tokens (where `targets` are)

    @property
    def tokens(self) -> int:
        return int(self.client_tokens.sum())


def token_loss(logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, clients: int,
               label_smoothing: float = 0.0) -> TokenLoss:
    """`logits` [N, V] for the N positions with a target (targets != IGNORE, in flat order), or
    [B, T, V] for every position; `targets` and `owner` (the client of each position) [B, T].

    Give `targets` and `owner` on the host (they are bookkeeping, known there before the forward):
    which positions are scored and how many tokens each client has are then worked out on the
    host, and the device only gathers and sums, without waiting for the host to read anything."""
    index = (targets.flatten() != IGNORE).nonzero().squeeze(1)  # the scored positions, in flat order
    if logits.dim() == 3:
        logits = logits.flatten(0, 1).index_select(0, index.to(logits.device, non_blocking=True))
    scored_targets, who = targets.flatten()[index], owner.flatten()[index]
    losses = F.cross_entropy(logits.float(), scored_targets.to(logits.device, non_blocking=True), reduction="none",
                             label_smoothing=label_smoothing)
    client_sum = torch.zeros(clients, dtype=torch.float64, device=losses.device)
    client_sum.index_add_(0, who.to(losses.device, non_blocking=True), losses.detach().double())
    client_tokens = torch.bincount(who, minlength=clients)
    return TokenLoss(losses.sum(), client_sum, client_tokens)
