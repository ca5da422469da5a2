"""Clocks for instruction timings that stay true on GPUs without stalling them.

CUDA kernels run asynchronously: the host returns from a forward long before the GPU is done, so
a host clock read at an instruction boundary charges the GPU's work to whichever later instruction
happens to wait on the device. Synchronising at every boundary fixes the charge but stops the GPU
whenever the host reads the clock: no compute overlaps communication any more.

So a CUDA rank records an event on its stream at every boundary (`mark`): the GPU stamps it when
it gets there, after the work queued before it, without the host waiting. `finish` waits once, for
the step's last event, and reads every interval: each instruction is charged with the device time
between its boundaries, idle time spent waiting for the host included. On the CPU nothing is
asynchronous: perf_counter at each boundary is already the truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch


@dataclass
class Timings:
    """One timed span: its seconds from the first mark to the last, and the seconds of the
    intervals between marks summed per label (intervals marked None belong to nobody)."""

    seconds: float
    by_label: dict[str, float]


class _Clock:
    """Marks boundaries during a span; `finish` resolves them to seconds."""

    def __init__(self) -> None:
        self._labels: list[Optional[str]] = []

    def start(self) -> None:
        """Begin a span (forgets the previous one)."""
        self._labels = []
        self._begin()

    def mark(self, label: Optional[str]) -> None:
        """A boundary: the interval since the previous one is charged to `label` (None: nobody)."""
        self._labels.append(label)
        self._stamp()

    def finish(self) -> Timings:
        """The span's seconds, per label and in all."""
        seconds = self._intervals()
        by_label: dict[str, float] = {}
        for label, s in zip(self._labels, seconds):
            if label is not None:
                by_label[label] = by_label.get(label, 0.0) + s
        return Timings(sum(seconds), by_label)

    def _begin(self) -> None:
        raise NotImplementedError

    def _stamp(self) -> None:
        raise NotImplementedError

    def _intervals(self) -> list[float]:
        raise NotImplementedError


class WallClock(_Clock):
    """CPU ranks: perf_counter at every boundary."""

    def _begin(self) -> None:
        self._stamps = [time.perf_counter()]

    def _stamp(self) -> None:
        self._stamps.append(time.perf_counter())

    def _intervals(self) -> list[float]:
        return [b - a for a, b in zip(self._stamps, self._stamps[1:])]


class EventClock(_Clock):
    """CUDA ranks: a timing event recorded on the current stream at every boundary, read once at
    `finish` (the span's only synchronisation). Events are reused from span to span."""

    def __init__(self, make_event: Optional[Callable[[], Any]] = None):
        super().__init__()
        self._make_event = make_event or (lambda: torch.cuda.Event(enable_timing=True))
        self._events: list[Any] = []
        self._used = 0

    def _begin(self) -> None:
        self._used = 0
        self._stamp()

    def _stamp(self) -> None:
        if self._used == len(self._events):
            self._events.append(self._make_event())
        self._events[self._used].record()
        self._used += 1

    def _intervals(self) -> list[float]:
        events = self._events[:self._used]
        # Events on one stream complete in order: once the last is done, every interval is readable.
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in zip(events, events[1:])]


def instruction_clock(device: torch.device) -> Union[WallClock, EventClock]:
    """The clock for a rank computing on `device`."""
    return EventClock() if device.type == "cuda" else WallClock()
