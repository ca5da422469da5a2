"""Ranks on several hosts without a shared filesystem: what they must agree on at start.

Right after the process group exists, every rank contributes one `RankReport` (its host, the
digest of the recipe it resolved, the checkpoint steps complete for it) to one all_gather_object;
from the same gathered list every rank then decides alike:

- the recipe digests must be equal (hosts that load different recipes, ds_configs or overrides
  would otherwise train different things, or hang on mismatched sends);
- at `--resume`, the run continues from the newest step complete for every rank.

A mismatch raises ConfigError *after* a collective call, which the rest of the code base avoids
(prepare.py checks all input before any collective). It is safe here because every rank raises
the same error from the same gathered data: all ranks leave together, none waits on another.
The pure parts (`check_recipes`, `common_step`) take the gathered list and are unit-tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import ConfigError

# Fields that name places on one host's disk: hosts may resolve them differently (or hold the
# same relative path under different working directories) and still run the same job.
_LOCAL_FIELDS = (("checkpoint", "dir"), ("log", "dir"), ("train", "output_dir"), ("deepspeed_config",))


@dataclass(frozen=True)
class RankReport:
    host: str
    rank: int
    role: str
    digest: str  # recipe_digest of the resolved config
    steps: tuple[int, ...] = ()  # checkpoint steps complete for this rank (newest first); resume only
    problem: str = ""  # why this rank has no usable part (missing, another run, damaged), if so


def host_label() -> str:
    """This host's name for messages; with several launcher nodes on one machine (tests) the
    node index (DeepSpeed's CROSS_RANK) tells them apart."""
    node = os.environ.get("CROSS_RANK")
    return f"{socket.gethostname()} (node {node})" if node is not None else socket.gethostname()


def recipe_digest(config: dict, ds_config: dict) -> str:
    """A digest of the resolved recipe and the ds_config's content, without host-local paths."""
    config = json.loads(json.dumps(config, default=str))  # a deep copy we may edit
    for path in _LOCAL_FIELDS:
        node = config
        for part in path[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    blob = json.dumps({"recipe": config, "ds_config": ds_config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ranks_by_host(reports: Sequence[RankReport]) -> str:
    hosts: dict[str, list[str]] = {}
    for r in reports:
        hosts.setdefault(r.host, []).append(f"{r.rank} {r.role}")
    return "; ".join(f"host {h} (ranks {', '.join(rs)})" for h, rs in hosts.items())


def check_recipes(reports: Sequence[RankReport]) -> None:
    """ConfigError naming the hosts whose recipe differs from rank 0's."""
    reference = reports[0].digest
    odd = [r for r in reports if r.digest != reference]
    if odd:
        raise ConfigError(f"the recipe differs between hosts: {_ranks_by_host(odd)} resolved a recipe/ds_config "
                          f"other than rank 0's on host {reports[0].host} (digest {odd[0].digest} vs "
                          f"{reference}); start every host with the same recipe and --set overrides")


def common_step(reports: Sequence[RankReport]) -> int:
    """The newest checkpoint step complete for every rank; ConfigError naming the hosts and ranks
    that lack the newest step the others have, when no step is common."""
    sets = [set(r.steps) for r in reports]
    common = set.intersection(*sets) if sets else set()
    if common:
        return max(common)
    empty = [r for r in reports if not r.steps]
    if empty:
        parts = []
        for host in dict.fromkeys(r.host for r in empty):  # hosts in rank order, each once
            on_host = [r for r in empty if r.host == host]
            why = next((r.problem for r in on_host if r.problem), "")
            parts.append(_ranks_by_host(on_host) + (f": {why}" if why else ""))
        raise ConfigError(f"--resume: no usable checkpoint part on {'; '.join(parts)}; no rank can continue "
                          f"without every part")
    newest = max(max(s) for s in sets)
    lacking = [r for r in reports if newest not in r.steps]
    raise ConfigError(f"--resume: no checkpoint step is complete on every host; {_ranks_by_host(lacking)} "
                      f"lack step {newest} (they have {sorted(lacking[0].steps)})")


def agree(report: RankReport, resume: bool) -> Optional[int]:
    """One all_gather_object of every rank's report; then the same checks on every rank. Returns
    the agreed resume step (None without --resume)."""
    import torch.distributed as dist

    reports: list[Optional[RankReport]] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    check_recipes(reports)
    return common_step(reports) if resume else None
