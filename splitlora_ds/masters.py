"""The full-precision copies ("masters") an optimizer keeps of low-precision adapters.

In a bf16 run DeepSpeed's optimizer wrapper updates fp32 masters and copies them, rounded, into
the bf16 parameters the model computes with. Anything that writes adapters from outside the
optimizer (FedAvg, the heterogeneous exchange, the sequential hand-over) must read and write the
masters, and then the parameters: averaging the bf16 copies and refreshing the masters from them
would round every adapter to bf16 at every aggregation.

Supported: plain torch optimizers (fp32: the parameter is its own master), DeepSpeed's
FP16_UnfusedOptimizer (bf16 with torch's optimizers, the default here: `fp16_groups` /
`fp32_groups` of parameters) and FP16_Optimizer (bf16 with FusedAdam: one flat fp32 buffer per
group, parameters laid end to end).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def adapter_masters(optimizer, params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """{name: the tensor the optimizer updates for params[name]} (the parameter itself in fp32)."""
    by_id: dict[int, torch.Tensor] = {}
    low = getattr(optimizer, "fp16_groups", None)
    if low is not None and hasattr(optimizer, "fp32_groups_flat"):
        for group, flat in zip(low, optimizer.fp32_groups_flat):
            offset = 0
            for p in group:
                by_id[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
                offset += p.numel()
    elif low is not None and hasattr(optimizer, "fp32_groups"):
        for group, high in zip(low, optimizer.fp32_groups):
            for p, master in zip(group, high):
                by_id[id(p)] = master
    out = {}
    for name, p in params.items():
        master = by_id.get(id(p), p)
        if master.shape != p.shape:
            raise RuntimeError(f"{name}: the optimizer's master copy is {tuple(master.shape)}, the parameter "
                               f"{tuple(p.shape)}")
        out[name] = master
    return out


@torch.no_grad()
def copy_masters_to_params_(masters: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
    """After the masters were written: the parameters take their (rounded) values."""
    for name, p in params.items():
        master = masters[name]
        if master is not p:
            p.copy_(master)


def reset_optimizer_state_(optimizer) -> None:
    """Forget every moment the optimizer keeps (Adam's m and v, momentum), through DeepSpeed's
    wrappers: a logical client's participation starts with a fresh optimizer, as a new client's
    would. Parameters, masters and the LR schedule are left as they are."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.state.clear()
        optimizer = getattr(optimizer, "optimizer", None)
