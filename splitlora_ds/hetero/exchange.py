"""The collective side of heterogeneous aggregation: every participant (the clients, and server
stage 0 for the blocks it holds on behalf of clients that cut earlier) gathers every other
participant's factors and computes its own new ones with `aggregation.aggregate`.

Participants may hold different modules and ranks, so the factors travel as an all_gather of
Python objects (CPU tensors), not as one flat all-reduce. Every participant runs the same
deterministic arithmetic on the same gathered inputs, so shared results agree across ranks.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .aggregation import Factors, aggregate

# peft's parameter names: "<module>.lora_A.default.weight" (Linear, Conv1D) or
# "<module>.lora_embedding_A.default" (Embedding, whose update is (B A)^T: the same arithmetic).
_A = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?A\.default(?P<w>\.weight)?$")


def lora_modules(stage: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
    """{module name: (A, B, scaling)} of every trainable LoRA adapter in `stage`."""
    params = dict(stage.named_parameters())
    modules = dict(stage.named_modules())
    out = {}
    for name, p in params.items():
        m = _A.match(name)
        if m is None or not p.requires_grad:
            continue
        b_name = f"{m['module']}.lora_{m['emb'] or ''}B.default{m['w'] or ''}"
        out[m["module"]] = (p, params[b_name], float(modules[m["module"]].scaling["default"]))
    return out


def layer_of(module: str) -> int:
    """The global layer index in a stage's module name ("layers.3.block.attn.c_attn" -> 3)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
        raise ValueError(f"not a stage module name: {module!r}")
    return int(parts[1])


def participant_weights(modules: Mapping[str, object], client: Optional[int], client_weights: list[float],
                        entry_layers: list[int]) -> dict[str, float]:
    """Each module's aggregation weight for one participant: a client's is its FedAvg weight;
    server stage 0's copy of layer i speaks for every client whose rows run it (entry <= i).
    Weights over the holders of one module add up to 1."""
    if client is not None:
        return {m: client_weights[client] for m in modules}
    return {m: sum(w for w, e in zip(client_weights, entry_layers) if e <= layer_of(m)) for m in modules}


@torch.no_grad()
def exchange_(stage: nn.Module, weights: Mapping[str, float], modules: set[str], method: str,
              group: Optional[dist.ProcessGroup]) -> int:
    """Aggregate the adapters of `modules` with every participant of `group`, in place.
    Returns the bytes of this participant's own adapters (what it uploads, and downloads back)."""
    own = {name: v for name, v in lora_modules(stage).items() if name in modules}
    mine = {name: (A.detach().cpu(), B.detach().cpu(), scale, weights[name]) for name, (A, B, scale) in own.items()}
    gathered: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=group)
    me = dist.get_rank(group)
    nbytes = 0
    for name, (A, B, _scale) in own.items():
        holders = [(i, g[name]) for i, g in enumerate(gathered) if name in g]
        total = sum(h[3] for _, h in holders)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"aggregation of {name}: its holders' weights add up to {total:.6f}, not 1")
        parts = [Factors(a, b, s) for _, (a, b, s, _w) in holders]
        new = aggregate(parts, [h[3] for _, h in holders], method)[[i for i, _ in holders].index(me)]
        A.copy_(new.A.to(A.dtype))
        B.copy_(new.B.to(B.dtype))
        nbytes += A.numel() * A.element_size() + B.numel() * B.element_size()
    return nbytes
