"""What one rank measured over a run, written to `log.dir/<role>/summary.json` at the end.

The benchmark (splitlora_ds.bench) reads these files; they are plain JSON for anyone else too.
FLOPs come from torch's FlopCounterMode over the first step in which the rank computed anything
(a sequential client idles until its turn), so they count what actually ran, forward and
backward, rather than a formula; sequence lengths change from batch to batch, so that count is
scaled by the run's mean padded positions (rows x length) per active step.
"""

from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from .flops import CPU_ATTENTION_FLOPS

T = TypeVar("T")


@dataclass
class RunSummary:
    role: str
    mode: str
    steps: int = 0  # steps this process ran (after a resume: since the resume)
    active_steps: int = 0  # steps in which this rank computed (sequential clients idle otherwise)
    train_seconds: float = 0.0  # sum of step times, evaluation and start-up excluded
    compute_seconds: float = 0.0  # forward, loss, backward and optimizer time within them
    eval_seconds: float = 0.0
    tokens: int = 0  # training tokens scored (ranks that compute the loss)
    flops_per_step: int = 0  # forward + backward FLOPs of a mean active step
    positions: int = 0  # positions (rows x packed or padded length) run forward over all steps
    real_tokens: int = 0  # of `positions`, the real ones (the rest is padding)
    params: int = 0
    trainable_params: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    peak_rss_bytes: int = 0
    # Resident set just before the model is built: the interpreter, libraries, tokenizer and
    # data. peak_rss_bytes - this is what the model and its training added.
    rss_before_model_bytes: int = 0
    cuda_max_allocated_bytes: int = 0
    threads: int = field(default_factory=torch.get_num_threads)

    _flops_per_position: float = field(default=0.0, repr=False)

    def add_step(self, seconds: float, compute_seconds: float, tokens: int, positions: int,
                 real_tokens: int = 0) -> None:
        self.steps += 1
        self.active_steps += positions > 0
        self.train_seconds += seconds
        self.compute_seconds += compute_seconds
        self.tokens += tokens
        self.positions += positions
        self.real_tokens += real_tokens

    def count_flops(self, step: Callable[[], T]) -> T:
        """Run `step` (returning StepStats), counting FLOPs until one step has computed something."""
        if self._flops_per_position:
            return step()
        counter = FlopCounterMode(display=False, custom_mapping=dict(CPU_ATTENTION_FLOPS))
        with counter:
            out = step()
        if out.positions:
            self._flops_per_position = counter.get_total_flops() / out.positions
        return out

    def finish(self, device: torch.device) -> None:
        self.flops_per_step = round(self._flops_per_position * self.positions / max(self.active_steps, 1))
        # ru_maxrss is in KiB on Linux: the process's peak resident set, weights, activations,
        # optimizer state and the libraries themselves.
        self.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cuda":
            self.cuda_max_allocated_bytes = int(torch.cuda.max_memory_allocated(device))

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def write(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "summary.json")
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1)
        return path


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def read_summary(directory: str) -> dict:
    with open(os.path.join(directory, "summary.json")) as f:
        return json.load(f)
