"""The split plan as data: which layers each role holds."""

import pytest

from splitlora_ds.errors import ConfigError
from splitlora_ds.partition import centralized_plan, make_split_plan


def test_one_server_stage_holds_the_rest():
    plan = make_split_plan(num_blocks=4, client_layers=[2, 2], server_stages=1)
    assert [(s.name, s.start, s.stop) for s in plan.all_stages()] == [
        ("client0", 0, 3), ("client1", 0, 3), ("server0", 3, 6)]
    c, s = plan.clients[0], plan.server[0]
    assert c.holds_embedding and not c.holds_head and list(c.blocks) == [1, 2]
    assert s.holds_head and not s.holds_embedding and list(s.blocks) == [3, 4]
    assert c.describe() == "embeddings, blocks 0-1" and s.describe() == "blocks 2-3, head"


def test_server_stages_cover_every_layer_once():
    plan = make_split_plan(num_blocks=32, client_layers=[8] * 6, server_stages=2)
    assert [(s.start, s.stop) for s in plan.server] == [(9, 21), (21, 34)]
    covered = sorted(i for s in (plan.clients[0],) + plan.server for i in s.layers)
    assert covered == list(range(34))


def test_uneven_uniform_split_matches_deepspeed():
    plan = make_split_plan(num_blocks=6, client_layers=[1], server_stages=2)
    # 5 server blocks over 2 stages: DeepSpeed's partition_uniform gives 3 + 2.
    assert [len(s.blocks) for s in plan.server] == [3, 2]


def test_parameters_method_balances_head_weight():
    weights = [1.0] * 6
    weights[-1] += 3.0  # a heavy head rides with the last block
    plan = make_split_plan(num_blocks=6, client_layers=[1], server_stages=2, method="parameters",
                           block_weights=weights)
    assert [len(s.blocks) for s in plan.server] == [4, 1]


@pytest.mark.parametrize("k", [0, 4, 5])
def test_split_point_out_of_range(k):
    with pytest.raises(ConfigError, match=rf"split.client_layers: {k} is out of range; the model has 4 blocks"):
        make_split_plan(num_blocks=4, client_layers=[k], server_stages=1)


def test_too_many_server_stages():
    with pytest.raises(ConfigError, match="split.server_stages: 3 stages need at least 3 blocks that no client holds"):
        make_split_plan(num_blocks=4, client_layers=[2], server_stages=3)
    with pytest.raises(ConfigError, match=r"with split.client_layers=\[1, 3\] there are 3 of 6"):
        make_split_plan(num_blocks=6, client_layers=[1, 3], server_stages=4)


def test_per_client_split_points_share_blocks_on_server_stage_zero():
    plan = make_split_plan(num_blocks=8, client_layers=[1, 3, 2], server_stages=2)
    assert [(s.start, s.stop) for s in plan.clients] == [(0, 2), (0, 4), (0, 3)]
    # blocks 2..3 (layers 2, 3) are shared: client1/client2 hold some, server0 holds both for
    # client0; the 5 blocks no client holds (layers 4..8) are spread 3 + 2, head on the last stage
    assert [(s.start, s.stop) for s in plan.server] == [(2, 7), (7, 10)]
    assert plan.entry_layers == (2, 4, 3) and plan.heterogeneous
    assert list(plan.shared_layers) == [2, 3]
    # every layer is held by the server or by every client that needs it before its cut
    for c, entry in zip(plan.clients, plan.entry_layers):
        assert sorted(set(c.layers) | {i for s in plan.server for i in s.layers if i >= entry}) == list(range(10))


def test_equal_split_points_share_nothing():
    plan = make_split_plan(num_blocks=4, client_layers=[2, 2], server_stages=1)
    assert not plan.heterogeneous and list(plan.shared_layers) == []


def test_centralized_plan_is_whole_model():
    p = centralized_plan(3)
    assert list(p.layers) == [0, 1, 2, 3, 4] and p.holds_embedding and p.holds_head


def test_u_shaped_clients_hold_both_ends_and_the_server_the_middle():
    plan = make_split_plan(6, [1, 2], 2, client_tail_layers=1)
    assert plan.u_shaped and not make_split_plan(6, [2], 1).u_shaped
    c0, c1 = plan.clients
    assert c0.layers == (0, 1, 6, 7) and c1.layers == (0, 1, 2, 6, 7)  # embeddings, bottom, last block, head
    assert c1.bottom_layers == range(0, 3) and c1.tail_layers == range(6, 8) and c1.holds_head
    assert c1.describe() == "embeddings, blocks 0-1, tail block 5, head"
    assert c0.describe() == "embeddings, block 0, tail block 5, head"
    assert [s.layers for s in plan.server] == [(2, 3, 4), (5,)]  # shared block 2 rides with stage 0
    assert not any(s.holds_head for s in plan.server)
    head_only = make_split_plan(4, [2], 1, client_tail_layers=0)
    assert head_only.clients[0].layers == (0, 1, 2, 5) and head_only.server[0].layers == (3, 4)
    # every layer is held by the clients or the server, once (the shared block aside)
    for p in (plan, head_only):
        held = {i for s in (p.clients[-1], *p.server) for i in s.layers}
        assert held == set(range(p.num_blocks + 2))


def test_u_shaped_split_must_leave_blocks_to_the_server():
    with pytest.raises(ConfigError, match="split.client_tail_layers: 3 leaves 1 of 6 blocks to the server"):
        make_split_plan(6, [2], 2, client_tail_layers=3)
    with pytest.raises(ConfigError, match=r"split.client_tail_layers: 2 leaves 0 of 6 blocks.*client_layers=4\)"):
        make_split_plan(6, [4], 1, client_tail_layers=2)
    with pytest.raises(ConfigError, match="split.client_tail_layers: 6 leaves no block"):
        make_split_plan(6, [1], 1, client_tail_layers=6)
