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

# How long a rank waits on a peer in a collective. The ranks start together from the same
# imports (see `ready` below), so only the tiny collectives of `fn` run under it.
TIMEOUT_S = 60


def _entry(rank: int, world: int, port: int, fn, args, results, ready) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import deepspeed
        import deepspeed.ops
        import torch.distributed as dist

        # Importing DeepSpeed takes seconds of CPU per rank; on a loaded machine the ranks finish
        # it far apart, and the rendezvous below would count that against TIMEOUT_S. Wait for
        # every rank to have imported first (a condition, not a time).
        ready.wait()
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=TIMEOUT_S), verbose=False)
        results[rank] = ("ok", fn(rank, *args))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        ready.abort()  # a rank failing before the gate releases the others at once (no effect after it)
        results[rank] = ("error", traceback.format_exc())


def run_ranks(world: int, fn, *args) -> list:
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    ready = manager.Barrier(world)
    mp.start_processes(_entry, args=(world, free_port(), fn, args, results, ready), nprocs=world, join=True,
                       start_method="spawn")
    outcome = [results.get(rank, ("error", "no result")) for rank in range(world)]
    # Every failed rank's traceback: the first in rank order may only be a peer the culprit took down.
    failed = [f"rank {rank} failed:\n{value}" for rank, (status, value) in enumerate(outcome) if status != "ok"]
    assert not failed, "\n".join(failed)
    return [value for _, value in outcome]
