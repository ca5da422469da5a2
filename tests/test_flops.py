"""summary.json FLOPs include attention on the CPU too (torch's counter misses the CPU kernel)."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from splitlora_ds.run_summary import RunSummary


def test_run_summary_counts_cpu_attention_forward_and_backward():
    b, h, t, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return SimpleNamespace(positions=b * t)

    summary = RunSummary("server0", "split")
    summary.count_flops(step)
    summary.add_step(1.0, 1.0, 0, b * t)
    summary.finish(torch.device("cpu"))
    forward = 2 * 2 * b * h * t * t * d  # QK^T and PV, dense T x T as the kernel computes them
    assert summary.flops_per_step == forward * 3.5  # forward + backward (5 matmuls: 2.5x forward)
