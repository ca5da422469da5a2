"""A stage: the layers of one role (a slice of the model's layer list) with their LoRA adapters.

Only the stage's own layers are ever built. Base weights and adapters are initialised from
per-layer seeds, so a layer comes out identical whichever rank builds it: all clients start from
the same adapters, and the split model starts exactly where the centralized one does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safetensors.torch import save_file

from .checkpoint import atomic_write
from .config import LoraConfig
from .models import ModelFamily
from .errors import ConfigError
from .models.lora import build_lora_layer
from .models.weights import load_layer_weights
from .partition import StagePlan


class Stage(nn.Module):
    def __init__(self, plan: StagePlan, layers: dict[int, nn.Module], context: nn.Module, hidden_size: int):
        super().__init__()
        self.plan = plan
        self.hidden_size = hidden_size
        # Keyed by the global layer index so parameter names are the same on every rank and in
        # the centralized model ("layers.3.block.attn.c_attn.lora_A.default.weight").
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
        self.context = context
        self.pinned_adapter_entries = 0  # adapter entries held at zero (lora.fused_qkv)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor,
                score_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`score_index`: flat (batch x time) positions the head projects (see
        models.base.scored_positions); None: every position, logits [B, T, V]."""
        ctx = self.context(attention_mask, self.compute_dtype)
        if score_index is not None:
            ctx["score_index"] = score_index
        for layer in self.layers.values():
            x = layer(x, ctx)
        return x

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, trainable parameters), pinned adapter entries not counted as trainable."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.adapter_parameters().values()) - self.pinned_adapter_entries
        return total, trainable


def save_adapters(stage: Stage, out_dir: str, role_name: str) -> str:
    """Write the stage's LoRA tensors to `out_dir/<role>.safetensors` (keys carry global layer
    indices, so client and server files together hold exactly the centralized model's adapters)."""
    os.makedirs(out_dir, exist_ok=True)
    path = Path(out_dir) / f"{role_name}.safetensors"
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in stage.adapter_parameters().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return str(path)


def build_stage(family: ModelFamily, hf_config, plan: StagePlan, lora: LoraConfig, seed: int,
                pretrained: Optional[str] = None) -> Stage:
    specs = family.layer_specs(hf_config)
    targets = lora.target_modules or list(family.default_target_modules)
    layers = {}
    pinned = 0
    # lora.fused_qkv: the fused projection carries one rank-r block per adapted slice.
    multiplier = ({family.fused_qkv_module: len(lora.fused_qkv)}
                  if lora.fused_qkv is not None and family.fused_qkv_module else None)
    for i in plan.layers:
        layer, _ = build_lora_layer(specs[i], seed, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                    target_modules=targets, fan_in_fan_out=family.fan_in_fan_out,
                                    rank_multiplier=multiplier)
        if pretrained is not None:  # base weights only; the adapters keep their seeded init
            load_layer_weights(layer, specs[i], pretrained)
        if lora.fused_qkv is not None:
            pinned += family.restrict_fused_qkv(layer, hf_config, lora.rank, lora.fused_qkv)
        layers[i] = layer
    stage = Stage(plan, layers, family.make_context(hf_config), hf_config.hidden_size)
    stage.pinned_adapter_entries = pinned
    if not stage.adapter_parameters():
        raise ConfigError(f"lora.target_modules: {targets} match no module in {plan.name} "
                          f"({plan.describe()}); every stage needs at least one adapted module")
    return stage
