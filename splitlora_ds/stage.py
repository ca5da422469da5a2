"""A stage: the layers of one role (a slice of the model's layer list) with their LoRA adapters.

Only the stage's own layers are ever built. Base weights and adapters are initialised from
per-layer seeds, so a layer comes out identical whichever rank builds it: all clients start from
the same adapters, and the split model starts exactly where the centralized one does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class SharedBlockGrad:
    """Heterogeneous split points: how server stage 0's copies of shared blocks weigh each row.

    A block that some clients hold and the server runs for the others (the clients that cut
    earlier) is aggregated over its holders; for every client's data to count by its FedAvg weight
    w_c there, the server's copy must train on sum_c (w_c / W_i) x (client c's mean token loss),
    W_i being the weight of the clients whose rows run block i. The step's loss is the mean over
    all N tokens, so a row of client c carries N w_c / N_c of that (`row_scale`), divided by W_i
    per block (`layer_weight`). Only the block's own parameters see the rescaled gradient: the
    gradient passed down to earlier layers and to the clients is unchanged."""

    row_scale: torch.Tensor  # [rows], in the rows' given order: N w_c / N_c for the row's client c
    layer_weight: dict[int, float]  # block index -> W_i


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies each row's gradient by `scale` [rows]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


def _rescaled(layer: nn.Module, x: torch.Tensor, ctx: dict, scale: torch.Tensor) -> torch.Tensor:
    """layer(x) whose parameters see each row's gradient times `scale`, while the gradient to x is
    the plain one (rows are independent in a transformer block, so the two scalings cancel there)."""
    return _ScaleGrad.apply(layer(_ScaleGrad.apply(x, 1.0 / scale), ctx), scale)


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
                score_index: Optional[torch.Tensor] = None,
                row_entry: Optional[torch.Tensor] = None,
                shared_grad: Optional[SharedBlockGrad] = None,
                part: Optional[str] = None) -> torch.Tensor:
        """`score_index`: flat (batch x time) positions the head projects (see
        models.base.scored_positions); None: every position, logits [B, T, V].

        `part` (a U-shaped client, whose layers are not contiguous): "bottom" runs the embeddings
        and first blocks, "tail" the last blocks and the head; None runs every layer.

        `row_entry` (heterogeneous split points, a CPU tensor): per row, the layer index its
        activations enter at; a row skips this stage's layers before that (its client ran them).
        Rows are sorted by entry inside, so the rows running a layer are always a prefix, and put
        back in their given order as soon as every row is in; outputs come back in the input's
        row order. The row counts are worked out on the CPU: no device sync per layer.
        `shared_grad`: the gradient rule for blocks some rows skip (see SharedBlockGrad)."""
        if part is not None:
            if part not in ("bottom", "tail"):
                raise ValueError(f"part: {part!r} is not 'bottom' or 'tail'")
            ctx = self._context(attention_mask, score_index)
            run = self.plan.bottom_layers if part == "bottom" else self.plan.tail_layers
            for index in run:
                x = self.layers[str(index)](x, ctx)
            return x
        if row_entry is None or int(row_entry.max()) <= self.plan.start:
            ctx = self._context(attention_mask, score_index)
            for layer in self.layers.values():
                x = layer(x, ctx)
            return x
        order = torch.argsort(row_entry, stable=True)
        entry = row_entry[order].tolist()
        restore = torch.argsort(order).to(x.device, non_blocking=True)  # queued: the host does not wait
        order = order.to(x.device, non_blocking=True)
        x, mask = x[order], attention_mask[order]
        row_scale = shared_grad.row_scale[order] if shared_grad is not None else None
        contexts: dict[int, dict] = {}
        sorted_rows = True
        for index, layer in self.layers.items():
            n = sum(e <= int(index) for e in entry)
            if sorted_rows and n == x.shape[0]:
                # every row is in: back to the given order (the head's score_index refers to it)
                x = x[restore]
                mask, sorted_rows = attention_mask, False
                contexts.clear()
            if n == 0:
                continue  # no rows have entered yet (a client with an empty evaluation batch)
            if n not in contexts:
                contexts[n] = self._context(mask[:n], score_index)
            if n == x.shape[0]:
                x = layer(x, contexts[n])
            elif row_scale is not None:  # a shared block: some clients hold their own copy
                scale = row_scale[:n] / shared_grad.layer_weight[int(index)]
                x = torch.cat([_rescaled(layer, x[:n], contexts[n], scale), x[n:]])
            else:
                x = torch.cat([layer(x[:n], contexts[n]), x[n:]])
        return x[restore] if sorted_rows else x

    def _context(self, attention_mask: torch.Tensor, score_index: Optional[torch.Tensor]) -> dict:
        ctx = self.context(attention_mask, self.compute_dtype)
        if score_index is not None:
            ctx["score_index"] = score_index
        return ctx

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
                pretrained: Optional[str] = None, rank: Optional[int] = None) -> Stage:
    """`rank`: this role's LoRA rank (heterogeneous clients); default lora.rank (the server's rank
    when lora.rank is a per-client list)."""
    specs = family.layer_specs(hf_config)
    if rank is None:
        rank = lora.rank if isinstance(lora.rank, int) else lora.server_rank_or_default()
    targets = lora.target_modules or list(family.default_target_modules)
    layers = {}
    pinned = 0
    # lora.fused_qkv: the fused projection carries one rank-r block per adapted slice.
    multiplier = ({family.fused_qkv_module: len(lora.fused_qkv)}
                  if lora.fused_qkv is not None and family.fused_qkv_module else None)
    for i in plan.layers:
        layer, _ = build_lora_layer(specs[i], seed, rank=rank, alpha=lora.alpha, dropout=lora.dropout,
                                    target_modules=targets, fan_in_fan_out=family.fan_in_fan_out,
                                    rank_multiplier=multiplier, rank_pattern=lora.rank_pattern)
        if pretrained is not None:  # base weights only; the adapters keep their seeded init
            load_layer_weights(layer, specs[i], pretrained)
        if lora.fused_qkv is not None:
            pinned += family.restrict_fused_qkv(layer, hf_config, rank, lora.fused_qkv)
        layers[i] = layer
    stage = Stage(plan, layers, family.make_context(hf_config), hf_config.hidden_size)
    stage.pinned_adapter_entries = pinned
    if not stage.adapter_parameters():
        raise ConfigError(f"lora.target_modules: {targets} match no module in {plan.name} "
                          f"({plan.describe()}); every stage needs at least one adapted module")
    return stage
