"""Aggregation strategies (federation/): each one's aggregate_ against numbers computed by hand or
by the pure functions, on in-process ranks (gloo), and build_aggregator's choice of strategy."""

import pytest
import torch
from torch import nn

from _ranks import run_ranks
from splitlora_ds.config import PrivacyConfig
from splitlora_ds.federation.build import build_aggregator
from splitlora_ds.federation.exchange import LowRankExchange, LowRankSetup
from splitlora_ds.federation.fedavg import FedAvg
from splitlora_ds.federation.lowrank import Factors, aggregate
from splitlora_ds.federation.private import Private
from splitlora_ds.privacy.dp import ClientPrivacy, clip_update_
from splitlora_ds.topology import Groups, Role

WEIGHTS = (0.5, 0.3, 0.2)


# ---------------------------------------------------------------- FedAvg
def _hand_masters(rank):
    a = {0: [1.0, 2.0], 1: [3.0, 4.0], 2: [5.0, 6.0]}[rank]
    b = {0: 10.0, 1: 20.0, 2: 40.0}[rank]
    return {"x.lora_A.default.weight": torch.tensor(a), "x.lora_B.default.weight": torch.tensor([[b]])}


def _fedavg_ranks(rank):
    import torch.distributed as dist

    masters = _hand_masters(rank)
    nbytes = FedAvg(WEIGHTS[rank], dist.group.WORLD).aggregate_(masters)
    return masters, nbytes


def test_fedavg_over_three_ranks_is_the_weighted_sum_by_hand():
    for masters, nbytes in run_ranks(3, _fedavg_ranks):
        # 0.5*1 + 0.3*3 + 0.2*5, 0.5*2 + 0.3*4 + 0.2*6; 0.5*10 + 0.3*20 + 0.2*40
        torch.testing.assert_close(masters["x.lora_A.default.weight"], torch.tensor([2.4, 3.4]), rtol=0, atol=1e-6)
        torch.testing.assert_close(masters["x.lora_B.default.weight"], torch.tensor([[19.0]]), rtol=0, atol=1e-6)
        assert nbytes == 3 * 4  # three fp32 values uploaded


# ---------------------------------------------------------------- SecureFedAvg
def _random_masters(rank, seed=0):
    g = torch.Generator().manual_seed(seed + rank)
    return {"a": torch.randn(4, 6, generator=g), "b": torch.randn(9, generator=g)}


def _secure_ranks(rank):
    import torch.distributed as dist

    plain, masked = _random_masters(rank), _random_masters(rank)
    FedAvg(WEIGHTS[rank], dist.group.WORLD).aggregate_(plain)
    # Through the factory, as the trainer builds it (the key agreement is its collective).
    groups = Groups(clients=dist.group.WORLD, own=None, aggregation=dist.group.WORLD)
    secure = build_aggregator(Role("client", rank, rank), 3, groups, nn.Module(), WEIGHTS, torch.device("cpu"),
                              averages=True, secure=True)
    nbytes = secure.aggregate_(masked)
    return type(secure).__name__, plain, masked, nbytes, secure.setup_bytes


def test_secure_fedavg_equals_fedavg():
    for kind, plain, masked, nbytes, setup_bytes in run_ranks(3, _secure_ranks):
        assert kind == "SecureFedAvg"
        for name in plain:
            torch.testing.assert_close(masked[name], plain[name], rtol=0, atol=1e-6)
        assert nbytes == (24 + 9) * 8  # int64 words
        assert setup_bytes == (32, 3 * 32)  # its X25519 public key out, every client's back


# ---------------------------------------------------------------- LowRankExchange
class _LoraLinear(nn.Module):
    """peft's LoRA layer layout, as lora_modules reads it (lora_A/lora_B.default, scaling)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, g: torch.Generator):
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(torch.randn(rank, d_in, generator=g))
            self.lora_B["default"].weight.copy_(torch.randn(d_out, rank, generator=g))
        self.scaling = {"default": alpha / rank}


class _Block(nn.Module):
    def __init__(self, rank: int, g: torch.Generator):
        super().__init__()
        self.fc = _LoraLinear(6, 5, rank, alpha=8.0, g=g)


def _stage(layers, rank, seed):
    g = torch.Generator().manual_seed(seed)
    stage = nn.Module()
    stage.layers = nn.ModuleDict({str(i): _Block(rank, g) for i in layers})
    return stage


# Client 0 cuts after layer 0 (enters the server at 1), client 1 after layer 1 (enters at 2):
# server stage 0 holds layer 1 on client 0's behalf. Ranks differ per participant.
_SETUP = {"entry_layers": (1, 2), "shared_layers": range(1, 2)}
_HOLDERS = {0: ([0], 2), 1: ([0, 1], 4), 2: ([1], 3)}  # group rank: (layers, LoRA rank); 2 = server stage 0
_CLIENT_WEIGHTS = [0.6, 0.4]


def _factors(stage, layer):
    fc = stage.layers[str(layer)].fc
    return Factors(fc.lora_A["default"].weight.detach().clone(), fc.lora_B["default"].weight.detach().clone(),
                   fc.scaling["default"])


def _lowrank_ranks(rank, method):
    import torch.distributed as dist

    layers, lora_rank = _HOLDERS[rank]
    stage = _stage(layers, lora_rank, seed=rank)
    before = {layer: _factors(stage, layer) for layer in layers}
    client = rank if rank < 2 else None
    ex = LowRankExchange.for_participant(stage, client, LowRankSetup(method, **_SETUP), _CLIENT_WEIGHTS,
                                         dist.group.WORLD)
    nbytes = ex.aggregate_(dict(stage.named_parameters()))
    after = {layer: _factors(stage, layer) for layer in layers}
    return before, after, nbytes, ex.weights


@pytest.mark.parametrize("method", ["stacked", "zero_pad"])
def test_lowrank_exchange_equals_the_pure_aggregate(method):
    results = run_ranks(3, _lowrank_ranks, method)
    before = [r[0] for r in results]
    # Layer 0: clients 0 and 1 at their FedAvg weights; layer 1: client 1, and server stage 0
    # speaking for client 0 (entry 1 <= layer 1).
    expected = {0: dict(zip([0, 1], aggregate([before[0][0], before[1][0]], [0.6, 0.4], method))),
                1: dict(zip([1, 2], aggregate([before[1][1], before[2][1]], [0.4, 0.6], method)))}
    assert results[2][3] == {"layers.1.fc": pytest.approx(0.6)}
    for rank, (_before, after, nbytes, _weights) in enumerate(results):
        for layer, got in after.items():
            want = expected[layer][rank]
            assert got.rank == _HOLDERS[rank][1]  # each participant keeps its own rank
            torch.testing.assert_close(got.A, want.A, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.B, want.B, rtol=0, atol=1e-6)
        own = sum((6 + 5) * _HOLDERS[rank][1] * 4 for _ in _HOLDERS[rank][0])  # A and B, fp32
        assert nbytes == (own if rank < 2 else 0)  # server stage 0's copies do not travel


# ---------------------------------------------------------------- Private (DP-FedAvg)
CLIP = 0.5


def _update(rank, round_index):
    g = torch.Generator().manual_seed(100 * round_index + rank)
    return {"a": torch.randn(4, 6, generator=g), "b": torch.randn(9, generator=g)}  # norm ~5 >> CLIP


def _private_ranks(rank, secure):
    import torch.distributed as dist

    masters = _random_masters(0)  # every client starts from the same global adapters
    privacy = ClientPrivacy(PrivacyConfig(update_clip=CLIP, update_noise=0.0), 0.1, 3, max(WEIGHTS))
    privacy.remember_start(list(masters.values()))
    groups = Groups(clients=dist.group.WORLD, own=None, aggregation=dist.group.WORLD)
    agg = build_aggregator(Role("client", rank, rank), 3, groups, nn.Module(), WEIGHTS, torch.device("cpu"),
                           averages=True, secure=secure, privacy=privacy)
    rounds = []
    for r in range(2):
        with torch.no_grad():
            for name, delta in _update(rank, r).items():
                masters[name] += delta
        agg.aggregate_(masters)
        rounds.append({k: v.clone() for k, v in masters.items()})
    return type(agg).__name__, type(agg.inner).__name__, rounds, privacy.rounds


def _expected_private_rounds():
    """Two rounds by hand: each client's update since the last aggregate, clipped to CLIP, summed
    with the weights (the second round's start is the first round's result)."""
    start, out = _random_masters(0), []
    for r in range(2):
        total = {k: torch.zeros_like(v) for k, v in start.items()}
        for c, w in enumerate(WEIGHTS):
            current = {k: start[k] + d for k, d in _update(c, r).items()}
            norm = clip_update_(list(current.values()), list(start.values()), CLIP)
            assert norm > 2 * CLIP  # the clip binds
            for k in total:
                total[k] += w * current[k]
        out.append(total)
        start = total
    return out


@pytest.mark.parametrize("secure", [False, True])
def test_private_clips_each_update_before_the_sum_and_restarts_from_the_aggregate(secure):
    expected = _expected_private_rounds()
    for kind, inner, rounds, dp_rounds in run_ranks(3, _private_ranks, secure):
        assert (kind, inner, dp_rounds) == ("Private", "SecureFedAvg" if secure else "FedAvg", 2)
        for got, want in zip(rounds, expected):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- build_aggregator's choice
_CPU = torch.device("cpu")
_GROUP = object()  # stands for a process group: nothing here communicates


def _groups(aggregation=_GROUP):
    return Groups(clients=_GROUP, own=None, aggregation=aggregation)


def test_build_aggregator_picks_fedavg_for_clients_and_nothing_where_no_averaging_happens():
    client, server = Role("client", 1, 1), Role("server", 0, 3)
    fedavg = build_aggregator(client, 3, _groups(), nn.Module(), WEIGHTS, _CPU, averages=True)
    assert isinstance(fedavg, FedAvg) and fedavg.weight == 0.3 and fedavg.group is _GROUP
    assert fedavg.setup_bytes == (0, 0)
    assert build_aggregator(client, 3, _groups(), nn.Module(), WEIGHTS, _CPU, averages=False) is None  # sequential
    assert build_aggregator(client, 1, _groups(), nn.Module(), [1.0], _CPU, averages=True) is None
    assert build_aggregator(server, 3, _groups(None), nn.Module(), [], _CPU, averages=True) is None
    # Activation-only privacy leaves the aggregation alone.
    privacy = ClientPrivacy(PrivacyConfig(activation_clip=1.0), 0.1, 3, max(WEIGHTS))
    assert isinstance(build_aggregator(client, 3, _groups(), nn.Module(), WEIGHTS, _CPU, averages=True,
                                       privacy=privacy), FedAvg)
    privacy = ClientPrivacy(PrivacyConfig(update_clip=1.0), 0.1, 3, max(WEIGHTS))
    private = build_aggregator(client, 3, _groups(), nn.Module(), WEIGHTS, _CPU, averages=True, privacy=privacy)
    assert isinstance(private, Private) and isinstance(private.inner, FedAvg) and private.weight == 0.3


def test_build_aggregator_picks_the_lowrank_exchange_for_its_participants():
    lowrank = LowRankSetup("stacked", **_SETUP)
    server_stage = _stage([1], 3, seed=0)
    ex = build_aggregator(Role("server", 0, 2), 2, _groups(), server_stage, _CLIENT_WEIGHTS, _CPU, averages=True,
                          lowrank=lowrank)
    assert isinstance(ex, LowRankExchange) and not ex.uploads and ex.modules == {"layers.1.fc"}
    assert ex.group is _GROUP and ex.method == "stacked"
    client = build_aggregator(Role("client", 1, 1), 2, _groups(), _stage([0, 1], 4, seed=1), _CLIENT_WEIGHTS, _CPU,
                              averages=True, lowrank=lowrank)
    assert client.uploads and client.weights == {"layers.0.fc": 0.4, "layers.1.fc": 0.4}
    # A later server stage is in no aggregation group.
    assert build_aggregator(Role("server", 1, 3), 2, _groups(None), _stage([2], 3, seed=0), [], _CPU, averages=True,
                            lowrank=lowrank) is None


def test_build_aggregator_errors_name_the_field_and_value():
    lowrank = LowRankSetup("zero_pad", **_SETUP)
    client = Role("client", 0, 0)
    privacy = ClientPrivacy(PrivacyConfig(update_clip=0.25), 0.1, 2, 0.6)
    with pytest.raises(ValueError, match="privacy.update_clip=0.25"):
        build_aggregator(client, 2, _groups(), nn.Module(), _CLIENT_WEIGHTS, _CPU, averages=True, lowrank=lowrank,
                         privacy=privacy)
    with pytest.raises(ValueError, match=r"client_weights: need one per client \(3\), got \[0.6, 0.4\]"):
        build_aggregator(client, 3, _groups(), nn.Module(), _CLIENT_WEIGHTS, _CPU, averages=True)
    with pytest.raises(ValueError, match="LowRankExchange method must be one of .*'svd'"):
        LowRankExchange(nn.Module(), set(), {}, "svd", None, uploads=True)
    with pytest.raises(ValueError, match="FedAvg weight must be in \\[0, 1\\], got 1.5"):
        FedAvg(1.5, None)
