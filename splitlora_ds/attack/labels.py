"""Label inference in the U-shaped split, from the server's position.

The server sent the client's tail its output y and got back g = dL/dy, computed from the client's
targets. It recomputes the tail with the base weights and moves y a little against g: the logits
that grow most are those of the tokens the loss pushed up, the targets. Per position, the argmax of
J(-g), where J is the Jacobian of the tail's logits at y (a Jacobian-vector product; here a central
difference, which needs nothing of the attention kernel). At depth 0 (norm and head only) J g
is J J^T (p - onehot): its argmax is the target whenever the head's rows are not too alike.
At depth 0 the positions with a target are exactly those whose gradient is not zero (prompt
positions have none); deeper, attention carries later positions' loss back to earlier ones, so
the guess of which positions are targets is rough there (the `positions_found` figure).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base_model import BaseModel
from .inversion import padded

_STEP = 1e-3  # the difference step, relative to the size of y


@torch.no_grad()
def infer_targets(base: BaseModel, tail_layers: int, tail_inputs: Sequence[torch.Tensor],
                  tail_grads: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: (the inferred target token at every position [n], whether the position has a
    target [n] bool, judged from the gradient)."""
    y, mask = padded(tail_inputs)
    g, _ = padded(tail_grads)
    real = mask.bool()
    score_index = real.flatten().nonzero().squeeze(1)
    # per sample, a step of _STEP times y's size along -g
    g_norm = g.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, 1, 1)
    y_norm = y.flatten(1).norm(dim=1).view(-1, 1, 1)
    u = -g / g_norm * y_norm * _STEP
    up = base.tail(y + u, mask, tail_layers, score_index)
    down = base.tail(y - u, mask, tail_layers, score_index)
    guess = (up - down).argmax(-1)
    has_target = g[real].norm(dim=-1) > 0
    lengths = mask.sum(1).tolist()
    return list(zip(guess.split(lengths), has_target.split(lengths)))
