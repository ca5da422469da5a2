"""FedAvg: pure functions over state dicts, their all-reduce form, and the `FedAvg` strategy.

The pure functions define the arithmetic and are tested against hand-computed numbers; the
collective form computes the same weighted sum across the client group in one all-reduce.
`broadcast_` (one rank's adapters to every client) lives here for the same flat-buffer reason.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def sample_weights(sample_counts: Sequence[int]) -> list[float]:
    """FedAvg weights n_c / sum(n)."""
    if not sample_counts or any(n < 0 for n in sample_counts) or sum(sample_counts) == 0:
        raise ValueError(f"sample counts must be non-negative with a positive sum, got {list(sample_counts)}")
    total = float(sum(sample_counts))
    return [n / total for n in sample_counts]


def fedavg(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_c w_c * state_c, key by key; every state dict must hold the same keys and shapes."""
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError(f"need one weight per state dict, got {len(state_dicts)} and {len(weights)}")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            raise ValueError(f"state dict {i} holds other keys than state dict 0")
    out = {}
    for k in keys:
        acc = torch.zeros_like(state_dicts[0][k], dtype=torch.float32)
        for sd, w in zip(state_dicts, weights):
            acc += w * sd[k].float()
        out[k] = acc.to(state_dicts[0][k].dtype)
    return out


@torch.no_grad()
def allreduce_weighted_average_(tensors: Sequence[torch.Tensor], weight: float,
                                group: Optional[dist.ProcessGroup],
                                staging: Optional[torch.device] = None) -> None:
    """In place on every member of `group`: t <- sum_c weight_c * t_c (fp32 accumulation).

    One flat buffer, one all-reduce: every member ends with bit-identical tensors. `staging` is
    the device the buffer travels from (host memory under gloo; default: the tensors' device).
    """
    if not tensors:
        return
    flat = _flatten_dense_tensors([t.float().to(staging or t.device) for t in tensors])
    flat.mul_(weight)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for t, avg in zip(tensors, _unflatten_dense_tensors(flat, list(tensors))):
        t.copy_(avg.to(t.dtype))


def flat_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of `tensors` laid end to end (what one transfer of them costs)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], src: int, group: Optional[dist.ProcessGroup],
               staging: Optional[torch.device] = None) -> None:
    """In place on every member of `group`: t <- t on global rank `src`, in one broadcast."""
    if not tensors:
        return
    flat = _flatten_dense_tensors([t.detach().to(staging or t.device) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    for t, value in zip(tensors, _unflatten_dense_tensors(flat, list(tensors))):
        t.copy_(value)


class FedAvg:
    """Weighted averaging of equal-shaped client adapters: one all-reduce in the client group.
    `weight`: this client's n_c / sum(n); `staging`: where the flat buffer travels from (host
    memory under gloo)."""

    setup_bytes = (0, 0)

    def __init__(self, weight: float, group: Optional[dist.ProcessGroup], staging: Optional[torch.device] = None):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"FedAvg weight must be in [0, 1], got {weight}")
        self.weight = weight
        self.group = group
        self.staging = staging

    def aggregate_(self, masters: dict[str, torch.Tensor]) -> int:
        tensors = list(masters.values())
        allreduce_weighted_average_(tensors, self.weight, self.group, self.staging)
        # Counted as a FedAvg server would see it: each client uploads its adapters once.
        return flat_nbytes(tensors)
