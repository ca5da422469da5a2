"""Budgets to split points and ranks: each client gets the most blocks its compute share and memory
allow, then the largest LoRA rank that still fits (pure functions, no processes).

Memory of a client stage with k blocks at rank r (bytes):
  weights      (embedding + k blocks) x weight_bytes
  adapters     trainable LoRA parameters x 16 (fp32 value, gradient, Adam's two moments)
  activations  k x batch x seq x hidden x (34 + 5 heads seq / hidden) x act_bytes / 2
               (per-block activation memory of a transformer layer, Korthikanti et al. 2022,
               "Reducing Activation Recomputation in Large Transformer Models", eq. 1, in 16-bit)
U-shaped split (split.client_tail_layers m): the client also holds the last m blocks (weights,
adapters at its rank, activations, as above, so k + m blocks in all), the final norm and the LM
head (weights, and adapters where the targets match them), and the logits:
  logits       batch x seq x vocab x (act_bytes + 4): the head's output in the compute dtype and the
               fp32 log-probabilities the loss keeps for the backward (runtime.loss upcasts to fp32).
               An upper bound: only the positions with a target are projected (scored_positions).
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
    # The head (final norm + LM head), what a U-shaped client holds besides its blocks. A tied
    # LM head (GPT-2) is no saving here: models/ build it as its own frozen copy of the embedding
    # matrix, so a client holding both keeps the vocab x hidden weights twice.
    head_params: int
    lora_params_per_rank_head: int
    vocab: int


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


def client_memory(costs: ModelCosts, work: Workload, k: int, rank: int,
                  tail_layers: Optional[int] = None) -> dict[str, float]:
    """Estimated bytes of a client with k blocks at rank `rank`; `tail_layers` m (U-shaped split,
    None: standard) adds the last m blocks, the head and the logits. "logits" is 0 without a head."""
    blocks = k + (tail_layers or 0)
    head = tail_layers is not None
    weights = (costs.embed_params + blocks * costs.block_params + head * costs.head_params) * work.weight_bytes
    lora = costs.lora_params_per_rank_embed + blocks * costs.lora_params_per_rank_block
    adapters = rank * (lora + head * costs.lora_params_per_rank_head) * ADAPTER_BYTES_PER_PARAM
    s, h = work.seq_len, costs.hidden
    activations = blocks * work.batch_size * s * h * (34 + 5 * costs.heads * s / h) * work.act_bytes / 2
    logits = head * work.batch_size * s * costs.vocab * (work.act_bytes + 4)
    return {"weights": weights, "adapters": adapters, "activations": activations, "logits": logits,
            "total": weights + adapters + activations + logits}


def plan_clients(costs: ModelCosts, work: Workload, memory_gb: Sequence[Optional[float]],
                 flops: Sequence[Optional[float]], max_layers: int, max_rank: int,
                 tail_layers: Optional[int] = None) -> list[ClientPlan]:
    """One (k, r) per client within its budget; ConfigError naming the client when none fits.
    `tail_layers` (split.client_tail_layers): every client also holds the last m blocks and the head."""
    tail = tail_layers or 0
    if not 1 <= max_layers < costs.num_blocks - tail:
        raise ConfigError(f"split.client_layers: {max_layers} is out of range for a {costs.num_blocks}-block model"
                          + (f" whose clients keep the last {tail} (split.client_tail_layers)" if tail else ""))
    known = [f for f in flops if f is not None]
    fastest = max(known) if known else None
    plans = []
    for c, (mem, f) in enumerate(zip(memory_gb, flops)):
        k_cap = max_layers if f is None else max(1, math.floor(max_layers * f / fastest))
        r_cap = max_rank if f is None else max_rank * f / fastest
        ranks = [r for r in rank_choices(max_rank) if r <= r_cap] or [1]
        fits = [(k, r) for k in range(k_cap, 0, -1) for r in reversed(ranks)
                if mem is None or client_memory(costs, work, k, r, tail_layers)["total"] <= mem * GB]
        if not fits:
            raise ConfigError(_too_small(c, mem, costs, work, tail_layers))
        k = fits[0][0]  # the most blocks that fit, then the largest rank at that k
        r = max(r for kk, r in fits if kk == k)
        plans.append(ClientPlan(k, r, client_memory(costs, work, k, r, tail_layers)["total"]))
    return plans


def _too_small(c: int, mem: float, costs: ModelCosts, work: Workload, tail_layers: Optional[int]) -> str:
    """Why client c's memory budget holds no plan: the smallest client and what it needs."""
    need = client_memory(costs, work, 1, 1, tail_layers)
    held = "the embeddings plus 1 block"
    if tail_layers is not None:
        last = f"the last {tail_layers} block{'s' if tail_layers != 1 else ''}, " if tail_layers else ""
        held += f", {last}the final norm and LM head (split.client_tail_layers={tail_layers})"
    logits = (f", logits {need['logits'] / GB:.2f} ({work.batch_size} x {work.seq_len} x {costs.vocab} vocab)"
              if tail_layers is not None else "")
    return (f"federation.budgets[{c}]: memory_gb {mem:g} cannot hold {held} at rank 1 "
            f"(needs {need['total'] / GB:.2f} GB: weights {need['weights'] / GB:.2f}, adapters and optimizer "
            f"{need['adapters'] / GB:.2f}, activations {need['activations'] / GB:.2f} at batch {work.batch_size} "
            f"x {work.seq_len} tokens{logits})")


def describe(plans: Sequence[ClientPlan], memory_gb: Sequence[Optional[float]], flops: Sequence[Optional[float]],
             tail_layers: Optional[int] = None) -> str:
    lines = ["client  budget                     blocks  rank  estimated memory"]
    for c, (p, mem, f) in enumerate(zip(plans, memory_gb, flops)):
        budget = ", ".join(x for x in (f"{mem:g} GB" if mem is not None else "", f"{f:g}x FLOP/s" if f is not None else "") if x)
        lines.append(f"client{c:<2} {budget:<26} {p.client_layers:>6}  {p.rank:>4}  {p.memory_bytes / GB:.3f} GB")
    if tail_layers is not None:  # the blocks column counts the bottom blocks only
        tail = f"the last {tail_layers} block{'s' if tail_layers != 1 else ''}, " if tail_layers else ""
        lines.append(f"every client also holds {tail}the final norm and LM head (split.client_tail_layers="
                     f"{tail_layers}); the estimated memory includes them and the logits")
    return "\n".join(lines)
