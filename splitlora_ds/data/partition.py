"""Splitting sample indices across federated clients (pure functions of their inputs and a seed):
IID, Dirichlet label skew, and a validation holdout by prompt group."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

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


# --------------------------------------------------------------------------- label skew

MAX_DIRICHLET_DRAWS = 100


def dirichlet_partition(labels: Sequence[Hashable], num_clients: int, alpha: float,
                        seed: int) -> list[list[int]]:
    """The usual non-IID benchmark split (Hsu et al. 2019): for each label value, draw client
    proportions ~ Dir(alpha * 1_C) and cut that label's shuffled indices accordingly.

    Small alpha -> each client sees few labels; large alpha -> close to IID. A draw that leaves
    some client empty is redrawn from the same generator (so the result stays a function of
    the seed) up to MAX_DIRICHLET_DRAWS times. Shards are disjoint, cover every index, sorted.
    """
    n = len(labels)
    _check(n, num_clients)
    if not alpha > 0:
        raise ConfigError(f"data.dirichlet_alpha: must be > 0, got {alpha}")
    # Label values in order of first appearance: deterministic, unlike set() order of strings.
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = np.random.default_rng(seed)
    empty = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in by_label.values():
            order = np.array(idx)
            rng.shuffle(order)
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(order)).astype(int)
            for c, part in enumerate(np.split(order, cuts)):
                shards[c].extend(part.tolist())
        sizes = [len(s) for s in shards]
        if min(sizes) > 0:
            return [sorted(s) for s in shards]
        empty = sizes.index(0)
    raise ConfigError(f"data.dirichlet_alpha: {alpha} left client {empty} without samples after "
                      f"{MAX_DIRICHLET_DRAWS} draws; raise data.dirichlet_alpha or lower "
                      "federation.clients")


def label_histograms(labels: Sequence[Hashable], shards: list[list[int]]) -> list[dict[str, int]]:
    """Per shard: {str(label): count}, keys sorted."""
    out = []
    for shard in shards:
        counts = Counter(str(labels[i]) for i in shard)
        out.append(dict(sorted(counts.items())))
    return out


def skew(labels: Sequence[Hashable], shards: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label distribution and the global
    one: 0 for a perfectly IID split, towards 1 when clients see disjoint labels.
    Empty shards have no distribution and are left out."""
    total = Counter(str(v) for v in labels)
    n = sum(total.values())
    if n == 0:
        return 0.0
    dists = []
    for hist in label_histograms(labels, shards):
        m = sum(hist.values())
        if m:
            dists.append(0.5 * sum(abs(hist.get(k, 0) / m - total[k] / n) for k in total))
    return float(np.mean(dists)) if dists else 0.0


# --------------------------------------------------------------------------- validation holdout


def holdout_by_group(groups: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `fraction` of the DISTINCT groups (prompts), never splitting one, so validation
    measures unseen prompts rather than other references of a memorised one.

    At least one group is held out when fraction > 0 and at least one stays in training.
    Returns (train indices, validation indices), each in the original order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.validation_fraction: must be in [0, 1), got {fraction}")
    distinct = list(dict.fromkeys(groups))
    if fraction == 0.0:
        return list(range(len(groups))), []
    if len(distinct) < 2:
        raise ConfigError(f"data.validation_fraction: {fraction} needs at least 2 distinct prompts "
                          f"to hold some out, found {len(distinct)}")
    k = min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
    held = set(random.Random(f"holdout:{seed}").sample(distinct, k))
    train = [i for i, g in enumerate(groups) if g not in held]
    val = [i for i, g in enumerate(groups) if g in held]
    return train, val
