"""Copies to one rank at the end of a run, for hosts that share no filesystem (both opt-in).

- `log.gather`: every role's summary.json to the main rank, written under its log.dir/<role>/
  where that host has none of its own (the benchmark then reads one folder).
- `checkpoint.gather_adapters`: the clients' final adapters to server0, written into its last
  checkpoint folder, so that server0's host alone can export the model. Off by default: the
  adapters are the data owners' and leave their machines only when they agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from .checkpoint import atomic_write


def to_rank(obj: Any, dst: int) -> Optional[list]:
    """gather_object of one picklable object per rank; the list (rank order) on `dst`, else None."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def write_summaries(log_dir: str, summaries: list[dict]) -> list[str]:
    """Write each gathered summary as log_dir/<role>/summary.json unless this host has one."""
    written = []
    for summary in summaries:
        path = Path(log_dir) / summary["role"] / "summary.json"
        if path.is_file():
            continue  # this host's own (or a shared folder's): already the same figures
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: p.write_text(json.dumps(summary, indent=1)))
        written.append(os.fspath(path))
    return written


def client_adapters_to_server(prep, adapters: dict[str, torch.Tensor], sample_counts: list[int],
                              directory: Path) -> list[int]:
    """Every client's adapters to server0 (rank C), written to `directory` as <role>.safetensors
    where absent. Returns the clients' sample counts on server0 (which has none of its own, and
    the export needs them), an empty list elsewhere."""
    server0 = prep.topology.clients
    payload = None
    if prep.role.is_client:
        payload = (prep.role.name, {n: t.detach().cpu().contiguous() for n, t in adapters.items()}, sample_counts)
    gathered = to_rank(payload, server0)
    if gathered is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []
    for item in gathered:
        if item is None:
            continue
        role, tensors, client_counts = item
        counts = counts or list(client_counts)
        path = directory / f"{role}.safetensors"
        if not path.is_file():  # a shared folder has the client's own copy already
            atomic_write(path, lambda p, t=tensors: save_file(t, str(p)))
    return counts
