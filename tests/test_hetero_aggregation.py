"""Heterogeneous-rank aggregation against products computed directly (float64)."""

import pytest
import torch

from splitlora_ds.federation.fedavg import fedavg
from splitlora_ds.federation.lowrank import Factors, aggregate, aggregate_state_dicts, refactor, stack, zero_pad


def _parts(ranks, d_out=12, d_in=10, alpha=16.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Factors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), alpha / r) for r in ranks]


def _target(parts, weights):
    return sum(w * p.delta() for p, w in zip(parts, weights))


def test_stack_reproduces_the_weighted_sum_of_products():
    parts, weights = _parts([2, 4, 8]), [0.5, 0.3, 0.2]
    A, B = stack(parts, weights)
    assert A.shape == (14, 10) and B.shape == (12, 14)
    assert torch.allclose(B @ A, _target(parts, weights), atol=1e-6, rtol=0)


def test_stack_by_hand():
    # 1x1 "matrices": dW = 0.5 * 2*3 * (1/1) + 0.5 * (4*5) * 2 = 3 + 20
    parts = [Factors(torch.tensor([[3.0]]), torch.tensor([[2.0]]), 1.0),
             Factors(torch.tensor([[5.0]]), torch.tensor([[4.0]]), 2.0)]
    A, B = stack(parts, [0.5, 0.5])
    assert (B @ A).item() == pytest.approx(23.0)


def test_refactor_is_exact_when_the_rank_suffices():
    parts, weights = _parts([2, 3]), [0.6, 0.4]
    A_s, B_s = stack(parts, weights)
    A, B = refactor(A_s, B_s, rank=5, scale=0.25)
    assert A.shape == (5, 10) and B.shape == (12, 5)
    assert torch.allclose(0.25 * B @ A, _target(parts, weights), atol=1e-9)
    assert torch.allclose(A @ A.T, torch.eye(5, dtype=A.dtype), atol=1e-9)  # orthonormal rows


def test_refactor_below_the_rank_is_the_best_approximation():
    parts, weights = _parts([4, 4]), [0.5, 0.5]
    A_s, B_s = stack(parts, weights)
    A, B = refactor(A_s, B_s, rank=3, scale=2.0)
    U, S, Vh = torch.linalg.svd(_target(parts, weights))
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    assert torch.allclose(2.0 * B @ A, best, atol=1e-9)


def test_refactor_of_a_zero_update_keeps_a_trainable():
    # LoRA starts with B = 0: the first aggregation sees dW = 0. A must not collapse to zero too,
    # or the adapter could never train again (both gradients would vanish).
    parts = [Factors(torch.randn(4, 10), torch.zeros(12, 4), 4.0), Factors(torch.randn(2, 10), torch.zeros(12, 2), 8.0)]
    out = aggregate(parts, [0.5, 0.5], "stacked")
    for p, o in zip(parts, out):
        assert o.A.shape == p.A.shape and o.B.shape == p.B.shape
        assert torch.count_nonzero(o.B) == 0
        assert torch.allclose(o.A @ o.A.T, torch.eye(p.rank), atol=1e-5)


def test_stacked_aggregation_gives_each_participant_its_rank_and_the_exact_sum_where_it_fits():
    parts, weights = _parts([1, 2, 8], d_in=16), [0.2, 0.3, 0.5]
    out = aggregate(parts, weights, "stacked")
    assert [o.rank for o in out] == [1, 2, 8]
    # 1 + 2 + 8 = 11 > 8: the rank-8 participant gets the best rank-8 approximation; a rank-11
    # participant would get the sum exactly
    exact = aggregate(parts + [_parts([11], d_in=16, seed=1)[0]], weights + [0.0], "stacked")[-1]
    assert torch.allclose(exact.delta(), _target(parts, weights), atol=1e-4)
    assert not torch.allclose(out[2].delta(), _target(parts, weights), atol=1e-2)


def test_zero_pad_with_equal_ranks_is_fedavg():
    parts, weights = _parts([4, 4, 4]), [0.5, 0.25, 0.25]
    out = zero_pad(parts, weights)
    sds = [{"A": p.A, "B": p.B} for p in parts]
    avg = fedavg(sds, weights)
    for o in out:
        assert torch.allclose(o.A, avg["A"], atol=1e-6) and torch.allclose(o.B, avg["B"], atol=1e-6)


def test_zero_pad_truncates_to_each_rank_and_is_noisy():
    parts, weights = _parts([2, 4]), [0.5, 0.5]
    out = zero_pad(parts, weights)
    assert [o.rank for o in out] == [2, 4]
    # rows 0..1 of the padded average mix both participants; rows 2..3 hold only participant 1's (halved)
    assert torch.allclose(out[1].A[2:], 0.5 * parts[1].A[2:])
    assert torch.allclose(out[1].A[:2], 0.5 * (parts[0].A + parts[1].A[:2]))
    # the cross terms: the padded product is not the weighted sum of the products
    assert not torch.allclose(out[1].delta(), _target(parts, weights), atol=1e-3)


def test_one_participant_and_identical_participants_are_unchanged():
    (p,) = _parts([3])
    (o,) = aggregate([p], [1.0], "stacked")
    assert torch.allclose(o.delta(), p.delta(), atol=1e-4)
    same = aggregate([p, p], [0.5, 0.5], "stacked")
    assert all(torch.allclose(s.delta(), p.delta(), atol=1e-4) for s in same)


def test_errors_name_the_problem():
    a, b = _parts([2]), _parts([2], d_out=5)
    with pytest.raises(ValueError, match="one weight per participant"):
        stack(a, [0.5, 0.5])
    with pytest.raises(ValueError, match="adapts a 5x10 weight"):
        stack(a + b, [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown aggregation method"):
        aggregate(a, [1.0], "mean")


def _sd(module, f):
    return {f"{module}.lora_A.default.weight": f.A, f"{module}.lora_B.default.weight": f.B}


def test_state_dicts_combine_each_module_over_its_holders():
    # client0 holds layer 1; client1 layers 1 and 2; the server layer 2 (for client0) and 3
    (c0_l1,), (c1_l1, c1_l2), (s_l2, s_l3) = _parts([2], d_in=16), _parts([4, 4], d_in=16, seed=1), _parts([8, 8], d_in=16, seed=2)
    m1, m2, m3 = "layers.1.attn.c_attn", "layers.2.attn.c_attn", "layers.3.attn.c_attn"
    states = [_sd(m1, c0_l1), {**_sd(m1, c1_l1), **_sd(m2, c1_l2)}, {**_sd(m2, s_l2), **_sd(m3, s_l3)}]
    weights = [{m1: 0.25}, {m1: 0.75, m2: 0.75}, {m2: 0.25, m3: 1.0}]
    scales = [{m1: c0_l1.scale}, {m1: c1_l1.scale, m2: c1_l2.scale}, {m2: s_l2.scale, m3: s_l3.scale}]
    out = aggregate_state_dicts(states, weights, scales, "stacked")
    assert [sorted(o) for o in out] == [sorted(s) for s in states]  # each keeps its modules and ranks
    for o, f in ((out[1], c1_l1), (out[0], c0_l1)):
        assert o[f"{m1}.lora_A.default.weight"].shape == f.A.shape
    # layer 2: client1 (rank 4) and the server (rank 8) hold it; the server gets the best rank-8
    # approximation of the weighted sum (rank up to 12)
    target2 = 0.75 * c1_l2.delta() + 0.25 * s_l2.delta()
    got2 = s_l2.scale * out[2][f"{m2}.lora_B.default.weight"].double() @ out[2][f"{m2}.lora_A.default.weight"].double()
    U, S, Vh = torch.linalg.svd(target2)
    torch.testing.assert_close(got2, (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-4, rtol=1e-4)
    # a module with one holder of weight 1 comes back as the same update
    got3 = s_l3.scale * out[2][f"{m3}.lora_B.default.weight"].double() @ out[2][f"{m3}.lora_A.default.weight"].double()
    torch.testing.assert_close(got3, s_l3.delta(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="holders' weights add up to 0.500000"):
        aggregate_state_dicts(states, [{m1: 0.25}, {m1: 0.25, m2: 0.75}, {m2: 0.25, m3: 1.0}], scales)


def test_state_dicts_with_equal_ranks_and_splits_are_fedavg():
    parts = _parts([4, 4, 4])
    m = "layers.1.attn.c_attn"
    states = [_sd(m, p) for p in parts]
    w = [0.5, 0.3, 0.2]
    expected = fedavg(states, w)
    for method in ("fedavg", "zero_pad"):
        for o in aggregate_state_dicts(states, [{m: x} for x in w], [{m: p.scale} for p in parts], method):
            for k in expected:
                torch.testing.assert_close(o[k], expected[k], atol=1e-6, rtol=0)
