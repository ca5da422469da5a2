"""Metrics: one TensorBoard run per role under `log.dir`, with namespaced tags.

Every role writes its own run (`log.dir/client0`, `log.dir/server0`, ...; `log.dir/centralized`
for the unsplit reference), so a tag such as `comm/bytes_sent` shows one curve per role in one
chart. The last server stage (or the centralized run) also writes the job-wide `train/loss` and
the per-client tags `client<i>/loss`, `client<i>/tokens`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Mapping, Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class MetricsWriter:
    def __init__(self, log_dir: str, run_name: str, purge_step: Optional[int] = None):
        self.path = os.path.join(log_dir, run_name)
        # purge_step: TensorBoard drops events at or after it from earlier files, so a resumed
        # run's curves continue from the checkpoint instead of overlapping what came after it.
        self._writer = SummaryWriter(self.path, purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        self._writer.add_text(tag, text, step)

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


class Progress:
    """The main rank's console: a tqdm bar (steps, loss, tokens/s, ETA) on a terminal, and a log
    line every `print_every` steps everywhere (CI logs and files get lines, not bar redraws).
    Other ranks stay quiet."""

    def __init__(self, total: int, start: int, enabled: bool, bar: bool = True, prefix: str = ""):
        self.enabled = enabled
        self.total, self.start = total, start
        self.prefix = prefix
        self._t0 = time.perf_counter()
        self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=not (enabled and bar and sys.stderr.isatty()))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def update(self, step: int, stats, print_line: bool) -> None:
        if not self.enabled:
            return
        tok_s = stats.tokens / max(stats.seconds, 1e-9)
        loss = f"loss {stats.loss:.4f}  " if stats.loss is not None else ""  # only the last stage has it
        self._bar.update(1)
        if stats.loss is not None:
            self._bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        if print_line:
            done = step + 1 - self.start
            eta = self.elapsed / done * (self.total - step - 1)
            rate = f"{tok_s:.0f} tok/s  " if stats.loss is not None else ""
            self.write(f"[splitlora_ds]{self.prefix} step {step + 1}/{self.total}  {loss}lr {stats.lr:.2e}  "
                       f"{stats.seconds:.3f} s/step  {rate}eta {eta:.0f} s")

    def write(self, line: str) -> None:
        if self.enabled:
            self._bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()
