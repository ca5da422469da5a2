"""A clock for instruction timings that stays true on GPUs.

CUDA kernels run asynchronously: the host returns from a forward long before the GPU is done,
and the time then surfaces in whatever instruction next waits on the device (the client's forward
in RecvGrads, the server's backward in SendGrads). Reading the clock after a device
synchronisation charges each instruction with its own work. On the CPU nothing is asynchronous,
so no synchronisation is needed.
"""

from __future__ import annotations

import time

import torch


class InstructionClock:
    def __init__(self, device: torch.device):
        self._cuda = device if device.type == "cuda" else None

    def now(self) -> float:
        """Seconds (perf_counter) once the work queued so far on this rank's device has finished."""
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        return time.perf_counter()
