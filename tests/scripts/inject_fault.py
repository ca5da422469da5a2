"""Runs splitlora_ds.train with one fault injected on one rank (tests/test_failure_verdicts.py).

FAULT=<kind>:<rank>:<step> with kind one of
  oom          the rank's loss (ComputeLoss) raises CUDA's OutOfMemoryError
  value        the rank's forward raises a ValueError
  runtime      server stage 0 packing the clients' activations (RecvActivations) raises the
               RuntimeError torch.cat raises for mismatched shapes
"""

import os
import sys

import torch

from splitlora_ds.runtime.executor import Executor
from splitlora_ds.train import main

kind, rank, step = os.environ["FAULT"].split(":")
RAISE = {
    "oom": ("_compute_loss", lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
        "1.06 GiB is free.")),
    "value": ("_forward", lambda: ValueError("input_ids hold -3, outside the vocabulary")),
    "runtime": ("_pack_clients", lambda: RuntimeError(
        "Sizes of tensors must match except in dimension 0. Expected size 32 but got size 31 for tensor "
        "number 1 in the list.")),
}
name, error = RAISE[kind]
if int(os.environ["RANK"]) == int(rank):
    original = getattr(Executor, name)

    def faulty(self, *args, **kwargs):
        if self.step == int(step) and self.training:
            raise error()
        return original(self, *args, **kwargs)

    setattr(Executor, name, faulty)

sys.exit(main(sys.argv[1:]))
