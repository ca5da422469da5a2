"""Partial participation of many logical clients on fewer ranks: sampling, assignment, slots."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from splitlora_ds.errors import ConfigError
from splitlora_ds.federation.participation import (
    RoundPlan,
    assign,
    batches_consumed,
    participations,
    plan_round,
    sample_round,
    spread_ranks,
)


# --- sample_round ------------------------------------------------------------------------

def test_sample_round_is_a_pure_function_of_seed_and_round():
    a = sample_round(7, 3, 20, 5)
    assert len(a) == 5 == len(set(a)) and a == sorted(a) and all(0 <= c < 20 for c in a)
    random.seed(999)  # global RNG state must not matter...
    assert sample_round(7, 3, 20, 5) == a
    random.Random(1).random()
    assert [sample_round(7, r, 20, 5) for r in range(10)] == [sample_round(7, r, 20, 5) for r in range(10)]
    # ...nor the order rounds are asked for (a resume starts mid-sequence)
    assert [sample_round(7, r, 20, 5) for r in reversed(range(10))][::-1] == \
        [sample_round(7, r, 20, 5) for r in range(10)]


def test_sample_round_differs_by_seed_and_round():
    rounds = [tuple(sample_round(1, r, 30, 6)) for r in range(20)]
    assert len(set(rounds)) > 15  # C(30, 6) = 593775: repeats would mean the round is ignored
    other_seed = [tuple(sample_round(2, r, 30, 6)) for r in range(20)]
    assert sum(a != b for a, b in zip(rounds, other_seed)) > 15


def test_every_client_when_k_equals_n():
    for r in range(5):
        assert sample_round(3, r, 7, 7) == list(range(7))
    assert participations(3, 4, 7, 7) == [4] * 7


@pytest.mark.parametrize("n,k,needle", [
    (5, 0, "federation.clients_per_round: 0 is invalid"),
    (5, 6, "federation.clients_per_round: 6 is invalid; must be between 1 and federation.clients (5)"),
    (0, 1, "federation.clients: must be >= 1"),
])
def test_sample_round_refuses_bad_counts(n, k, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        sample_round(0, 0, n, k)


def test_frequencies_are_k_over_n():
    # 2000 rounds, N = 12, K = 4: each client takes part in about a third of them.
    counts = participations(11, 2000, 12, 4)
    assert sum(counts) == 2000 * 4
    for c, p in enumerate(counts):
        assert abs(p / 2000 - 1 / 3) <= 0.1 / 3, (c, p)


# --- participations / batches_consumed ---------------------------------------------------

def test_participations_match_a_recount():
    seed, n, k = 5, 9, 3
    history = [sample_round(seed, r, n, k) for r in range(40)]
    for done in (0, 1, 7, 40):
        recount = Counter(c for rnd in history[:done] for c in rnd)
        assert participations(seed, done, n, k) == [recount[c] for c in range(n)]
    assert batches_consumed(seed, 40, n, k, aggregate_every=3) == [3 * p for p in participations(seed, 40, n, k)]
    with pytest.raises(ConfigError, match="federation.aggregate_every: 0 is invalid"):
        batches_consumed(seed, 1, n, k, 0)


# --- assign / spread_ranks ---------------------------------------------------------------

def test_assign_balances_one_class():
    sampled = sample_round(0, 0, 100, 10)
    per_rank = assign(sampled, [0] * 100, [0] * 4)
    assert sorted(c for cs in per_rank for c in cs) == sampled
    assert sorted(len(cs) for cs in per_rank) == [2, 2, 3, 3]
    # round-robin in sorted order: rank r gets sampled[r], sampled[r + 4], ...
    assert per_rank == [sampled[r::4] for r in range(4)]


def test_assign_respects_classes_and_balances_within_each():
    rng = random.Random(0)
    client_class = [rng.choice("abc") for _ in range(60)]
    rank_class = ["a", "b", "a", "c", "b", "a"]
    for r in range(30):
        sampled = sample_round(1, r, 60, 17)
        per_rank = assign(sampled, client_class, rank_class)
        assert sorted(c for cs in per_rank for c in cs) == sampled
        for rank, cs in enumerate(per_rank):
            assert all(client_class[c] == rank_class[rank] for c in cs)
        for k in "abc":
            lens = [len(cs) for cs, rk in zip(per_rank, rank_class) if rk == k]
            assert max(lens) - min(lens) <= 1


def test_assign_names_a_client_without_a_rank_of_its_class():
    with pytest.raises(ConfigError, match=r"client 3 \(device class 'big'\) has no rank of its class"):
        assign([0, 3], ["small", "small", "small", "big"], ["small", "small"])
    assign([0, 1], ["small", "small", "small", "big"], ["small", "small"])  # unsampled: no error
    with pytest.raises(ValueError, match="repeat"):
        assign([1, 1], [0, 0], [0])


def test_spread_ranks_gives_every_class_a_rank_in_proportion():
    client_class = ["a"] * 6 + ["b"] * 2 + ["c"] * 1
    assert spread_ranks(client_class, 3) == ["a", "b", "c"]
    assert spread_ranks(client_class, 5) == ["a", "a", "a", "b", "c"]
    assert spread_ranks(client_class, 9) == ["a"] * 6 + ["b"] * 2 + ["c"]  # R = N: a rank per client
    assert spread_ranks([0] * 10, 4) == [0] * 4
    with pytest.raises(ConfigError, match="federation.client_ranks: 2 is invalid; the clients form 3 device classes"):
        spread_ranks(client_class, 2)
    with pytest.raises(ConfigError, match="federation.client_ranks: 10 is invalid"):
        spread_ranks(client_class, 10)


# --- RoundPlan -----------------------------------------------------------------------------

def test_round_plan_slots_and_active_ranks():
    plan = RoundPlan(0, (1, 2, 5, 7, 9), ((1, 7), (2, 9), (5,)))
    assert plan.slots == 2
    assert [plan.client_of(r, 0) for r in range(3)] == [1, 2, 5]
    assert [plan.client_of(r, 1) for r in range(3)] == [7, 9, None]
    assert plan.active_ranks(0) == (0, 1, 2) and plan.active_ranks(1) == (0, 1)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        plan.client_of(0, 2)
    with pytest.raises(ValueError, match="rank 3 out of range"):
        plan.client_of(3, 0)


def test_plan_round_is_ceil_k_over_r_slots_and_trains_each_participant_once():
    client_class, rank_class = [0] * 100, [0] * 8
    for r in range(20):
        plan = plan_round(42, r, client_class, rank_class, per_round=20)
        assert plan.slots == 3  # ceil(20 / 8)
        trained = [plan.client_of(rank, s) for s in range(plan.slots) for rank in plan.active_ranks(s)]
        assert sorted(trained) == list(plan.sampled) == sample_round(42, r, 100, 20)
        assert plan == plan_round(42, r, client_class, rank_class, per_round=20)


def test_defaults_are_todays_federation():
    # R = K = N: every client every round, client c on rank c, in one slot.
    for client_class in ([0] * 4, [0, 1, 0, 1], ["x", "y", "y", "x"]):
        plan = plan_round(0, 6, client_class, spread_ranks(client_class, 4), per_round=4)
        assert plan.slots == 1 and plan.active_ranks(0) == (0, 1, 2, 3)
        assert [plan.client_of(r, 0) for r in range(4)] == [0, 1, 2, 3]


def test_with_one_rank_per_client_a_client_keeps_its_rank_in_every_round():
    """R = N with K < N: client c runs on rank c whenever it is sampled (its own device, so it may
    keep its optimizer state); the other ranks sit the round out."""
    classes = (0, 0, 1, 1, 0)
    ranks = spread_ranks(classes, 5)
    for r in range(20):
        plan = plan_round(3, r, classes, ranks, 2)
        assert [list(cs) for cs in plan.per_rank] == [[c] if c in plan.sampled else [] for c in range(5)]
        assert plan.slots == 1
