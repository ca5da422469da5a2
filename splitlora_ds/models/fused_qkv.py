"""LoRA on a fused q|k|v projection that adapts only some of its slices.

GPT-2's `c_attn` computes q, k and v with one matrix (outputs [q | k | v], each `hidden` wide).
The LoRA paper adapts only q and v there, each slice with its own rank-r pair (A_s, B_s) (loralib's
MergedLinear). The same update is a standard peft LoRA on `c_attn` of rank n*r (n kept slices,
alpha scaled by n so alpha/r is unchanged) whose B is block-diagonal:

    A = [A_q; A_v]          (2r x in)          delta W = (alpha / r) * B A
    B = [[B_q, 0],          (3 hidden x 2r)            = (alpha / r) * [B_q A_q; 0; B_v A_v]
         [0,   0],
         [0,   B_v]]

Checkpoints and exported adapters stay plain PEFT. The off-block entries of B start at zero and a
gradient hook keeps their gradient zero, so no optimizer (SGD, Adam, AdamW's decoupled decay) and
no FedAvg ever moves them. The hook reads the pinned entries from a (non-persistent) buffer of the
lora_B module at call time, never from a tensor it captured: buffers follow `.to(device)`, a
captured tensor would stay on the CPU and fail against a CUDA gradient.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

SLICES = ("q", "k", "v")
PINNED_BUFFER = "fused_qkv_pinned"  # bool [3*hidden, n*r] on lora_B: True where B stays zero


def block_mask(hidden: int, rank: int, keep: Sequence[str]) -> torch.Tensor:
    """[3*hidden, len(keep)*rank] bool: True where B may be non-zero."""
    mask = torch.zeros(3 * hidden, len(keep) * rank, dtype=torch.bool)
    for j, s in enumerate(keep):
        i = SLICES.index(s)
        mask[i * hidden:(i + 1) * hidden, j * rank:(j + 1) * rank] = True
    return mask


def restrict_fused_qkv(layer: nn.Module, module_suffix: str, hidden: int, rank: int, keep: Sequence[str]) -> int:
    """Pin B of every adapted `*module_suffix` in `layer` to the block layout above (the module
    must carry rank len(keep)*rank); returns the number of pinned entries (trainable in name only)."""
    pinned = 0
    for name, module in layer.named_modules():
        if not (name == module_suffix or name.endswith("." + module_suffix)) or not hasattr(module, "lora_B"):
            continue
        for lora_b in module.lora_B.values():
            weight = lora_b.weight  # [3 * hidden, n * r]: output rows in q | k | v order
            expected = (3 * hidden, len(keep) * rank)
            if tuple(weight.shape) != expected:
                raise ValueError(f"{name}: lora_B is {tuple(weight.shape)}, expected {expected}")
            pinned_entries = ~block_mask(hidden, rank, keep).to(weight.device)
            with torch.no_grad():
                weight.masked_fill_(pinned_entries, 0.0)
            lora_b.register_buffer(PINNED_BUFFER, pinned_entries, persistent=False)
            weight.register_hook(partial(_zero_pinned_grad, lora_b))
            pinned += weight.numel() - len(keep) * hidden * rank  # counted, not summed: works on meta
    return pinned


def _zero_pinned_grad(lora_b: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(getattr(lora_b, PINNED_BUFFER), 0.0)
