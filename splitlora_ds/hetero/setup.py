"""Each client's split point and rank, the server's rank and the aggregation method, resolved once
from the recipe (explicit per-client lists, or budgets through the planner) and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import RunConfig
from ..errors import ConfigError
from ..models.lora import _matches, adaptable_modules
from .planner import ModelCosts, Workload, describe, plan_clients


@dataclass(frozen=True)
class ClientSetup:
    client_layers: tuple[int, ...]
    client_ranks: tuple[int, ...]
    server_rank: int
    aggregation: str  # fedavg | stacked | zero_pad (auto resolved)
    plan_text: Optional[str] = None  # the planner's table when budgets chose the values

    @property
    def shared_blocks(self) -> bool:
        """Some blocks are held by clients and, for others, by server stage 0."""
        return len(set(self.client_layers)) > 1

    @property
    def exchanges(self) -> bool:
        """Aggregation goes through the heterogeneous exchange, not the one flat all-reduce."""
        return self.shared_blocks or len(set(self.client_ranks)) > 1 or self.aggregation != "fedavg"


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise TypeError(type(module).__name__)


def model_costs(family, hf_config, target_modules: list[str]) -> ModelCosts:
    """Parameter and LoRA counts of the embedding, one block and the head, built on the meta device."""
    specs = family.layer_specs(hf_config)
    with torch.device("meta"):
        embed, block, head = specs[0].build(), specs[1].build(), specs[-1].build()

    def lora_per_rank(layer: nn.Module) -> int:
        modules = dict(layer.named_modules())
        return sum(sum(_dims(modules[n])) for n in adaptable_modules(layer)
                   if any(_matches(n, t) for t in target_modules))

    def params(layer: nn.Module) -> int:
        return sum(p.numel() for p in layer.parameters())

    return ModelCosts(family.num_blocks(hf_config), params(embed), params(block), lora_per_rank(embed),
                      lora_per_rank(block), hf_config.hidden_size, hf_config.num_attention_heads,
                      head_params=params(head), lora_params_per_rank_head=lora_per_rank(head),
                      vocab=hf_config.vocab_size)


def resolve_setup(cfg: RunConfig, family, hf_config, ds_config: dict) -> ClientSetup:
    """`ds_config`: the run's DeepSpeed config (bf16/fp16 halve the planner's weight bytes)."""
    c = cfg.federation.clients
    weight_bytes = 2 if any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16")) else 4
    lora, split, fed = cfg.lora, cfg.split, cfg.federation
    plan_text = None
    if fed.budgets is not None:
        targets = lora.target_modules or list(family.default_target_modules)
        work = Workload(cfg.train.batch_size, cfg.data.max_length, weight_bytes, weight_bytes)
        mem = [b.memory_gb for b in fed.budgets]
        flops = [b.flops for b in fed.budgets]
        plans = plan_clients(model_costs(family, hf_config, targets), work, mem, flops,
                             max_layers=split.client_layers, max_rank=lora.rank, tail_layers=split.client_tail_layers)
        layers, ranks = tuple(p.client_layers for p in plans), tuple(p.rank for p in plans)
        plan_text = describe(plans, mem, flops, split.client_tail_layers)
    else:
        layers = tuple(split.per_client(c))
        ranks = tuple(lora.client_rank(i) for i in range(c))
    server_rank = lora.server_rank if lora.server_rank is not None else max(ranks)
    # The holders of one module: the clients that hold its layer, and server stage 0 when the
    # layer is shared. fedavg needs one rank among them.
    holder_ranks = set(ranks) | ({server_rank} if len(set(layers)) > 1 else set())
    method = fed.aggregation
    replans = cfg.importance.replan_threshold is not None  # ranks then change during the run
    if method == "auto":
        method = "fedavg" if len(holder_ranks) == 1 and not replans else "stacked"
    elif method == "fedavg" and len(holder_ranks) > 1:
        raise ConfigError(f"federation.aggregation: fedavg averages factors of one rank, but adapters are held at "
                          f"ranks {sorted(holder_ranks)}; use stacked (exact) or zero_pad (HetLoRA)")
    if lora.fused_qkv is not None and len(holder_ranks) > 1:
        raise ConfigError(f"lora.fused_qkv: {lora.fused_qkv} needs one LoRA rank on every holder of a module, but "
                          f"adapters are held at ranks {sorted(holder_ranks)} (set lora.server_rank to "
                          f"{max(ranks)} or drop it)")
    return ClientSetup(layers, ranks, server_rank, method, plan_text)


def setup_from_dict(d: dict) -> ClientSetup:
    """The inverse of dataclasses.asdict (checkpoints record the setup the run trained with)."""
    return ClientSetup(tuple(d["client_layers"]), tuple(d["client_ranks"]), d["server_rank"], d["aggregation"],
                       d.get("plan_text"))
