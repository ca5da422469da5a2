"""Budgets to split points and ranks: each client gets the most blocks its compute share and memory
allow, then the largest LoRA rank that still fits (pure functions, no processes).

Memory of a client stage with k blocks at rank r (bytes):
  weights      (embedding + k blocks) x weight_bytes
  adapters     trainable LoRA parameters x 16 (fp32 value, gradient, Adam's two moments)
  activations  k x batch x seq x hidden x (34 + 5 heads seq / hidden) x act_bytes / 2
               (per-block activation memory of a transformer layer, Korthikanti et al. 2022,
               "Reducing Activation Recomputation in Large Transformer Models", eq. 1, in 16-bit)
Compute: a client with relative FLOP/s f gets at most max(1, floor(k_max f / f_fastest)) blocks
and a rank of at most max_rank f / f_fastest (the largest choice below it, at least 1), so slow
clients hold fewer blocks and smaller adapters and the round does not wait on them.
An estimate, not a measurement: peak RSS also holds the framework itself (see bench.targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import ConfigError

GB = 1e9
ADAPTER_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class ModelCosts:
    """What the planner needs to know of a model (see `model_costs`)."""

    num_blocks: int
    embed_params: int
    block_params: int
    lora_params_per_rank_embed: int  # trainable LoRA parameters per unit of rank in the embedding
    lora_params_per_rank_block: int  # ... in one block
    hidden: int
    heads: int


@dataclass(frozen=True)
class Workload:
    batch_size: int
    seq_len: int
    weight_bytes: int = 4  # per base weight (4: fp32, 2: bf16/fp16)
    act_bytes: int = 4


@dataclass(frozen=True)
class ClientPlan:
    client_layers: int
    rank: int
    memory_bytes: float


def rank_choices(max_rank: int) -> list[int]:
    """Powers of two below `max_rank`, and `max_rank` itself."""
    return sorted({2 ** i for i in range(int(math.log2(max_rank)) + 1) if 2 ** i < max_rank} | {max_rank})


def client_memory(costs: ModelCosts, work: Workload, k: int, rank: int) -> dict[str, float]:
    weights = (costs.embed_params + k * costs.block_params) * work.weight_bytes
    adapters = rank * (costs.lora_params_per_rank_embed + k * costs.lora_params_per_rank_block) * ADAPTER_BYTES_PER_PARAM
    s, h = work.seq_len, costs.hidden
    activations = k * work.batch_size * s * h * (34 + 5 * costs.heads * s / h) * work.act_bytes / 2
    return {"weights": weights, "adapters": adapters, "activations": activations,
            "total": weights + adapters + activations}


def plan_clients(costs: ModelCosts, work: Workload, memory_gb: Sequence[Optional[float]],
                 flops: Sequence[Optional[float]], max_layers: int, max_rank: int) -> list[ClientPlan]:
    """One (k, r) per client within its budget; ConfigError naming the client when none fits."""
    if not 1 <= max_layers < costs.num_blocks:
        raise ConfigError(f"split.client_layers: {max_layers} is out of range for a {costs.num_blocks}-block model")
    known = [f for f in flops if f is not None]
    fastest = max(known) if known else None
    plans = []
    for c, (mem, f) in enumerate(zip(memory_gb, flops)):
        k_cap = max_layers if f is None else max(1, math.floor(max_layers * f / fastest))
        r_cap = max_rank if f is None else max_rank * f / fastest
        ranks = [r for r in rank_choices(max_rank) if r <= r_cap] or [1]
        fits = [(k, r) for k in range(k_cap, 0, -1) for r in reversed(ranks)
                if mem is None or client_memory(costs, work, k, r)["total"] <= mem * GB]
        if not fits:
            need = client_memory(costs, work, 1, 1)
            raise ConfigError(
                f"federation.budgets[{c}]: memory_gb {mem:g} cannot hold the embeddings plus 1 block at rank 1 "
                f"(needs {need['total'] / GB:.2f} GB: weights {need['weights'] / GB:.2f}, adapters and optimizer "
                f"{need['adapters'] / GB:.2f}, activations {need['activations'] / GB:.2f} at batch {work.batch_size} "
                f"x {work.seq_len} tokens)")
        k = fits[0][0]  # the most blocks that fit, then the largest rank at that k
        r = max(r for kk, r in fits if kk == k)
        plans.append(ClientPlan(k, r, client_memory(costs, work, k, r)["total"]))
    return plans


def describe(plans: Sequence[ClientPlan], memory_gb: Sequence[Optional[float]], flops: Sequence[Optional[float]]) -> str:
    lines = ["client  budget                     blocks  rank  estimated memory"]
    for c, (p, mem, f) in enumerate(zip(plans, memory_gb, flops)):
        budget = ", ".join(x for x in (f"{mem:g} GB" if mem is not None else "", f"{f:g}x FLOP/s" if f is not None else "") if x)
        lines.append(f"client{c:<2} {budget:<26} {p.client_layers:>6}  {p.rank:>4}  {p.memory_bytes / GB:.3f} GB")
    return "\n".join(lines)
