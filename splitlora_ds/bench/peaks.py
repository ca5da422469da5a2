"""Peak dense bf16 tensor-core TFLOP/s of known accelerators: the denominator of MFU.

Vendor figures without structured sparsity. NVIDIA's datasheets print the H100/H200 bf16 peaks
with 2:4 sparsity ("1,979*" for H100 SXM and H200 SXM, "1,513*" for H100 PCIe, "1,671*" for the
NVL cards); the dense peak is half of that. A100: 312 dense (624 sparse, A100 datasheet).
L40S: 362.05 dense (733 sparse, L40S datasheet). RTX 4090: 165.2 dense with FP32 accumulate
(Ada Lovelace architecture whitepaper, appendix). Matched by substring of
torch.cuda.get_device_name(), most specific first ("H100 PCIe" before "H100").
"""

from __future__ import annotations

from typing import Optional

import torch

# (substring of the device name, dense bf16 TFLOP/s, what that entry is)
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756.5, "H100 PCIe"),
    ("H100 NVL", 835.5, "H100 NVL"),
    ("H100", 989.5, "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.5, "H200 NVL"),
    ("H200", 989.5, "H200 SXM"),  # also GH200 (same Hopper GPU and clocks)
    ("A100", 312.0, "A100"),  # SXM and PCIe alike
    ("L40S", 362.05, "L40S"),
    ("RTX 4090", 165.2, "GeForce RTX 4090"),
)


def table_peak(device_name: str, dtype: torch.dtype) -> Optional[tuple[float, str]]:
    """(TFLOP/s, entry) for a bf16 run on a tabled device; None otherwise (the table holds bf16
    peaks only: an fp32 run's peak is a different, lower figure)."""
    if dtype != torch.bfloat16:
        return None
    lowered = device_name.lower()
    for needle, tflops, label in PEAK_BF16_DENSE_TFLOPS:
        if needle.lower() in lowered:
            return tflops, label
    return None
