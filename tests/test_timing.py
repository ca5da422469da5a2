"""Instruction timings: on CUDA each instruction is charged its own device time, read from events
recorded at its boundaries, with one wait for the device per timed span (not one per boundary);
on the CPU perf_counter at each boundary, and no CUDA call at all."""

import time

import pytest
import torch

from splitlora_ds.timing import EventClock, WallClock, instruction_clock


class _Event:
    """A CUDA event stand-in whose device timestamps the test chooses: `stamps` pops the time (ms)
    the device reaches the next recorded event. Completed only after a synchronize."""

    def __init__(self, log: list, stamps: list):
        self.log, self.stamps = log, stamps
        self.ms, self.done = None, False

    def record(self, stream=None):
        self.ms, self.done = self.stamps.pop(0), False
        self.log.append("record")

    def synchronize(self):
        self.log.append("synchronize")
        for e in _Event.all:
            e.done = True

    def elapsed_time(self, end):
        if not (self.done and end.done):
            raise RuntimeError("elapsed_time before both events completed")
        return end.ms - self.ms


@pytest.fixture
def events(monkeypatch):
    log, stamps = [], []
    _Event.all = []

    def make():
        e = _Event(log, stamps)
        _Event.all.append(e)
        return e

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("no device-wide synchronize"))
    return make, log, stamps


def test_cuda_clock_records_events_and_waits_once_per_span(events):
    make, log, stamps = events
    clock = EventClock(make_event=make)
    stamps += [0.0, 5.0, 7.0, 20.0, 26.0]  # ms: start, then four boundaries
    clock.start()
    clock.mark("Forward")
    clock.mark("SendActivations")
    clock.mark("Forward")
    clock.mark(None)  # an interval that belongs to nobody (observers)
    assert "synchronize" not in log  # marks never wait for the device
    timings = clock.finish()
    assert log.count("synchronize") == 1 and log.count("record") == 5
    assert timings.by_label == pytest.approx({"Forward": 0.018, "SendActivations": 0.002})
    assert timings.seconds == pytest.approx(0.026)  # first mark to last, nobody's interval included


def test_cuda_clock_reuses_its_events_from_span_to_span(events):
    make, log, stamps = events
    clock = EventClock(make_event=make)
    for span in range(3):
        stamps += [0.0, 1.0, 3.0]
        clock.start()
        clock.mark("Backward")
        clock.mark("Backward")
        assert clock.finish().by_label == pytest.approx({"Backward": 0.003})
    assert len(_Event.all) == 3 and log.count("synchronize") == 3


def test_cpu_clock_never_touches_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no CUDA call on a CPU rank")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    monkeypatch.setattr(torch.cuda, "Event", fail)
    clock = instruction_clock(torch.device("cpu"))
    assert isinstance(clock, WallClock)
    clock.start()
    time.sleep(0.01)
    clock.mark("Forward")
    clock.mark(None)
    clock.mark("Forward")
    timings = clock.finish()
    assert set(timings.by_label) == {"Forward"} and timings.by_label["Forward"] >= 0.01
    assert timings.seconds >= timings.by_label["Forward"]


def test_a_cuda_device_gets_the_event_clock():
    assert isinstance(instruction_clock(torch.device("cuda", 1)), EventClock)  # no event made until a mark
