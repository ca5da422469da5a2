"""What one micro-batch's activations carry between ranks, per topology: the wire format in one
place (runtime/executor.py builds and reads it; tests/test_wire_audit.py checks it in real runs).

    standard split (the server computes the loss)
      client -> server stage 0     hidden, mask, targets, counts
      server stage -> next stage   hidden, mask, targets, owner, counts
    U-shaped split (each client computes its own loss)
      client -> server stage 0     hidden, mask
      server stage -> next stage   hidden, mask, owner, origin

`hidden` [rows, length, H] floats; `mask` the rows' segment ids (models.base.causal_context:
it reveals every sequence's length); `targets` the next-token target of each position (the
client's text); `counts` [clients] the step's target tokens per client (the loss is a mean over
all of them); `owner` each position's client and `origin` its flat place in that client's
micro-batch (the server's own bookkeeping: a client's rows are all its own, so neither leaves
it). Gradients and the U-shaped tail's activations travel as one float tensor each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_FORMATS = {
    # (u_shaped, from a client) -> the fields on the wire, in order
    (False, True): ("hidden", "mask", "targets", "counts"),
    (False, False): ("hidden", "mask", "targets", "owner", "counts"),
    (True, True): ("hidden", "mask"),
    (True, False): ("hidden", "mask", "owner", "origin"),
}


@dataclass
class Activations:
    hidden: torch.Tensor
    mask: torch.Tensor
    targets: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    owner: Optional[torch.Tensor] = None
    origin: Optional[torch.Tensor] = None

    @staticmethod
    def format(u_shaped: bool, from_client: bool) -> tuple[str, ...]:
        return _FORMATS[(u_shaped, from_client)]

    def to_wire(self, u_shaped: bool, from_client: bool) -> list[torch.Tensor]:
        names = self.format(u_shaped, from_client)
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"activations to send lack {missing}")
        return [getattr(self, n) for n in names]

    @classmethod
    def from_wire(cls, tensors: list[torch.Tensor], u_shaped: bool, from_client: bool) -> "Activations":
        names = cls.format(u_shaped, from_client)
        if len(tensors) != len(names):
            raise ValueError(f"an activation bundle of {len(tensors)} tensors; this topology sends {names}")
        return cls(**dict(zip(names, tensors)))

