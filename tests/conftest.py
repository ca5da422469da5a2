import os
import re

# Tests run on CPU with small thread pools; several ranks share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """The CPU suite runs on the CPU on every machine, so that it gives the same result with 0, 1
    or many GPUs: its ranks never see a GPU (the GPU suite, `pytest -m gpu tests/gpu`, does).
    CUDA reads CUDA_VISIBLE_DEVICES when it first initialises, which nothing has done yet here."""
    wants_gpu = re.search(r"(?<!not )\bgpu\b", config.getoption("markexpr") or "")
    if not wants_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
