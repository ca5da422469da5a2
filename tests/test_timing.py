"""Instruction timings on CUDA wait for the device, so each instruction is charged its own work."""

import torch

from splitlora_ds.timing import InstructionClock


def test_cuda_clock_synchronises_the_device_before_reading_time(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    clock = InstructionClock(torch.device("cuda", 1))
    t0 = clock.now()
    t1 = clock.now()
    assert synced == [torch.device("cuda", 1)] * 2 and t1 >= t0


def test_cpu_clock_never_touches_cuda(monkeypatch):
    def fail(device=None):
        raise AssertionError("no CUDA call on a CPU rank")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    clock = InstructionClock(torch.device("cpu"))
    assert clock.now() <= clock.now()
