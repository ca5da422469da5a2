"""Measuring a step function: its FLOPs, its time per call on CPU or CUDA, and peak memory."""

from __future__ import annotations

import resource
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..flops import CPU_ATTENTION_FLOPS

def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call, as run_summary does it: torch's FlopCounterMode counts the matmuls and
    attention kernels that actually run, forward and backward (elementwise ops are not counted;
    attention is counted dense, T x T, as the masked kernels compute it)."""
    counter = FlopCounterMode(display=False, custom_mapping=dict(CPU_ATTENTION_FLOPS))
    with counter:
        step()
    return int(counter.get_total_flops())


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per call for `steps` calls after `warmup` untimed ones.

    CUDA kernels run asynchronously, so a host clock around the call would time the launches,
    not the work. Each call is bracketed by CUDA events on the current stream instead, and the
    device is synchronized before the first timed call (warm-up work finished) and before the
    events are read. On the CPU the work is done when the call returns: perf_counter."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000.0 for start, end in events]  # ms -> s
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak since reset_peak_memory (weights
    included, as they stay allocated), or on the CPU the process's peak resident set since it
    started (ru_maxrss, KiB on Linux), which also holds the interpreter and libraries."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (ru_maxrss)"
