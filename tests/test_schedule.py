"""Instruction lists per role, checked without processes: exact lists for small cases, and a
simulated run of every rank's list (sends never block, receives and collectives do) that must
finish with every message received into the buffer it was sent from."""

from collections import defaultdict, deque

import pytest

from splitlora_ds.modes import get_mode
from splitlora_ds.runtime import instructions as S
from splitlora_ds.runtime.schedules import SequentialSchedule, SplitSchedule, one_f_one_b
from splitlora_ds.topology import Topology


def _schedule(mode, clients, stages, aggregate_every=2, max_steps=3, micro_batches=1, u_shaped=False, **kw):
    return get_mode(mode, clients, stages, u_shaped).schedule(aggregate_every, max_steps, micro_batches, **kw)


# ---------------------------------------------------------------------------- simulation
_COLLECTIVES = (S.ClipGradients, S.AverageAdapters, S.ReduceLossStats, S.ShareAdapters, S.TurnBarrier)


# What each send puts on which channel, and what each receive takes from it.
_SENDS = {S.SendActivations: "act", S.SendGrads: "grad", S.SendAdapters: "adapters",
          S.SendTailActivations: "tail_act", S.SendTailGrads: "tail_grad"}
_RECVS = {S.RecvActivations: "act", S.RecvGrads: "grad", S.RecvAdapters: "adapters",
          S.RecvTailActivations: "tail_act", S.RecvTailGrads: "tail_grad"}


def _simulate(schedule, step, lists=None):
    """Run every rank's list for `step`; fail on a deadlock, a message received as another kind or
    into another buffer than it was sent as, a rank talking to itself, or a message left
    unreceived. Messages between two ranks arrive in the order they were sent, whatever their
    kind: point-to-point messages are matched in order (NCCL has no tags).

    One queue per pair stands for comm.P2P's two channels too (under NCCL, headers and integers
    over a gloo group, floats over the default one): a bundle's sends are all posted at once and
    never block, each channel keeps its own send order, and the receiver takes a bundle's header,
    then its tensors, in the sender's order. Each channel thus carries this queue's sequence,
    restricted to its part of every bundle, and a receive can proceed exactly when it can here."""
    topo = schedule.topology
    lists = lists or {r: schedule.train(topo.role_of(r), step) for r in range(topo.world_size)}
    pos = {r: 0 for r in lists}
    channels = defaultdict(deque)  # (src, dst) -> (kind, buffer id) in flight, in send order

    def members(ins, rank):
        return {rank, *schedule.peers(ins, rank)}

    while any(pos[r] < len(lists[r]) for r in lists):
        progressed = False
        for r, ins_list in lists.items():
            while pos[r] < len(ins_list):
                ins = ins_list[pos[r]]
                assert r not in schedule.peers(ins, r), f"rank {r} waits on itself: {ins}"
                if type(ins) in _SENDS:
                    for dst in schedule.peers(ins, r):
                        channels[(r, dst)].append((_SENDS[type(ins)], getattr(ins, "buffer", None)))
                elif type(ins) in _RECVS:
                    srcs = schedule.peers(ins, r)
                    if not all(channels[(src, r)] for src in srcs):
                        break  # blocked
                    for src in srcs:
                        got = channels[(src, r)].popleft()
                        expected = (_RECVS[type(ins)], getattr(ins, "buffer", None))
                        assert got == expected, f"rank {r}: {ins} received {got} from rank {src}"
                elif isinstance(ins, _COLLECTIVES):
                    group = members(ins, r)
                    if not all(pos[m] < len(lists[m]) and lists[m][pos[m]] == ins for m in group):
                        break  # waits for the others to arrive
                    for m in group - {r}:
                        pos[m] += 1
                pos[r] += 1
                progressed = True
        assert progressed, f"deadlock at step {step}: " + str({r: lists[r][pos[r]] for r in lists if pos[r] < len(lists[r])})
    assert not any(channels.values()), f"unreceived: {dict(channels)}"
    return lists


@pytest.mark.parametrize("u_shaped", [False, True], ids=["standard", "u_shaped"])
@pytest.mark.parametrize("mode", ["split", "sequential"])
def test_every_send_is_received_into_its_buffer_and_nothing_deadlocks(mode, u_shaped):
    """C in 1..4, S in 1..3, M in 1..8, with global clipping and aggregation steps."""
    for clients in range(1, 5):
        for stages in range(1, 4):
            for m in range(1, 9):
                schedule = _schedule(mode, clients, stages, micro_batches=m, clip_global=True,
                                     server_aggregates=clients > 1, u_shaped=u_shaped)
                for step in range(schedule.steps):
                    lists = _simulate(schedule, step)
                    trains = [r for r, ins in lists.items() if S.OptimizerStep() in ins]
                    forwards = {r: sorted(i.buffer for i in lists[r] if isinstance(i, S.Forward)) for r in trains}
                    assert all(f == list(range(m)) for f in forwards.values()), (clients, stages, m, forwards)
                    losses = {r for r, ins in lists.items() if any(isinstance(i, S.ComputeLoss) for i in ins)}
                    last = schedule.topology.world_size - 1
                    expected = {r for r in trains if r != last} - {*schedule.topology.server_ranks} if u_shaped else {last}
                    assert losses == expected, (clients, stages, m)  # the clients score their own data


def test_a_deadlocking_order_is_caught():
    """The simulation can fail: a U-shaped client that waits for its bottom gradient before its
    tail has run never gets it."""
    schedule = _schedule("split", 1, 2, micro_batches=1, u_shaped=True)
    lists = {r: schedule.train(schedule.topology.role_of(r), 0) for r in range(3)}
    client = lists[0]
    tail = client.index(S.RecvTailActivations(0, 2))
    recv_grads = client.index(S.RecvGrads(0, 1))
    client[tail], client[recv_grads] = client[recv_grads], client[tail]
    with pytest.raises(AssertionError, match="deadlock"):
        _simulate(schedule, 0, lists)


def test_messages_between_two_ranks_arrive_in_send_order():
    """With S = 1 the server sends a client both tail activations and bottom gradients; a client
    that took gradient 0 before tail activations 1 would read the wrong message."""
    schedule = _schedule("split", 1, 1, micro_batches=2, u_shaped=True)
    lists = {r: schedule.train(schedule.topology.role_of(r), 0) for r in range(2)}
    backward = [S.RecvGrads(0, 1), S.Backward(0)]
    client = [i for i in lists[0] if i not in backward]
    at = client.index(S.RecvTailActivations(1, 1))
    lists[0] = client[:at] + backward + client[at:]  # bottom backward 0 before tail 1
    with pytest.raises(AssertionError, match="received"):
        _simulate(schedule, 0, lists)


def test_fedlora_step_simulates():
    schedule = _schedule("fedlora", 3, 0, micro_batches=2, clip_global=True)
    for step in range(schedule.steps):
        _simulate(schedule, step)


# ---------------------------------------------------------------------------- exact lists
def test_one_f_one_b_order_matches_deepspeed_train_schedule():
    f, b = (lambda m: [("F", m)]), (lambda m: [("B", m)])
    # depth 3, M 4: the first position warms up with 2 forwards, the last alternates at once
    assert one_f_one_b(0, 3, 4, f, b) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert one_f_one_b(2, 3, 4, f, b) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]
    assert one_f_one_b(0, 3, 1, f, b) == [("F", 0), ("B", 0)]  # fewer micro-batches than the warm-up


def test_client_and_server_lists_with_micro_batches():
    schedule = _schedule("split", 2, 1, aggregate_every=1, max_steps=2, micro_batches=2)
    client, server = schedule.train(schedule.topology.role_of(0), 0), schedule.train(schedule.topology.role_of(2), 0)
    assert client == [S.LoadBatch(), S.Forward(0), S.SendActivations(0, 2), S.Forward(1), S.SendActivations(1, 2),
                      S.RecvGrads(0, 2), S.Backward(0), S.RecvGrads(1, 2), S.Backward(1), S.OptimizerStep(),
                      S.AverageAdapters()]
    assert server == [S.RecvActivations(0, (0, 1)), S.Forward(0), S.ComputeLoss(0), S.Backward(0), S.SendGrads(0, (0, 1)),
                      S.RecvActivations(1, (0, 1)), S.Forward(1), S.ComputeLoss(1), S.Backward(1), S.SendGrads(1, (0, 1)),
                      S.OptimizerStep()]


def test_u_shaped_client_holds_both_ends_of_the_pipeline():
    schedule = _schedule("split", 2, 1, aggregate_every=1, max_steps=2, micro_batches=3, u_shaped=True)
    topo = schedule.topology
    tail = lambda m: [S.RecvTailActivations(m, 2), S.TailForward(m), S.ComputeLoss(m), S.TailBackward(m),  # noqa: E731
                      S.SendTailGrads(m, 2)]
    bottom_fwd = lambda m: [S.Forward(m), S.SendActivations(m, 2)]  # noqa: E731
    bottom_bwd = lambda m: [S.RecvGrads(m, 2), S.Backward(m)]  # noqa: E731
    # depth S + 2 = 3: two bottom forwards ahead, then tail m, bottom forward m + 2, bottom backward m - 1
    assert schedule.train(topo.role_of(0), 0) == [
        S.LoadBatch(), *bottom_fwd(0), *bottom_fwd(1), *tail(0), *bottom_fwd(2),
        *tail(1), *bottom_bwd(0), *tail(2), *bottom_bwd(1), *bottom_bwd(2), S.OptimizerStep(), S.ReduceLossStats(),
        S.AverageAdapters()]
    fwd = lambda m: [S.RecvActivations(m, (0, 1)), S.Forward(m), S.SendTailActivations(m, (0, 1))]  # noqa: E731
    bwd = lambda m: [S.RecvTailGrads(m, (0, 1)), S.Backward(m), S.SendGrads(m, (0, 1))]  # noqa: E731
    # the server waits on the clients' tails: one forward ahead before its first backward
    assert schedule.train(topo.role_of(2), 0) == [*fwd(0), *fwd(1), *bwd(0), *fwd(2), *bwd(1), *bwd(2),
                                                  S.OptimizerStep()]
    assert schedule.eval(topo.role_of(1)) == [S.LoadEvalBatch(), S.Forward(0), S.SendActivations(0, 2),
                                              S.RecvTailActivations(0, 2), S.TailForward(0), S.ComputeLoss(0)]
    assert schedule.eval(topo.role_of(2)) == [S.RecvActivations(0, (0, 1)), S.Forward(0),
                                              S.SendTailActivations(0, (0, 1))]
    assert schedule.peers(S.RecvTailGrads(0, (0, 1)), 2) == (0, 1)
    assert schedule.peers(S.SendTailGrads(0, 2), 0) == (2,)


def test_u_shaped_sequential_reduces_the_loss_instead_of_a_barrier():
    schedule = _schedule("sequential", 2, 1, aggregate_every=1, max_steps=2, u_shaped=True)
    topo = schedule.topology
    assert schedule.train(topo.role_of(1), 0) == [S.RecvAdapters(0), S.ReduceLossStats()]
    assert schedule.train(topo.role_of(0), 0)[-2:] == [S.SendAdapters(1), S.ReduceLossStats()]
    assert get_mode("sequential", 2, 1, True).main_rank == 0 == get_mode("split", 2, 3, True).main_rank
    assert not get_mode("fedlora", 2, 0, True).u_shaped  # no server, no split


def test_first_server_stage_forwards_and_last_computes_loss():
    schedule = _schedule("split", 3, 2, micro_batches=1)
    topo = schedule.topology
    assert schedule.train(topo.role_of(3), 0) == [S.RecvActivations(0, (0, 1, 2)), S.Forward(0), S.SendActivations(0, 4),
                                                  S.RecvGrads(0, 4), S.Backward(0), S.SendGrads(0, (0, 1, 2)),
                                                  S.OptimizerStep()]
    assert schedule.train(topo.role_of(4), 0) == [S.RecvActivations(0, (3,)), S.Forward(0), S.ComputeLoss(0),
                                                  S.Backward(0), S.SendGrads(0, (3,)), S.OptimizerStep()]


def test_aggregation_cadence_and_single_client():
    schedule = _schedule("split", 2, 1, aggregate_every=3, max_steps=10)
    averaged = [s for s in range(10) if S.AverageAdapters() in schedule.train(schedule.topology.role_of(0), s)]
    assert averaged == [2, 5, 8, 9]  # every 3rd step and the last: the run ends with one global model
    one = _schedule("split", 1, 1, aggregate_every=1)
    assert S.AverageAdapters() not in one.train(one.topology.role_of(0), 0)


def test_fedlora_clients_run_the_whole_model_locally():
    schedule = _schedule("fedlora", 2, 0, aggregate_every=2, max_steps=3, micro_batches=2)
    steps = [schedule.train(schedule.topology.role_of(0), s) for s in range(3)]
    local = [S.LoadBatch(), S.Forward(0), S.ComputeLoss(0), S.Backward(0), S.Forward(1), S.ComputeLoss(1),
             S.Backward(1), S.OptimizerStep(), S.ReduceLossStats()]
    assert steps[0] == local
    assert steps[1] == steps[2] == local + [S.AverageAdapters()]  # every 2nd step, and the last
    assert schedule.eval(schedule.topology.role_of(1)) == [S.LoadEvalBatch(), S.Forward(0), S.ComputeLoss(0)]


def test_centralized_step_never_clips_by_instruction():
    schedule = _schedule("centralized", 2, 1, clip_global=True)
    assert schedule.train(schedule.topology.role_of(0), 0) == [S.LoadBatch(), S.Forward(0), S.ComputeLoss(0),
                                                               S.Backward(0), S.OptimizerStep()]
    assert schedule.clip_rank_sets() == []


def test_sequential_clients_take_turns_and_hand_over_their_adapters():
    schedule = _schedule("sequential", 3, 1, aggregate_every=2, max_steps=3)
    assert isinstance(schedule, SequentialSchedule)
    topo = schedule.topology
    assert schedule.steps == 9  # every client trains max_steps steps, one client per step
    # Turns of 2 local steps; max_steps=3 is not a multiple of 2, so the last round's turns are 1.
    assert [schedule.active_client(s) for s in range(9)] == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    trains = {c: [s for s in range(9) if S.Forward(0) in schedule.train(topo.role_of(c), s)] for c in range(3)}
    assert {c: len(v) for c, v in trains.items()} == {0: 3, 1: 3, 2: 3}
    # The server serves only the active client, and the next client starts from its adapters.
    assert schedule.train(topo.role_of(3), 2)[0] == S.RecvActivations(0, (1,))
    assert schedule.train(topo.role_of(0), 1)[-2:] == [S.SendAdapters(1), S.TurnBarrier()]
    assert schedule.train(topo.role_of(1), 1) == [S.RecvAdapters(0), S.TurnBarrier()]
    assert schedule.train(topo.role_of(2), 1) == [S.TurnBarrier()]
    assert schedule.train(topo.role_of(2), 5)[-2:] == [S.SendAdapters(0), S.TurnBarrier()]  # the round wraps
    every = [i for s in range(9) for c in range(3) for i in schedule.train(topo.role_of(c), s)]
    assert S.AverageAdapters() not in every
    assert all(S.ShareAdapters(2) in schedule.train(topo.role_of(c), 8) for c in range(3))
    assert schedule.before_eval(topo.role_of(1), 3) == [S.ShareAdapters(1)]
    assert schedule.before_eval(topo.role_of(1), 8) == [] and schedule.before_eval(topo.role_of(3), 3) == []
    assert [s for s in range(9) if schedule.is_eval_step(s, eval_every=1)] == [2, 5, 8]


def test_sequential_with_one_client_is_the_split_step():
    for m in (1, 3):
        seq, split = _schedule("sequential", 1, 2, 3, 4, m), _schedule("split", 1, 2, 3, 4, m)
        assert isinstance(split, SplitSchedule) and seq.steps == split.steps == 4
        for step in range(4):
            for r in range(3):
                assert seq.train(seq.topology.role_of(r), step) == split.train(split.topology.role_of(r), step)


def test_global_clipping_joins_exactly_the_ranks_that_train_together():
    for mode in ("split", "sequential", "fedlora"):
        schedule = _schedule(mode, 2, 0 if mode == "fedlora" else 2, micro_batches=2, clip_global=True)
        layout = schedule.topology
        for step in range(schedule.steps):
            clips = {r: [i for i in schedule.train(layout.role_of(r), step) if isinstance(i, S.ClipGradients)]
                     for r in range(layout.world_size)}
            joined = {r for r, found in clips.items() if found}
            expected = set(schedule.clip_ranks(step))
            assert joined == expected, (mode, step)
            assert all(clips[r] == [S.ClipGradients(schedule.clip_ranks(step))] for r in joined)
            assert tuple(sorted(expected)) in schedule.clip_rank_sets()
            for r in joined:  # the norm is taken after the last backward and before the optimizer step
                kinds = [type(i) for i in schedule.train(layout.role_of(r), step)]
                last_backward = len(kinds) - 1 - kinds[::-1].index(S.Backward)
                assert last_backward < kinds.index(S.ClipGradients) == kinds.index(S.OptimizerStep) - 1
    sequential = _schedule("sequential", 2, 2, clip_global=True)
    assert [sequential.clip_ranks(s) for s in range(4)] == [(0, 2, 3), (0, 2, 3), (1, 2, 3), (1, 2, 3)]


def test_no_clipping_instruction_unless_global_clipping_is_on():
    schedule = _schedule("split", 2, 1, aggregate_every=1, max_steps=2)
    roles = [schedule.topology.role_of(r) for r in range(3)]
    assert not any(isinstance(i, S.ClipGradients) for role in roles for i in schedule.train(role, 0))
    assert schedule.clip_rank_sets() == []


def test_peers_name_whom_an_instruction_waits_on():
    schedule = _schedule("split", 3, 2, aggregate_every=1, max_steps=2, server_aggregates=True, clip_global=True)
    assert schedule.peers(S.RecvGrads(0, 3), 0) == (3,)
    assert schedule.peers(S.SendActivations(1, 4), 3) == (4,)
    assert schedule.peers(S.RecvActivations(0, (0, 1, 2)), 3) == (0, 1, 2)
    assert schedule.peers(S.SendGrads(0, (0, 1, 2)), 3) == (0, 1, 2)
    assert schedule.peers(S.AverageAdapters(), 1) == (0, 2, 3)  # server stage 0 holds shared blocks
    assert schedule.peers(S.ClipGradients((0, 1, 2, 3, 4)), 4) == (0, 1, 2, 3)
    assert schedule.peers(S.TurnBarrier(), 2) == (0, 1)
    assert schedule.peers(S.Forward(0), 0) == ()


def test_role_names():
    topo = Topology(clients=2, server_stages=2)
    assert [topo.role_of(r).name for r in range(4)] == ["client0", "client1", "server0", "server1"]


# ---------------------------------------------------------------------------- logical clients
def _logical(mode, clients, ranks, per_round, stages=1, aggregate_every=2, max_steps=5, micro_batches=2, **kw):
    from splitlora_ds.federation.participation import Participation, spread_ranks

    classes = (0,) * clients
    participation = Participation(3, classes, tuple(spread_ranks(classes, ranks)), per_round, aggregate_every,
                                  max_steps)
    return get_mode(mode, ranks, stages).schedule(aggregate_every, max_steps, micro_batches,
                                                  participation=participation, **kw)


@pytest.mark.parametrize("mode,stages", [("split", 1), ("split", 2), ("fedlora", 0)])
def test_logical_clients_train_in_their_slots_and_nothing_deadlocks(mode, stages):
    """12 clients on 3 ranks, 5 per round: every sampled client trains exactly its round's local
    steps between one BeginParticipation and one EndParticipation, on one rank; the server
    serves exactly the ranks that train; every rank aggregates once per round."""
    schedule = _logical(mode, 12, 3, 5, stages=stages, clip_global=True)
    p = schedule.participation
    assert schedule.steps == p.steps == sum(plan.slots * p.round_length(r) for r, plan in enumerate(p.plans))
    trained = defaultdict(list)  # (round, client) -> ranks and local steps
    for step in range(schedule.steps):
        lists = _simulate(schedule, step)
        place = p.locate(step)
        for rank in range(3):
            ins = lists[rank]
            begins = [i.client for i in ins if isinstance(i, S.BeginParticipation)]
            ends = [i.client for i in ins if isinstance(i, S.EndParticipation)]
            client = place.client_of(rank)
            if any(isinstance(i, S.OptimizerStep) for i in ins):
                trained[(place.round.round_index, client)].append(rank)
            assert begins == ([client] if client is not None and place.starts_slot else [])
            assert ends == ([client] if client is not None and place.ends_slot else [])
            assert (S.AverageAdapters() in ins) == place.ends_round
        if stages:
            first = schedule.topology.server_rank(0)
            recv = next(i for i in lists[first] if isinstance(i, S.RecvActivations))
            assert recv.srcs == place.active_ranks
    for r, plan in enumerate(p.plans):
        for c in plan.sampled:
            ranks = trained[(r, c)]
            assert len(ranks) == p.round_length(r) and len(set(ranks)) == 1  # one rank, every local step
    assert sum(len(v) for v in trained.values()) == sum(p.round_length(r) * len(plan.sampled)
                                                        for r, plan in enumerate(p.plans))


def test_logical_cadence_ends_at_round_boundaries():
    schedule = _logical("split", 6, 2, 3, aggregate_every=2, max_steps=6)  # 3 rounds of 2 slots x 2 steps
    ends = [s for s in range(schedule.steps) if schedule.participation.locate(s).ends_round]
    assert ends == [3, 7, 11]
    assert [s for s in range(schedule.steps) if schedule.is_due(s, 4)] == [7]  # 4 local steps: after round 2
    assert [s for s in range(schedule.steps) if schedule.is_eval_step(s, 2)] == [3, 7, 11]
    assert [s for s in range(schedule.steps) if schedule.aggregates(s)] == ends
