"""The split plan: which layers of the flat layer list each role holds, as plain validated data.

Layer indices follow `models.base.LayerSpec`: 0 = embeddings, 1..L = transformer blocks,
L + 1 = head (final norm + LM head). A client holds layers 0..k; the server's remaining blocks
are spread over S pipeline stages with DeepSpeed's partitioners, the head on the last stage.

Heterogeneous clients (HSplitLoRA) cut at different k_c. The server then starts at the smallest
cut: blocks k_min+1..k_max are "shared" (held by the clients that cut later and by the server for
the clients that cut earlier, each side with its own adapters) and all sit on server stage 0, so
every client still sends to stage 0; its activations enter there at block k_c+1.

The U-shaped split (`client_tail_layers` m) also gives every client the last m blocks and the
head: the server holds the middle blocks only, and the client computes its own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from deepspeed.runtime.utils import partition_balanced, partition_uniform

from .errors import ConfigError


@dataclass(frozen=True)
class StagePlan:
    """One role's slice of the layer list: layers[start:stop]."""

    name: str  # "client0", "server0", ... ; "centralized" for the unsplit model
    start: int
    stop: int
    num_blocks: int  # L of the whole model, to tell embeddings/blocks/head apart
    # U-shaped split: the client also holds layers tail_start..L+1 (its last blocks and the head)
    tail_start: Optional[int] = None

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer index this role holds, in model order."""
        return (*self.bottom_layers, *self.tail_layers)

    @property
    def bottom_layers(self) -> range:
        """The contiguous run of layers start..stop-1 (all of them unless the role holds a tail)."""
        return range(self.start, self.stop)

    @property
    def tail_layers(self) -> range:
        """U-shaped split: the client's last blocks and head; empty otherwise."""
        return range(self.tail_start, self.num_blocks + 2) if self.tail_start is not None else range(0)

    @property
    def holds_embedding(self) -> bool:
        return self.start == 0

    @property
    def holds_head(self) -> bool:
        return self.num_blocks + 1 in self.layers

    @property
    def blocks(self) -> tuple[int, ...]:
        """The transformer blocks (1-based layer indices) in this stage."""
        return tuple(i for i in self.layers if 1 <= i <= self.num_blocks)

    def describe(self) -> str:
        """e.g. "embeddings, blocks 0-1"; a U-shaped client's last blocks read "tail block 5"."""
        parts = []
        if self.holds_embedding:
            parts.append("embeddings")
        for run, label in ((self.bottom_layers, ""), (self.tail_layers, "tail ")):
            blocks = [i - 1 for i in run if 1 <= i <= self.num_blocks]  # 0-based, as transformers counts them
            if len(blocks) == 1:
                parts.append(f"{label}block {blocks[0]}")
            elif blocks:
                parts.append(f"{label}blocks {blocks[0]}-{blocks[-1]}")
        if self.holds_head:
            parts.append("head")
        return ", ".join(parts)


@dataclass(frozen=True)
class SplitPlan:
    num_blocks: int
    clients: tuple[StagePlan, ...]
    server: tuple[StagePlan, ...]

    def all_stages(self) -> tuple[StagePlan, ...]:
        return self.clients + self.server

    @property
    def entry_layers(self) -> tuple[int, ...]:
        """Per client: the layer its activations enter the server at (k_c + 1)."""
        return tuple(c.stop for c in self.clients)

    @property
    def u_shaped(self) -> bool:
        """Clients hold the head (and maybe last blocks) too: they compute the loss."""
        return self.clients[0].tail_start is not None

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.entry_layers)) > 1

    @property
    def shared_layers(self) -> range:
        """Blocks some clients hold and server stage 0 holds for the others (empty when all cut alike)."""
        return range(min(self.entry_layers), max(self.entry_layers))


def make_split_plan(
    num_blocks: int,
    client_layers: Sequence[int],
    server_stages: int,
    method: str = "uniform",
    block_weights: Optional[Sequence[float]] = None,
    client_tail_layers: Optional[int] = None,
) -> SplitPlan:
    """Plan the split for clients with cut points `client_layers` (one k per client).
    `client_tail_layers` m (U-shaped): every client also holds the last m blocks and the head.

    `method` is DeepSpeed's partition method name for the server's blocks: "uniform" (equal block
    counts) or "parameters" (balanced by `block_weights`, one weight per block of the model).
    """
    if not client_layers:
        raise ConfigError("federation.clients: need at least one client")
    tail = client_tail_layers or 0
    if tail >= num_blocks:
        raise ConfigError(f"split.client_tail_layers: {tail} leaves no block for the bottom of the client and the "
                          f"server; the model has {num_blocks} blocks")
    for k in client_layers:
        if not 1 <= k < num_blocks:
            raise ConfigError(
                f"split.client_layers: {k} is out of range; the model has {num_blocks} blocks, "
                f"so a client holds 1..{num_blocks - 1} of them and the server the rest")
    k_min, k_max = min(client_layers), max(client_layers)
    rest = num_blocks - tail - k_max  # blocks no client holds, spread over the server stages
    if server_stages > rest and tail:
        raise ConfigError(
            f"split.client_tail_layers: {tail} leaves {max(rest, 0)} of {num_blocks} blocks to the server "
            f"(split.client_layers={_show(client_layers)}), but split.server_stages={server_stages} needs at "
            f"least one block per stage")
    if server_stages > rest:
        raise ConfigError(
            f"split.server_stages: {server_stages} stages need at least {server_stages} blocks that no "
            f"client holds, but with split.client_layers={_show(client_layers)} there are {rest} "
            f"of {num_blocks}")

    if method == "uniform":
        bounds = partition_uniform(rest, server_stages)
    elif method == "parameters":
        if block_weights is None or len(block_weights) != num_blocks:
            raise ValueError("partition method 'parameters' needs one weight per block")
        bounds = partition_balanced(list(block_weights[k_max:num_blocks - tail]), server_stages)
    else:
        raise ConfigError(f"split.partition_method: unknown method {method!r}; use uniform or parameters")

    # the head is layer L + 1, so the client's tail (the last m blocks and the head) starts at L + 1 - m
    tail_start = num_blocks + 1 - tail if client_tail_layers is not None else None
    clients = tuple(StagePlan(f"client{i}", 0, ki + 1, num_blocks, tail_start) for i, ki in enumerate(client_layers))
    first = k_max + 1
    server = []
    for s in range(server_stages):
        start, stop = first + bounds[s], first + bounds[s + 1]
        if s == 0:
            start = k_min + 1  # the shared blocks ride with the first server stage
        if s == server_stages - 1:
            # the head rides with the last server stage, unless the clients hold it
            stop = tail_start if tail_start is not None else num_blocks + 2
        server.append(StagePlan(f"server{s}", start, stop, num_blocks))
    return SplitPlan(num_blocks, clients, tuple(server))


def _show(client_layers: Sequence[int]) -> str:
    return str(client_layers[0]) if len(set(client_layers)) == 1 else str(list(client_layers))


def centralized_plan(num_blocks: int) -> StagePlan:
    """The whole model as one stage (mode=centralized)."""
    return StagePlan("centralized", 0, num_blocks + 2, num_blocks)
