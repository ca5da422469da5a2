"""What each mode decides: its ranks, its main rank, who computes the loss, its schedule."""

from splitlora_ds.modes import MODES, get_mode
from splitlora_ds.runtime.schedules import SCHEDULES
from splitlora_ds.topology import Role


def test_layouts_and_main_ranks():
    split, seq = get_mode("split", 3, 2), get_mode("sequential", 3, 2)
    fedlora, central = get_mode("fedlora", 3, 2), get_mode("centralized", 3, 2)
    assert [m.world_size for m in (split, seq, fedlora, central)] == [5, 5, 3, 1]
    assert (split.main_rank, seq.main_rank, fedlora.main_rank, central.main_rank) == (4, 4, 0, 0)
    assert central.role_of(0) == Role("centralized", 0, 0)
    assert [fedlora.role_of(r).name for r in range(3)] == ["client0", "client1", "client2"]


def test_who_computes_the_loss():
    split = get_mode("split", 2, 2)
    assert [split.computes_loss(split.role_of(r)) for r in range(4)] == [False, False, False, True]
    fedlora = get_mode("fedlora", 2, 1)
    assert all(fedlora.computes_loss(fedlora.role_of(r)) for r in range(2))
    assert get_mode("centralized", 2, 1).computes_loss(Role("centralized", 0, 0))


def test_every_mode_has_its_schedule_and_aggregation_rule():
    assert set(MODES) == set(SCHEDULES)
    for name in MODES:
        mode = get_mode(name, 2, 1)
        assert mode.schedule(1, 3, 2).mode == name
    assert [get_mode(n, 2, 1).averages_adapters for n in ("split", "fedlora", "sequential", "centralized")] == \
        [True, True, False, False]
    assert not get_mode("sequential", 2, 1).serves_all_clients
