"""Metrics: one TensorBoard run per role under `log.dir`, with namespaced tags.

Every role writes its own run (`log.dir/client0`, `log.dir/server0`, ...; `log.dir/centralized`
for the unsplit reference), so a tag such as `comm/bytes_sent` shows one curve per role in one
chart. The last server stage (or the centralized run) also writes the job-wide `train/loss` and
the per-client tags `client<i>/loss`, `client<i>/tokens`.
"""

from __future__ import annotations

import os
from typing import Mapping

from torch.utils.tensorboard import SummaryWriter


class MetricsWriter:
    def __init__(self, log_dir: str, run_name: str):
        self.path = os.path.join(log_dir, run_name)
        self._writer = SummaryWriter(self.path)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        self._writer.add_text(tag, text)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def read_scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one tag of one run, in step order (for tests, bench and users)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        raise KeyError(f"no scalar tag {tag!r} in {run_dir}; have {sorted(acc.Tags().get('scalars', []))}")
    return [(e.step, e.value) for e in acc.Scalars(tag)]
