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
    client_sum: torch.Tensor  # [clients] each client's summed token loss (detached)
    client_tokens: torch.Tensor  # [clients] each client's scored tokens

    @property
    def tokens(self) -> int:
        return int(self.client_tokens.sum())


def token_loss(logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, clients: int,
               label_smoothing: float = 0.0) -> TokenLoss:
    """`logits` [N, V] for the N positions with a target (targets != IGNORE, in flat order), or
    [B, T, V] for every position; `targets` and `owner` (the client of each position) [B, T]."""
    scored = targets != IGNORE
    if logits.dim() == 3:
        logits = logits[scored]
    losses = F.cross_entropy(logits.float(), targets[scored], reduction="none", label_smoothing=label_smoothing)
    who = owner[scored]
    client_sum = torch.zeros(clients, dtype=torch.float64, device=losses.device)
    client_sum.index_add_(0, who, losses.detach().double())
    client_tokens = torch.bincount(who, minlength=clients)
    return TokenLoss(losses.sum(), client_sum, client_tokens)
