"""Instruction lists per role, checked without processes."""

from splitlora_ds import schedule as S
from splitlora_ds.topology import Topology


def test_client_step_and_aggregation_cadence():
    topo = Topology(clients=2, server_stages=1)
    base = [S.LoadBatch(), S.Forward(), S.SendActivations(2), S.RecvGrads(2), S.Backward(), S.OptimizerStep()]
    assert S.client_step(topo, step=0, aggregate_every=2) == base
    assert S.client_step(topo, step=1, aggregate_every=2) == base + [S.AverageAdapters()]
    averaged = [s for s in range(10) if S.AverageAdapters() in S.client_step(topo, s, 3)]
    assert averaged == [2, 5, 8]
    # A run of 10 steps also averages after its last step: it ends with one global model.
    averaged = [s for s in range(10) if S.AverageAdapters() in S.client_step(topo, s, 3, max_steps=10)]
    assert averaged == [2, 5, 8, 9]


def test_single_client_never_averages():
    topo = Topology(clients=1, server_stages=1)
    assert S.AverageAdapters() not in S.client_step(topo, step=0, aggregate_every=1)


def test_server_first_stage_batches_all_clients_and_last_stage_computes_loss():
    topo = Topology(clients=3, server_stages=2)
    first = S.server_step(topo, stage=0)
    last = S.server_step(topo, stage=1)
    assert first == [S.RecvActivations((0, 1, 2)), S.Forward(), S.SendActivations(4), S.RecvGrads(4),
                     S.Backward(), S.SendGrads((0, 1, 2)), S.OptimizerStep()]
    assert last == [S.RecvActivations((3,)), S.Forward(), S.ComputeLoss(), S.Backward(),
                    S.SendGrads((3,)), S.OptimizerStep()]


def test_sends_and_receives_pair_up():
    """Every SendX(dst) on rank r has a matching RecvX with src r on rank dst."""
    topo = Topology(clients=3, server_stages=3)
    lists = {r: S.step_instructions(topo.role_of(r), topo, 0, 1) for r in range(topo.world_size)}
    for r, ins in lists.items():
        for i in ins:
            if isinstance(i, S.SendActivations):
                assert any(isinstance(j, S.RecvActivations) and r in j.srcs for j in lists[i.dst])
            if isinstance(i, S.SendGrads):
                for dst in i.dsts:
                    assert S.RecvGrads(r) in lists[dst]


def test_role_names():
    topo = Topology(clients=2, server_stages=2)
    assert [topo.role_of(r).name for r in range(4)] == ["client0", "client1", "server0", "server1"]


def test_fedlora_clients_run_the_whole_model_locally():
    topo = Topology(clients=2, server_stages=0)
    steps = [S.step_instructions(topo.role_of(0), topo, s, 2, max_steps=3) for s in range(3)]
    local = [S.LoadBatch(), S.Forward(), S.ComputeLoss(), S.Backward(), S.OptimizerStep(), S.ReduceLossStats()]
    assert steps[0] == local
    assert steps[1] == steps[2] == local + [S.AverageAdapters()]  # every 2nd step, and the last
    assert not any(isinstance(i, (S.SendActivations, S.RecvGrads)) for i in sum(steps, []))
    assert S.eval_instructions(topo.role_of(1), topo) == [S.LoadEvalBatch(), S.Forward(), S.ComputeLoss()]
