"""Secure aggregation of heterogeneous clients (federation/secure_lowrank.py): the masked sums give
the plain low-rank exchange's factors, every upload is masked whatever the adapters, and a
multi-rank run with per-client ranks and split points equals the same run without masks."""

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from _launch import check, launch, load_adapters, scalars, write_recipe
from _ranks import run_ranks
from test_federation_strategies import _CLIENT_WEIGHTS, _HOLDERS, _SETUP, _factors, _groups, _stage
from splitlora_ds.federation.build import build_aggregator
from splitlora_ds.federation.exchange import LowRankExchange, LowRankSetup
from splitlora_ds.federation.lowrank import Factors, aggregate_state_dicts
from splitlora_ds.federation.secure import MODULUS_BITS, decode, encode, pair_seed
from splitlora_ds.federation.secure_lowrank import (buffer_layout, contribution, fraction_bits, masked_upload,
                                                    unpack)
from splitlora_ds.topology import Groups, Role


def _public(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _seeds(n):
    keys = [X25519PrivateKey.generate() for _ in range(n)]
    return [{j: pair_seed(keys[i], _public(keys[j])) for j in range(n) if j != i} for i in range(n)]


# Three participants of ranks 2, 4, 8 (d_out 12, d_in 10). "a" is held by all three; "b" only by
# participants 1 and 2 (a shared block: a later-cutting client and server stage 0), so
# participant 0 must add no mask there and its slice of "b" must still sum to the holders' terms.
RANKS = (2, 4, 8)
WEIGHTS = ({"a": 0.2}, {"a": 0.3, "b": 0.4}, {"a": 0.5, "b": 0.6})


def _states(seed=0, scale_of=lambda r: 16.0 / r, d_out=12, d_in=10, b_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    states, scales = [], []
    for p, r in enumerate(RANKS):
        state = {}
        for m in WEIGHTS[p]:
            state[f"{m}.lora_A.default.weight"] = torch.randn(r, d_in, generator=g)
            state[f"{m}.lora_B.default.weight"] = torch.randn(d_out, r, generator=g) * b_scale
        states.append(state)
        scales.append({m: scale_of(r) for m in WEIGHTS[p]})
    return states, scales


def _own(states, scales, p):
    return {m: Factors(states[p][f"{m}.lora_A.default.weight"], states[p][f"{m}.lora_B.default.weight"],
                       scales[p][m]) for m in WEIGHTS[p]}


def _uploads(states, scales, method, seeds, round_index=0):
    """Every participant's masked upload, and the layout they all computed."""
    owns = [_own(states, scales, p) for p in range(3)]
    holdings = [{m: (f.B.shape[0], f.A.shape[1], f.rank) for m, f in own.items()} for own in owns]
    layout = buffer_layout(holdings, method)
    bits = fraction_bits(method)
    uploads = [masked_upload(encode(contribution({m: (f, WEIGHTS[p][m]) for m, f in owns[p].items()}, layout), bits),
                             p, seeds[p], layout, round_index) for p in range(3)]
    return uploads, layout, owns


@pytest.mark.parametrize("method", ["stacked", "zero_pad"])
@pytest.mark.parametrize("b_scale", [0.1, 1e-3])  # 1e-3: a trained LoRA's small B (fine fixed point)
def test_masked_sums_give_the_plain_exchange_factors(method, b_scale):
    states, scales = _states(b_scale=b_scale)
    uploads, layout, owns = _uploads(states, scales, method, _seeds(3))
    total = decode(np.sum(uploads, axis=0), fraction_bits(method))  # the int64 sum an all-reduce computes
    plain = aggregate_state_dicts(states, WEIGHTS, scales, method)
    for p in range(3):
        got = unpack(total, owns[p], layout)
        assert sorted(got) == sorted(WEIGHTS[p])
        for m, f in got.items():
            assert f.rank == RANKS[p] and f.scale == scales[p][m]
            torch.testing.assert_close(f.A, plain[p][f"{m}.lora_A.default.weight"], rtol=0, atol=1e-6)
            torch.testing.assert_close(f.B, plain[p][f"{m}.lora_B.default.weight"], rtol=0, atol=1e-6)
    if method == "stacked":  # the dense sums: 12 x 10 per module, whatever the ranks
        assert [s.size for s in layout.values()] == [120, 120]
    else:  # A and B padded to the largest rank among each module's holders (8 for both)
        assert [s.size for s in layout.values()] == [8 * 22, 8 * 22]


def test_fedavg_of_equal_ranks_is_the_plain_average():
    states, scales = _states(scale_of=lambda r: 2.0)
    for p in range(3):  # equal ranks: keep the first two rank slots of every participant
        for k in list(states[p]):
            states[p][k] = states[p][k][:2] if ".lora_A." in k else states[p][k][:, :2]
    uploads, layout, owns = _uploads(states, scales, "fedavg", _seeds(3))
    total = decode(np.sum(uploads, axis=0), fraction_bits("fedavg"))
    plain = aggregate_state_dicts(states, WEIGHTS, scales, "fedavg")
    for p in range(3):
        for m, f in unpack(total, owns[p], layout).items():
            torch.testing.assert_close(f.A, plain[p][f"{m}.lora_A.default.weight"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="fedavg averages factors of one rank"):
        buffer_layout([{"a": (12, 10, 2)}, {"a": (12, 10, 4)}], "fedavg")
    with pytest.raises(ValueError, match="adapt weights of different shapes"):
        buffer_layout([{"a": (12, 10, 2)}, {"a": (12, 11, 2)}], "stacked")


def test_dense_updates_are_encoded_finer_within_a_stated_range():
    assert fraction_bits("stacked") == 36 and fraction_bits("zero_pad") == fraction_bits("fedavg") == 24
    x = torch.tensor([1e-3, -2.5e-9, 2047.0])
    assert torch.allclose(decode(encode(x, 36), 36), x.double(), rtol=0, atol=2.0 ** -36)
    with pytest.raises(ValueError, match=r"fixed-point range \+-2048"):
        encode(torch.tensor([3000.0]), 36)
    with pytest.raises(ValueError, match="fixed-point range"):
        encode(torch.tensor([float("inf")]), 36)


def _uniform(words):
    u = words / float(1 << MODULUS_BITS)
    hist = np.histogram(u, bins=8, range=(0, 1))[0]
    return abs(u.mean() - 0.5) < 0.03 and abs(u.std() - 12 ** -0.5) < 0.03 and hist.min() > 0.8 * u.size / 8


@pytest.mark.parametrize("method", ["stacked", "zero_pad"])
def test_an_upload_depends_on_no_ones_values_but_its_own_and_looks_uniform(method):
    seeds = _seeds(3)
    states, scales = _states(seed=1, d_out=120, d_in=100)  # enough words to see a distribution
    uploads, layout, _ = _uploads(states, scales, method, seeds)
    # Participant 0 changes its adapters (to zero, then to 10x): the others' uploads are
    # the same words; its own changes, and looks uniform on [0, 2^48) either way.
    a, b = layout["a"], layout["b"]
    for factor in (0.0, 10.0):
        changed = [{k: v * factor for k, v in s.items()} if p == 0 else s for p, s in enumerate(states)]
        again, _, _ = _uploads(changed, scales, method, seeds)
        assert all(np.array_equal(again[p], uploads[p]) for p in (1, 2))
        assert not np.array_equal(again[0], uploads[0])
        assert _uniform(again[0][a.offset:a.offset + a.size])
        # It holds no "b": nothing of its own and no mask there (b's masks are 1 and 2's alone).
        assert not again[0][b.offset:b.offset + b.size].any()
    # The holders of "b" mask it: participant 1's slice is uniform, not its encoded term.
    encoded = encode(contribution({"b": (_own(states, scales, 1)["b"], 0.4)}, layout), fraction_bits(method))
    assert _uniform(uploads[1][b.offset:b.offset + b.size])
    assert not np.array_equal(uploads[1][b.offset:b.offset + b.size], encoded[b.offset:b.offset + b.size])
    # Fresh masks every round: the same adapters never upload the same words twice.
    later, _, _ = _uploads(states, scales, method, seeds, round_index=1)
    assert not np.array_equal(later[0], uploads[0])


# ---------------------------------------------------------------- over real process groups (gloo)
def _secure_lowrank_ranks(rank, method):
    """Participants of test_federation_strategies' layout (client 0: layer 0 at rank 2; client 1:
    layers 0 and 1 at rank 4; server stage 0: layer 1 at rank 3), two rounds, secure and plain."""
    import torch.distributed as dist

    layers, lora_rank = _HOLDERS[rank]
    role = Role("client", rank, rank) if rank < 2 else Role("server", 0, 2)
    setup = LowRankSetup(method, **_SETUP)
    groups = Groups(clients=None, own=None, aggregation=dist.group.WORLD)
    stages = {s: _stage(layers, lora_rank, seed=rank) for s in ("plain", "secure")}
    plain = LowRankExchange.for_participant(stages["plain"], rank if rank < 2 else None, setup, _CLIENT_WEIGHTS,
                                            dist.group.WORLD)
    secure = build_aggregator(role, 2, groups, stages["secure"], _CLIENT_WEIGHTS, torch.device("cpu"),
                              averages=True, lowrank=setup, secure=True)
    nbytes = []
    for step in range(2):
        for stage in stages.values():  # the same local training on both copies
            with torch.no_grad():
                for p in stage.parameters():
                    p.add_(0.1 * (step + 1) * torch.sin(torch.arange(p.numel(), dtype=torch.float32) + rank).view_as(p))
        plain.aggregate_(dict(stages["plain"].named_parameters()))
        nbytes.append(secure.aggregate_(dict(stages["secure"].named_parameters())))
    after = {s: {layer: _factors(st, layer) for layer in layers} for s, st in stages.items()}
    return type(secure).__name__, after, nbytes, secure.setup_bytes


@pytest.mark.parametrize("method", ["stacked", "zero_pad"])
def test_secure_exchange_over_three_ranks_equals_the_plain_exchange(method):
    for rank, (kind, after, nbytes, setup_bytes) in enumerate(run_ranks(3, _secure_lowrank_ranks, method)):
        assert kind == "SecureLowRankExchange"
        for layer, want in after["plain"].items():
            got = after["secure"][layer]
            assert got.rank == want.rank == _HOLDERS[rank][1]
            torch.testing.assert_close(got.A, want.A, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.B, want.B, rtol=0, atol=1e-6)
        # Layers 0 and 1 (fc: 6 -> 5), int64 words: dense 5 x 6 each, or A and B padded to the
        # largest rank among the module's holders (4 for both: client 1 holds both layers).
        per_module = 5 * 6 if method == "stacked" else 4 * (6 + 5)
        assert nbytes == [2 * per_module * 8] * 2
        assert setup_bytes == (32, 3 * 32)  # server stage 0 takes part in the key agreement


def test_build_aggregator_refuses_dp_clipping_with_the_lowrank_exchange():
    from splitlora_ds.config import PrivacyConfig
    from splitlora_ds.privacy.dp import ClientPrivacy

    privacy = ClientPrivacy(PrivacyConfig(update_clip=0.25), 0.1, 2, 0.6)
    with pytest.raises(ValueError, match="privacy.update_clip=0.25: supports FedAvg of equal ranks"):
        build_aggregator(Role("client", 0, 0), 2, _groups(), torch.nn.Module(), _CLIENT_WEIGHTS,
                         torch.device("cpu"), averages=True, lowrank=LowRankSetup("stacked", **_SETUP), secure=True,
                         privacy=privacy)


# ---------------------------------------------------------------- a real run
@pytest.mark.launcher
@pytest.mark.parametrize("method", ["stacked", "zero_pad"])
def test_a_secure_heterogeneous_run_equals_the_plain_one(tmp_path, method):
    runs = {}
    for secure in (False, True):
        d = tmp_path / str(secure)
        recipe = write_recipe(d, federation={"clients": 2, "aggregate_every": 2, "secure_aggregation": secure,
                                             "aggregation": method},
                              split={"client_layers": [1, 2], "server_stages": 1}, lora={"rank": [2, 4]},
                              train={"output_dir": str(d / "out")})
        check(launch(3, ["--recipe", str(recipe)]))
        runs[secure] = (load_adapters(d / "out", ["client0", "client1", "server0"]),
                        scalars(d / "tb" / "server0"),
                        [scalars(d / "tb" / f"client{c}", "comm/adapter_bytes_sent")[-1] for c in (0, 1)])
    (plain, plain_loss, plain_bytes), (secure, secure_loss, secure_bytes) = runs[False], runs[True]
    assert len(plain_loss) == 4
    np.testing.assert_allclose(secure_loss, plain_loss, rtol=0, atol=1e-5)
    assert plain.keys() == secure.keys()
    assert max((plain[k] - secure[k]).abs().max().item() for k in plain) <= 1e-5
    # Two aggregations. Plain: each client's own factors (client 0: layer 1's c_attn at rank 2;
    # client 1: layers 1 and 2 at rank 4; c_attn is 32 -> 96). Secure, every client the whole
    # buffer as int64 words: stacked, the dense 96 x 32 updates of both modules; zero_pad, A and
    # B of both padded to rank 4 (the largest among each module's holders).
    assert plain_bytes == [2 * 2 * (32 + 96) * 4, 2 * 2 * 4 * (32 + 96) * 4]
    per_module = 96 * 32 if method == "stacked" else 4 * (32 + 96)
    assert secure_bytes == [2 * 2 * per_module * 8] * 2
