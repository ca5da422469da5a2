"""Non-IID partitions: Dirichlet label skew, histograms, skew, and the validation holdout."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from splitlora_ds.data import (
    dirichlet_partition,
    holdout_by_group,
    iid_partition,
    label_histograms,
    read_e2e_csv,
    skew,
)
from splitlora_ds.errors import ConfigError

DEVSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e" / "devset.csv"


def _labels() -> list[str]:
    if DEVSET.is_file():
        return [r.get("eatType", "<none>") for r in read_e2e_csv(DEVSET)]
    rng = random.Random(0)
    return [rng.choice(["pub", "restaurant", "coffee shop", "<none>"]) for _ in range(2000)]


def _assert_cover(shards: list[list[int]], n: int) -> None:
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    assert all(s == sorted(s) and s for s in shards)


def test_dirichlet_deterministic_disjoint_cover():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    shards = dirichlet_partition(labels, 4, 0.5, seed=7)
    _assert_cover(shards, 100)
    assert shards == dirichlet_partition(labels, 4, 0.5, seed=7)
    assert shards != dirichlet_partition(labels, 4, 0.5, seed=8)
    assert dirichlet_partition([1, 2, 3], 1, 0.1, seed=0) == [[0, 1, 2]]  # any hashable labels


def test_dirichlet_every_client_gets_a_sample():
    # One label, few samples, small alpha: single draws often leave a client empty; redraws fix it.
    for seed in range(20):
        shards = dirichlet_partition(["x"] * 12, 4, 0.3, seed)
        _assert_cover(shards, 12)
    with pytest.raises(ConfigError) as info:
        dirichlet_partition(["x"] * 6, 3, 0.01, seed=0)
    msg = str(info.value)
    assert msg.startswith("data.dirichlet_alpha: 0.01 left client ")
    assert msg.endswith(" without samples after 100 draws; raise data.dirichlet_alpha "
                        "or lower federation.clients")
    with pytest.raises(ConfigError) as info:
        dirichlet_partition(["x", "y"], 3, 1.0, seed=0)
    assert str(info.value) == ("federation.clients: 3 clients but only 2 training samples; "
                               "every client needs at least one")


def test_skew_decreases_with_alpha():
    labels = _labels()
    iid = iid_partition(len(labels), 3, seed=0)
    assert skew(labels, iid) < 0.05
    for seed in range(3):
        s = [skew(labels, dirichlet_partition(labels, 3, a, seed)) for a in (0.05, 1.0, 100.0)]
        assert s[0] > s[1] > s[2], s
    disjoint = [[0, 1], [2, 3]]
    assert skew(["a", "a", "b", "b"], disjoint) == pytest.approx(0.5)
    assert skew(["a", "b", "a", "b"], disjoint) == 0.0


def test_label_histograms():
    labels = ["pub", "cafe", "pub", None, "pub"]
    assert label_histograms(labels, [[0, 1, 3], [2, 4], []]) == [
        {"None": 1, "cafe": 1, "pub": 1}, {"pub": 2}, {}]
    assert list(label_histograms(labels, [[0, 1, 3]])[0]) == ["None", "cafe", "pub"]  # sorted


def test_holdout_by_group_keeps_groups_whole():
    groups = [f"mr{i % 7}" for i in range(40)]
    train, val = holdout_by_group(groups, 0.3, seed=1)
    assert sorted(train + val) == list(range(40)) and train == sorted(train) and val == sorted(val)
    held = {groups[i] for i in val}
    assert len(held) == 2 and held.isdisjoint(groups[i] for i in train)  # round(0.3 * 7) groups
    assert (train, val) == holdout_by_group(groups, 0.3, seed=1)
    assert [holdout_by_group(groups, 0.3, s)[1] for s in range(5)] != [val] * 5
    # At least one group held out, at least one kept.
    assert len({groups[i] for i in holdout_by_group(groups, 0.01, 0)[1]}) == 1
    assert len({groups[i] for i in holdout_by_group(groups, 0.99, 0)[0]}) == 1
    assert holdout_by_group(groups, 0.0, 0) == (list(range(40)), [])
    with pytest.raises(ConfigError, match="data.validation_fraction: 0.5 needs at least 2"):
        holdout_by_group(["same"] * 5, 0.5, 0)
