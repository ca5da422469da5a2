"""FLOP counting with torch's FlopCounterMode, completed for the CPU attention kernel.

torch's FlopCounterMode knows the CUDA attention kernels (flash, efficient, cuDNN) but not the CPU
one sdpa dispatches to, so on the CPU it would count no attention at all. CPU_ATTENTION_FLOPS maps
that kernel to torch's own attention formulas; pass it as `custom_mapping`.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = MappingProxyType({
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
})
