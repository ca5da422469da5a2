"""A micro-batch's buffer: what the executor's instructions read and write for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..stage import SharedBlockGrad
from .packing import PackPlan


@dataclass
class MicroBatch:
    """One micro-batch on one rank. `x` is the stage's input on the compute device: token ids on
    a rank that embeds, hidden states elsewhere. The bookkeeping lives on the host, where the data
    loader and the wire deliver it, so that deciding what to compute never waits for the device:
    `mask` holds segment ids (0 = padding; see models.base.causal_context), `targets` the
    next-token target of every position (-100: none; None on a U-shaped split's server, which
    never sees them), `owner` the client each position belongs to (-1: padding)."""

    x: torch.Tensor
    mask: torch.Tensor
    targets: Optional[torch.Tensor]
    owner: torch.Tensor
    leaves: list[torch.Tensor] = field(default_factory=list)  # received activations; their grads go back
    plan: Optional[PackPlan] = None  # how the received sources were packed into `x`
    source_clients: list[int] = field(default_factory=list)  # the client index of each leaf's source
    row_entry: Optional[torch.Tensor] = None  # heterogeneous split points (see Stage.forward)
    shared_grad: Optional[SharedBlockGrad] = None
    output: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    grad_output: Optional[torch.Tensor] = None
    # U-shaped split. Server: each position's flat index in its client's own micro-batch (-1:
    # padding), and per client the positions of its rows in client order (what its tail gets; on
    # the device, where they index the output).
    origin: Optional[torch.Tensor] = None
    tail_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    # Client: the server's output for its rows (a leaf: its gradient goes back) and the logits.
    tail_input: Optional[torch.Tensor] = None
    tail_output: Optional[torch.Tensor] = None
    device_mask: Optional[torch.Tensor] = None  # `mask` on the compute device (what the model reads)

    @property
    def real_tokens(self) -> int:
        """Real (non-padding) positions, counted on the host."""
        return int((self.mask > 0).sum())

    @property
    def empty(self) -> bool:
        """No real token to compute (a short last batch split into more micro-batches than rows,
        or a client whose validation shard ran out)."""
        return self.x.shape[0] == 0 or self.real_tokens == 0
