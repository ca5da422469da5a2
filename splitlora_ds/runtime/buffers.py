"""A micro-batch's buffer: what the executor's instructions read and write for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..stage import SharedBlockGrad
from .packing import PackPlan


@dataclass
class MicroBatch:
    """One micro-batch on one rank. `x` is the stage's input: token ids on a rank that embeds,
    hidden states elsewhere. `mask` holds segment ids (0 = padding; see models.base.causal_context),
    `targets` the next-token target of every position (-100: none), `owner` the client each
    position belongs to (-1: padding)."""

    x: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    leaves: list[torch.Tensor] = field(default_factory=list)  # received activations; their grads go back
    plan: Optional[PackPlan] = None  # how the received sources were packed into `x`
    source_clients: list[int] = field(default_factory=list)  # the client index of each leaf's source
    row_entry: Optional[torch.Tensor] = None  # heterogeneous split points (see Stage.forward)
    shared_grad: Optional[SharedBlockGrad] = None
    output: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    grad_output: Optional[torch.Tensor] = None

    @property
    def empty(self) -> bool:
        """No real token to compute (a short last batch split into more micro-batches than rows,
        or a client whose validation shard ran out)."""
        return self.x.shape[0] == 0 or not bool((self.mask > 0).any())
