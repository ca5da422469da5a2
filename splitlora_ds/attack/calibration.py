"""Clip bounds for the DP settings, measured on public text at the base weights.

A DP clip that no sample reaches adds noise for nothing; one that every sample exceeds throws the
signal away. The usual choice is near the median per-sample norm of what is clipped, and that is
what the attack settings use (the user's own recipe may of course set any bound):
- activations at split point k: each sample's cut-layer activations (privacy.activation_clip);
- the tail gradient at depth m: each sample's gradient of the client's loss with respect to what
  the server sends its tail (privacy.tail_gradient_clip), with the loss a training step computes
  (summed token cross-entropy over the batch's target tokens, divided by their number).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.examples import IGNORE_INDEX
from ..runtime.packing import next_token_targets
from .base_model import BaseModel
from .inversion import padded


@torch.no_grad()
def activation_norm(base: BaseModel, rows: Sequence[torch.Tensor], k: int, batch: int = 32) -> float:
    """The median per-sample L2 norm of the base bottom's activations at split point k."""
    norms = []
    for i in range(0, len(rows), batch):
        ids, mask = padded(rows[i:i + batch])
        hidden = base.bottom(ids, mask, k) * mask.unsqueeze(-1)
        norms.append(hidden.flatten(1).norm(dim=1))
    return float(torch.cat(norms).median())


def tail_gradient_norm(base: BaseModel, ids_rows: Sequence[torch.Tensor], label_rows: Sequence[torch.Tensor],
                       tail_layers: int, batch_size: int, label_smoothing: float, batches: int = 16) -> float:
    """The median per-sample L2 norm of the tail's gradient at depth m, batches of `batch_size`."""
    start = base.num_blocks + 1 - tail_layers  # the first tail layer
    norms = []
    for i in range(0, min(len(ids_rows), batches * batch_size), batch_size):
        ids, mask = padded(ids_rows[i:i + batch_size])
        labels, _ = padded(label_rows[i:i + batch_size], IGNORE_INDEX)
        targets = next_token_targets(labels, mask)
        scored = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        with torch.no_grad():
            y = base.run(ids, mask, range(0, start))
        y.requires_grad_(True)
        logits = base.tail(y, mask, tail_layers, scored)
        loss = torch.nn.functional.cross_entropy(logits, targets.flatten()[scored], reduction="sum",
                                                 label_smoothing=label_smoothing) / max(len(scored), 1)
        (grad,) = torch.autograd.grad(loss, y)
        norms.append((grad * mask.unsqueeze(-1)).flatten(1).norm(dim=1))
    return float(torch.cat(norms).median())
