"""Per-client batch streams that cycle forever, and the pooled stream of the centralized run."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from splitlora_ds.data.examples import collate, concat_batches
from splitlora_ds.errors import ConfigError


class ClientBatches:
    """Collated batches over ONE client's tokenized shard, epoch after epoch, forever.

    Epoch e visits the samples in an order drawn from an RNG seeded by (seed, e) only, so the
    stream is reproducible and independent of global RNG state and of other clients. Batches
    never span epochs: the last batch of an epoch may be smaller than `batch_size`.
    State is (epoch, position): `epoch` is the epoch the NEXT batch comes from (== completed
    passes), `position` how many of its samples were already served.
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, pad_token_id: int):
        if not examples:
            raise ConfigError("ClientBatches: a client shard has no samples")
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.epoch = 0
        self.position = 0
        self._order = self._order_for(0)

    @property
    def num_samples(self) -> int:
        return len(self.examples)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(self.num_samples))
        # String seed: hashed with SHA-512 by `random`, stable across runs and platforms.
        random.Random(f"client-batches:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> ClientBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += len(idx)
        if self.position >= self.num_samples:
            self.epoch += 1
            self.position = 0
            self._order = self._order_for(self.epoch)
        return collate([self.examples[i] for i in idx], self.pad_token_id)

    def skip_to(self, batches_consumed: int) -> None:
        """Put the stream where it is after serving `batches_consumed` batches from its start
        (absolute: the current position does not matter).

        Batches never span epochs, so every epoch is `batches_per_epoch` batches and the state
        follows by arithmetic, without drawing or collating the skipped batches: this is how a
        logical client's stream resumes from its participation count alone
        (federation/participation.py), with no position stored.
        """
        if isinstance(batches_consumed, bool) or not isinstance(batches_consumed, int) or batches_consumed < 0:
            raise ValueError(f"skip_to: batches_consumed must be an int >= 0, got {batches_consumed!r}")
        epoch, within = divmod(batches_consumed, self.batches_per_epoch)
        self.epoch, self.position = epoch, within * self.batch_size
        self._order = self._order_for(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A resume with another shard, seed or batch size would silently diverge: refuse it.
        for key in ("seed", "num_samples", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"data resume: checkpoint has {key}={state[key]} but this run "
                                  f"has {key}={getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise ConfigError(f"data resume: bad loader state epoch={epoch} position={position}"
                              f" for {self.num_samples} samples")
        self.epoch, self.position = epoch, position
        self._order = self._order_for(epoch)


def pooled_batches(client_iters: list[ClientBatches],
                   pad_token_id: int) -> Iterator[dict]:
    """Each step: the next batch of every client, concatenated in client order
    (`client_sizes` lists each client's rows).

    The centralized reference thus sees exactly the union of what the clients see per step.
    It advances the given iterators, so do not also consume them elsewhere.
    """
    if not client_iters:
        raise ValueError("pooled_batches: no clients")
    while True:
        parts = [next(it) for it in client_iters]
        batch = concat_batches(parts, pad_token_id)
        # Which rows came from which client, for the per-client loss figures.
        batch["client_sizes"] = [p["input_ids"].shape[0] for p in parts]
        yield batch
