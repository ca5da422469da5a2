"""Runs splitlora_ds.train on a host that pretends to have FAKE_GPUS GPUs (tests/test_placement.py):
torch reports that many devices, so the placement decision sees a GPU host; nothing may then touch
CUDA for real, which is the point: a host with more ranks than GPUs must not."""

import os
import sys

import torch

torch.cuda.device_count = lambda: int(os.environ["FAKE_GPUS"])

from splitlora_ds.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
