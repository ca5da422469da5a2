"""The GPU suite (`pytest -m gpu tests/gpu`): every test here is marked `gpu` and skipped cleanly
where CUDA is absent. On one GPU, several ranks share it through `dist.backend: gloo` (tensors
stage through host memory); nccl needs a GPU per rank."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's helpers (_launch)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    # Plain `pytest` hides the GPUs from the CPU suite (tests/conftest.py): this suite runs with -m gpu.
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m gpu tests/gpu` on a machine with a GPU")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
