"""Which logical clients take part in each round, and which rank runs each of them.

With `federation.clients: N` data owners served by `federation.client_ranks: R <= N` ranks and
`federation.clients_per_round: K` participants per round (a round = `federation.aggregate_every`
= I local steps, ending in one aggregation):

- Sampling. Round r's K participants are drawn from an RNG seeded by (seed, r) alone
  (`sample_round`). Nothing is carried from one round to the next, so a resumed run needs no
  RNG state from its checkpoint: it recomputes round r from the seed, exactly as the first run
  did. For the same reason every rank computes the same plan on its own, with no collective.
- Assignment. A rank is a device class (its split point and LoRA rank); `assign` gives each
  sampled client to a rank of its own class, round-robin over that class's ranks in sorted
  client order, so the ranks of a class get counts that differ by at most one.
- Slots. A rank runs its assigned clients one after another. Slot j of a round is I local steps
  in which each rank trains its j-th assigned client, or sits out when it has fewer than j + 1;
  a round is `RoundPlan.slots` = the longest per-rank list (ceil(K / R) in one class) slots long.
  The server serves, in slot j, the ranks in `RoundPlan.active_ranks(j)`.
- Stateless clients. Each participation starts from the global adapters (the last aggregate)
  with a fresh optimizer state, and the round ends with the weighted aggregation over the K
  participants. This is how Flower's simulation runs many clients on few workers: a client
  keeps no adapters or optimizer moments between its participations, so memory per rank is
  that of one client whatever N is, and a client that sat out rounds needs no catching up.
- Data positions. The only thing a client carries across rounds is where its data stream is.
  A client that took part in p rounds has consumed p x I batches (`batches_consumed`), and p
  follows from the sampling history (`participations`), so a rank resuming, or taking over a
  client another rank ran last round, fast-forwards that client's stream with
  `ClientBatches.skip_to` instead of reading a position from a checkpoint.

With R = K = N (the defaults) every client takes part every round, on its own rank, in one slot:
today's one-rank-per-client federation.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from splitlora_ds.errors import ConfigError


def sample_round(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The sorted ids of the `per_round` clients taking part in round `round_index`.

    A pure function of its arguments: the RNG is seeded by (seed, round) only (a string seed,
    hashed with SHA-512 by `random`, stable across runs and platforms, as data/loader.py does).
    per_round == num_clients returns every client without drawing.
    """
    if num_clients < 1:
        raise ConfigError(f"federation.clients: must be >= 1, got {num_clients}")
    if not 1 <= per_round <= num_clients:
        raise ConfigError(f"federation.clients_per_round: {per_round} is invalid; must be between 1 "
                          f"and federation.clients ({num_clients})")
    if round_index < 0:
        raise ValueError(f"sample_round: round_index must be >= 0, got {round_index}")
    if per_round == num_clients:
        return list(range(num_clients))
    rng = random.Random(f"participation:{seed}:{round_index}")
    return sorted(rng.sample(range(num_clients), per_round))


def participations(seed: int, rounds_done: int, num_clients: int, per_round: int) -> list[int]:
    """How many of rounds 0 .. rounds_done - 1 each client took part in (replays the sampling)."""
    if rounds_done < 0:
        raise ValueError(f"participations: rounds_done must be >= 0, got {rounds_done}")
    if per_round == num_clients:
        sample_round(seed, 0, num_clients, per_round)  # same argument checks as the loop below
        return [rounds_done] * num_clients
    counts = [0] * num_clients
    for r in range(rounds_done):
        for c in sample_round(seed, r, num_clients, per_round):
            counts[c] += 1
    return counts


def batches_consumed(seed: int, rounds_done: int, num_clients: int, per_round: int,
                     aggregate_every: int) -> list[int]:
    """Per client: batches its data stream has served after `rounds_done` rounds (p x I)."""
    if aggregate_every < 1:
        raise ConfigError(f"federation.aggregate_every: {aggregate_every} is invalid; must be >= 1")
    return [p * aggregate_every for p in participations(seed, rounds_done, num_clients, per_round)]


def spread_ranks(client_class: Sequence[Hashable], num_ranks: int) -> list[Hashable]:
    """The class of each of `num_ranks` ranks, given each client's class.

    Every class present gets one rank; the rest go one at a time to the class with the most
    clients per rank (ties: the class seen first), never past one rank per client, so each
    class's per-round load is as even as the rank count allows. Ranks of a class are contiguous,
    classes in order of first appearance among the clients; except with one rank per client,
    where rank c takes client c's class, so that with every client sampled `assign` puts client
    c on rank c: today's layout.
    """
    classes = list(dict.fromkeys(client_class))
    if not 1 <= num_ranks <= len(client_class):
        raise ConfigError(f"federation.client_ranks: {num_ranks} is invalid; must be between 1 and "
                          f"federation.clients ({len(client_class)})")
    if len(classes) > num_ranks:
        raise ConfigError(f"federation.client_ranks: {num_ranks} is invalid; the clients form "
                          f"{len(classes)} device classes and each needs at least one rank")
    if num_ranks == len(client_class):
        return list(client_class)
    clients = {k: 0 for k in classes}
    for k in client_class:
        clients[k] += 1
    ranks = {k: 1 for k in classes}
    for _ in range(num_ranks - len(classes)):
        open_ = [k for k in classes if ranks[k] < clients[k]]  # R <= N: never empty here
        best = max(open_, key=lambda k: (clients[k] / ranks[k], -classes.index(k)))
        ranks[best] += 1
    return [k for k in classes for _ in range(ranks[k])]


def assign(sampled: Sequence[int], client_class: Sequence[Hashable],
           rank_class: Sequence[Hashable]) -> list[list[int]]:
    """Per rank: the sampled clients it runs this round, in slot order.

    A client goes only to a rank of its own class; within a class the sampled clients, sorted,
    go round-robin over the class's ranks (in rank order), so per-rank counts in a class differ
    by at most one. A sampled client whose class has no rank is an error naming the client.
    With one rank per client (and `rank_class` the clients' classes, as `spread_ranks` gives
    them), client c always runs on rank c: a client keeps its device, and its optimizer state,
    in every round it is sampled.
    """
    if len(set(sampled)) != len(sampled):
        raise ValueError(f"assign: sampled clients repeat: {sorted(sampled)}")
    for c in sampled:
        if not 0 <= c < len(client_class):
            raise ValueError(f"assign: client {c} out of range for {len(client_class)} clients")
    if list(rank_class) == list(client_class):
        return [[c] if c in set(sampled) else [] for c in range(len(client_class))]
    ranks_of: dict[Hashable, list[int]] = {}
    for r, k in enumerate(rank_class):
        ranks_of.setdefault(k, []).append(r)
    per_rank: list[list[int]] = [[] for _ in rank_class]
    dealt: dict[Hashable, int] = {}
    for c in sorted(sampled):
        k = client_class[c]
        if k not in ranks_of:
            raise ConfigError(f"federation.client_ranks: client {c} (device class {k!r}) has no rank of its "
                              f"class; the ranks' classes are {list(rank_class)}")
        i = dealt.get(k, 0)
        per_rank[ranks_of[k][i % len(ranks_of[k])]].append(c)
        dealt[k] = i + 1
    return per_rank


@dataclass(frozen=True)
class RoundPlan:
    """One round: who takes part and which rank runs whom in which slot."""

    round_index: int
    sampled: tuple[int, ...]  # sorted client ids
    per_rank: tuple[tuple[int, ...], ...]  # per rank, its clients in slot order

    @property
    def slots(self) -> int:
        """Slots of I local steps this round takes: the longest per-rank list."""
        return max((len(cs) for cs in self.per_rank), default=0)

    def client_of(self, rank: int, slot: int) -> Optional[int]:
        """The client `rank` trains in `slot`, or None when it sits that slot out."""
        if not 0 <= rank < len(self.per_rank):
            raise ValueError(f"client_of: rank {rank} out of range for {len(self.per_rank)} client ranks")
        if not 0 <= slot < self.slots:
            raise ValueError(f"client_of: slot {slot} out of range for a round of {self.slots} slots")
        clients = self.per_rank[rank]
        return clients[slot] if slot < len(clients) else None

    def active_ranks(self, slot: int) -> tuple[int, ...]:
        """The ranks that train a client in `slot` (those the server serves then), in rank order."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"active_ranks: slot {slot} out of range for a round of {self.slots} slots")
        return tuple(r for r, cs in enumerate(self.per_rank) if slot < len(cs))


def plan_round(seed: int, round_index: int, client_class: Sequence[Hashable],
               rank_class: Sequence[Hashable], per_round: int) -> RoundPlan:
    """Round `round_index`'s plan: sample_round over len(client_class) clients, then assign."""
    sampled = sample_round(seed, round_index, len(client_class), per_round)
    per_rank = assign(sampled, client_class, rank_class)
    return RoundPlan(round_index, tuple(sampled), tuple(tuple(cs) for cs in per_rank))


@dataclass(frozen=True)
class StepPlace:
    """Where one step of a run with logical clients falls: its round, its slot in the round, and
    its local step within the slot (0 .. length - 1)."""

    round: RoundPlan
    slot: int
    local_step: int
    length: int  # the slot's local steps: I, or what is left of train.max_steps in the last round
    round_start: int  # the round's first local step (r x I): each participant's progress before it

    @property
    def starts_slot(self) -> bool:
        return self.local_step == 0

    @property
    def ends_slot(self) -> bool:
        return self.local_step == self.length - 1

    @property
    def ends_round(self) -> bool:
        return self.ends_slot and self.slot == self.round.slots - 1

    def client_of(self, rank: int) -> Optional[int]:
        return self.round.client_of(rank, self.slot)

    @property
    def active_ranks(self) -> tuple[int, ...]:
        return self.round.active_ranks(self.slot)


@dataclass(frozen=True)
class Participation:
    """A whole run's rounds, for the schedule: round r is `slots` slots of `length_r` local steps
    (I, the last round what is left of `max_steps`), so the run takes sum_r slots_r x length_r
    steps; every participant trains `max_steps` local steps over the rounds it takes part in.

    `stateless`: N > R, so a rank runs different clients and each participation starts from the
    global adapters with a fresh optimizer state. With one rank per client (R = N) a rank always
    runs the same client and keeps its optimizer state, as a federation without logical clients
    does."""

    seed: int
    client_class: tuple[Hashable, ...]
    rank_class: tuple[Hashable, ...]
    per_round: int
    aggregate_every: int
    max_steps: int
    # derived in __post_init__: every round's plan, the step each round starts at, the run's steps
    plans: tuple[RoundPlan, ...] = field(init=False, repr=False, compare=False)
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    steps: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.aggregate_every < 1:
            raise ValueError(f"Participation: max_steps {self.max_steps} and aggregate_every "
                             f"{self.aggregate_every} must be >= 1")
        rounds = -(-self.max_steps // self.aggregate_every)
        plans = tuple(plan_round(self.seed, r, self.client_class, self.rank_class, self.per_round)
                      for r in range(rounds))
        starts, total = [], 0
        for r, plan in enumerate(plans):
            starts.append(total)
            total += plan.slots * self.round_length(r)
        object.__setattr__(self, "plans", plans)
        object.__setattr__(self, "_starts", tuple(starts))
        object.__setattr__(self, "steps", total)

    @property
    def num_clients(self) -> int:
        return len(self.client_class)

    @property
    def num_ranks(self) -> int:
        return len(self.rank_class)

    @property
    def stateless(self) -> bool:
        return self.num_clients > self.num_ranks

    @property
    def rounds(self) -> int:
        return len(self.plans)

    def round_length(self, r: int) -> int:
        return min(self.aggregate_every, self.max_steps - r * self.aggregate_every)

    def locate(self, step: int) -> StepPlace:
        if not 0 <= step < self.steps:
            raise ValueError(f"locate: step {step} outside the run's {self.steps} steps")
        r = bisect.bisect_right(self._starts, step) - 1  # called per instruction: no scan over rounds
        length = self.round_length(r)
        slot, local = divmod(step - self._starts[r], length)
        return StepPlace(self.plans[r], slot, local, length, r * self.aggregate_every)

    def consumed(self, client: int, round_index: int) -> int:
        """Batches `client`'s data stream served before round `round_index` (its local steps)."""
        return sum(self.round_length(r) for r in range(round_index) if client in self.plans[r].sampled)

    def rank_steps(self, rank: int) -> int:
        """Optimizer steps `rank` takes over the run (its LR schedule's length)."""
        return sum(len(p.per_rank[rank]) * self.round_length(r) for r, p in enumerate(self.plans))

    def progress(self, step: int) -> int:
        """Local steps of the rounds completed by the end of `step` (eval and checkpoint cadence)."""
        place = self.locate(step)
        return place.round_start + place.length if place.ends_round else place.round_start

    def active_sets(self) -> list[tuple[int, ...]]:
        """Every distinct set of ranks that trains together in one step (global clipping groups)."""
        return sorted({p.active_ranks(s) for p in self.plans for s in range(p.slots)})
