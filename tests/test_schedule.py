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
    for mode in ("split", "sequential"):
        schedule = S.Schedule(mode, topo, aggregate_every=2, max_steps=3)
        for step in range(schedule.steps):
            lists = {r: schedule.train(topo.role_of(r), step) for r in range(topo.world_size)}
            _assert_paired(lists)


def _assert_paired(lists: dict[int, list]) -> None:
    for r, ins in lists.items():
        for i in ins:
            if isinstance(i, S.SendActivations):
                assert any(isinstance(j, S.RecvActivations) and r in j.srcs for j in lists[i.dst])
            if isinstance(i, S.SendGrads):
                for dst in i.dsts:
                    assert S.RecvGrads(r) in lists[dst]
            if isinstance(i, S.SendAdapters):
                assert S.RecvAdapters(r) in lists[i.dst]
            if isinstance(i, S.RecvAdapters):
                assert S.SendAdapters(r) in lists[i.src]


def test_role_names():
    topo = Topology(clients=2, server_stages=2)
    assert [topo.role_of(r).name for r in range(4)] == ["client0", "client1", "server0", "server1"]


def test_fedlora_clients_run_the_whole_model_locally():
    topo = Topology(clients=2, server_stages=0)
    schedule = S.Schedule("fedlora", topo, aggregate_every=2, max_steps=3)
    steps = [schedule.train(topo.role_of(0), s) for s in range(3)]
    local = [S.LoadBatch(), S.Forward(), S.ComputeLoss(), S.Backward(), S.OptimizerStep(), S.ReduceLossStats()]
    assert steps[0] == local
    assert steps[1] == steps[2] == local + [S.AverageAdapters()]  # every 2nd step, and the last
    assert not any(isinstance(i, (S.SendActivations, S.RecvGrads)) for i in sum(steps, []))
    assert schedule.eval(topo.role_of(1)) == [S.LoadEvalBatch(), S.Forward(), S.ComputeLoss()]


def test_sequential_clients_take_turns_and_hand_over_their_adapters():
    topo = Topology(clients=3, server_stages=1)
    schedule = S.Schedule("sequential", topo, aggregate_every=2, max_steps=3)
    assert schedule.steps == 9  # every client trains max_steps steps, one client per step
    # Turns of 2 local steps; max_steps=3 is not a multiple of 2, so the last round's turns are 1.
    assert [schedule.active_client(s) for s in range(9)] == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    trains = {c: [s for s in range(9) if S.Forward() in schedule.train(topo.role_of(c), s)] for c in range(3)}
    assert {c: len(v) for c, v in trains.items()} == {0: 3, 1: 3, 2: 3}
    # The server serves only the active client, and the next client starts from its adapters.
    assert schedule.train(topo.role_of(3), 2)[0] == S.RecvActivations((1,))
    assert schedule.train(topo.role_of(0), 1)[-2:] == [S.SendAdapters(1), S.TurnBarrier()]
    assert schedule.train(topo.role_of(1), 1) == [S.RecvAdapters(0), S.TurnBarrier()]
    assert schedule.train(topo.role_of(2), 1) == [S.TurnBarrier()]
    assert schedule.train(topo.role_of(2), 5)[-2:] == [S.SendAdapters(0), S.TurnBarrier()]  # the round wraps
    # No FedAvg in vanilla split learning; the run ends with the last client's model everywhere.
    every = [i for s in range(9) for c in range(3) for i in schedule.train(topo.role_of(c), s)]
    assert S.AverageAdapters() not in every
    assert all(S.ShareAdapters(2) in schedule.train(topo.role_of(c), 8) for c in range(3))
    # Evaluation: clients first take the model of the client that trained last (not after the
    # last step, which already shared it); counts per client are scaled to sequential steps.
    assert schedule.before_eval(topo.role_of(1), 3) == [S.ShareAdapters(1)]
    assert schedule.before_eval(topo.role_of(1), 8) == [] and schedule.before_eval(topo.role_of(3), 3) == []
    assert [s for s in range(9) if schedule.is_eval_step(s, eval_every=1)] == [2, 5, 8]


def test_sequential_with_one_client_is_the_split_step():
    topo = Topology(clients=1, server_stages=2)
    seq, split = S.Schedule("sequential", topo, 3, 4), S.Schedule("split", topo, 3, 4)
    assert seq.steps == split.steps == 4
    for step in range(4):
        for r in range(3):
            assert seq.train(topo.role_of(r), step) == split.train(topo.role_of(r), step)


def test_global_clipping_joins_exactly_the_ranks_that_train_together():
    topo = Topology(clients=2, server_stages=2)
    for mode in ("split", "sequential", "fedlora"):
        layout = Topology(2, 0) if mode == "fedlora" else topo
        schedule = S.Schedule(mode, layout, aggregate_every=2, max_steps=3, clip_global=True)
        for step in range(schedule.steps):
            clips = {r: [i for i in schedule.train(layout.role_of(r), step) if isinstance(i, S.ClipGradients)]
                     for r in range(layout.world_size)}
            joined = {r for r, found in clips.items() if found}
            expected = set(schedule.clip_ranks(step))
            assert joined == expected, (mode, step)
            assert all(clips[r] == [S.ClipGradients(schedule.clip_ranks(step))] for r in joined)
            assert tuple(sorted(expected)) in schedule.clip_rank_sets()
            for r in joined:  # the norm is taken after the backward and before the optimizer step
                kinds = [type(i) for i in schedule.train(layout.role_of(r), step)]
                assert kinds.index(S.Backward) < kinds.index(S.ClipGradients) == kinds.index(S.OptimizerStep) - 1
    sequential = S.Schedule("sequential", topo, aggregate_every=2, max_steps=3, clip_global=True)
    assert [sequential.clip_ranks(s) for s in range(4)] == [(0, 2, 3), (0, 2, 3), (1, 2, 3), (1, 2, 3)]


def test_no_clipping_instruction_unless_global_clipping_is_on():
    topo = Topology(clients=2, server_stages=1)
    for clip_global, mode in ((False, "split"), (True, "centralized")):
        schedule = S.Schedule(mode, topo, aggregate_every=1, max_steps=2, clip_global=clip_global)
        roles = [topo.role_of(r) for r in range(topo.world_size)]
        assert not any(isinstance(i, S.ClipGradients) for role in roles for i in schedule.train(role, 0))
        assert schedule.clip_rank_sets() == []


def test_peers_name_whom_an_instruction_waits_on():
    topo = Topology(clients=3, server_stages=2)
    schedule = S.Schedule("split", topo, aggregate_every=1, max_steps=2, server_aggregates=True, clip_global=True)
    assert schedule.peers(S.RecvGrads(3), 0) == (3,)
    assert schedule.peers(S.SendActivations(4), 3) == (4,)
    assert schedule.peers(S.RecvActivations((0, 1, 2)), 3) == (0, 1, 2)
    assert schedule.peers(S.SendGrads((0, 1, 2)), 3) == (0, 1, 2)
    assert schedule.peers(S.AverageAdapters(), 1) == (0, 2, 3)  # server stage 0 holds shared blocks
    assert schedule.peers(S.ClipGradients((0, 1, 2, 3, 4)), 4) == (0, 1, 2, 3)
    assert schedule.peers(S.TurnBarrier(), 2) == (0, 1)
    assert schedule.peers(S.Forward(), 0) == ()
