"""Secure aggregation: the masks cancel exactly, every upload is uniformly masked whatever the
adapters, and a run's result equals plain FedAvg (after fixed point)."""

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import serialization

from _launch import check, launch, load_adapters, scalars, write_recipe
from _ranks import run_ranks
from splitlora_ds.federation.secure import (FRACTION_BITS, MODULUS_BITS, SecureAggregator, decode, encode, masked,
                                            pair_seed)


def _public(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _seeds(n):
    keys = [X25519PrivateKey.generate() for _ in range(n)]
    return [{j: pair_seed(keys[i], _public(keys[j])) for j in range(n) if j != i} for i in range(n)]


def test_pair_seeds_agree_and_masks_cancel_exactly():
    seeds = _seeds(3)
    assert seeds[0][2] == seeds[2][0]  # X25519: both ends derive the same seed
    values = [torch.randn(1000) * 0.1 for _ in range(3)]
    uploads = [masked(encode(v), i, seeds[i], round_index=7) for i, v in enumerate(values)]
    total = np.sum(uploads, axis=0)  # the plain integer sum an all-reduce computes
    assert np.array_equal(np.mod(total, 1 << MODULUS_BITS), np.mod(np.sum([encode(v) for v in values], axis=0),
                                                                     1 << MODULUS_BITS))
    torch.testing.assert_close(decode(total).float(), sum(values), atol=3 * 2.0 ** -FRACTION_BITS, rtol=0)


def test_fixed_point_round_trip_and_range():
    x = torch.tensor([0.0, 1.5, -2.25, 1e-3, -8e6])
    assert torch.allclose(decode(encode(x)), x.double(), atol=2.0 ** -FRACTION_BITS)
    with pytest.raises(ValueError, match="fixed-point range"):
        encode(torch.tensor([1e7]))


def test_an_upload_looks_the_same_whatever_the_adapters():
    """What any other rank receives from client 0 is uniform on [0, 2^48): its distribution does
    not depend on client 0's values (compared for all-zero and for large adapters, fresh rounds)."""
    seeds = _seeds(3)
    n = 20000
    for values in (torch.zeros(n), torch.full((n,), 5.0), torch.linspace(-3, 3, n)):
        upload = masked(encode(values), 0, seeds[0], round_index=1) / float(1 << MODULUS_BITS)
        assert abs(upload.mean() - 0.5) < 0.01 and abs(upload.std() - 12 ** -0.5) < 0.01
        histogram = np.histogram(upload, bins=16, range=(0, 1))[0]
        assert histogram.min() > 0.9 * n / 16 and histogram.max() < 1.1 * n / 16
    # fresh masks every round: the same adapters never upload the same words twice
    a, b = (masked(encode(torch.ones(64)), 0, seeds[0], round_index=r) for r in (1, 2))
    assert not np.array_equal(a, b)


def _secure_sum(rank):
    import torch.distributed as dist

    agg = SecureAggregator(rank, dist.group.WORLD, 3)
    g = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g)]
    plain = [t.clone() for t in tensors]
    weight = [0.2, 0.3, 0.5][rank]
    uploaded = agg.weighted_sum_(tensors, weight)
    expected = [t * weight for t in plain]
    for t in expected:
        dist.all_reduce(t)
    return tensors, expected, uploaded, agg.key_bytes


def test_three_clients_get_the_plain_weighted_sum():
    for tensors, expected, uploaded, key_bytes in run_ranks(3, _secure_sum):
        for t, e in zip(tensors, expected):
            torch.testing.assert_close(t, e, atol=1e-6, rtol=0)
        assert uploaded == 27 * 8 and key_bytes == 3 * 32  # int64 words; one 32-byte key per client


@pytest.mark.launcher
def test_a_secure_run_equals_plain_fedavg(tmp_path):
    runs = {}
    for secure in (False, True):
        d = tmp_path / str(secure)
        recipe = write_recipe(d, federation={"clients": 2, "aggregate_every": 2, "secure_aggregation": secure},
                              train={"output_dir": str(d / "out")})
        check(launch(3, ["--recipe", str(recipe)]))
        runs[secure] = (load_adapters(d / "out", ["client0", "client1", "server0"]),
                        scalars(d / "tb" / "client0", "comm/adapter_bytes_sent")[-1])
    (plain, plain_bytes), (secure, secure_bytes) = runs[False], runs[True]
    assert max((plain[k] - secure[k]).abs().max().item() for k in plain) <= 1e-5
    assert secure_bytes == 2 * plain_bytes  # fp32 adapters travel as int64 fixed-point words
