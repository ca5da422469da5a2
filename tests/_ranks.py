"""Several ranks in-process: torch.multiprocessing + gloo, no launcher (executor and comm tests).

`run_ranks(world, fn, *args)` starts `world` processes, initialises deepspeed.comm with gloo on a
free port and a short timeout in each, calls `fn(rank, *args)` and returns every rank's result
(in rank order). A rank that raises fails the test with its traceback; nothing hangs for long.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from splitlora_ds.bench.runs import free_port

TIMEOUT_S = 60


def _entry(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import deepspeed
        import deepspeed.ops
        import torch.distributed as dist

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=TIMEOUT_S), verbose=False)
        results[rank] = ("ok", fn(rank, *args))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        results[rank] = ("error", traceback.format_exc())


def run_ranks(world: int, fn, *args) -> list:
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True,
                       start_method="spawn")
    out = []
    for rank in range(world):
        status, value = results.get(rank, ("error", "no result"))
        assert status == "ok", f"rank {rank} failed:\n{value}"
        out.append(value)
    return out
