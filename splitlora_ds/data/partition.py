"""Splitting sample indices across federated clients (pure functions of (n, clients, seed))."""

from __future__ import annotations

import random

from splitlora_ds.errors import ConfigError


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"federation.clients: must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ConfigError(
            f"federation.clients: {num_clients} clients but only {n} training samples; "
            "every client needs at least one")


def iid_partition(n: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle range(n) with `seed`, then cut it into `num_clients` contiguous shards.

    Shard sizes differ by at most 1 (the first n % num_clients clients get the extra one);
    shards are disjoint, cover every index, and are sorted (order inside a shard carries no
    meaning: each client's loader reshuffles per epoch). Own RNG, so global state is untouched.
    """
    _check(n, num_clients)
    order = list(range(n))
    random.Random(f"iid-partition:{seed}").shuffle(order)
    base, extra = divmod(n, num_clients)
    shards, start = [], 0
    for c in range(num_clients):
        size = base + (1 if c < extra else 0)
        shards.append(sorted(order[start:start + size]))
        start += size
    return shards
