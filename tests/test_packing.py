"""Sequence packing: segment-aware causal masks, PackPlan's layout and round trips, and that a
packed batch computes, token for token, what the padded batch does (forward and backward)."""

from __future__ import annotations

import random

import pytest
import torch

from splitlora_ds.config import LoraConfig
from splitlora_ds.models import get_family
from splitlora_ds.models.base import causal_context
from splitlora_ds.partition import centralized_plan
from splitlora_ds.runtime.packing import DEFAULT_PACK_LENGTH, PackPlan, next_token_targets
from splitlora_ds.stage import build_stage

from test_models import tiny_config

NEG = torch.finfo(torch.float32).min


def old_causal_context(attention_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 0/1-mask implementation before segments: the reference at real positions."""
    mask = attention_mask.to(torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"position_ids": position_ids, "attention_mask": additive}


def lengths_mask(lengths: list[int], width: int | None = None) -> torch.Tensor:
    width = max(lengths, default=0) if width is None else width
    return (torch.arange(width)[None] < torch.tensor(lengths, dtype=torch.long)[:, None]).long()


# ---------------------------------------------------------------------------------------------
# causal_context
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [
    torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]),  # right padding
    torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),  # left padding
    torch.tensor([[1, 1, 0, 1, 0]]),  # a hole: today's numbering and context are kept
], ids=["right", "left", "hole"])
def test_binary_mask_matches_the_old_context_at_real_positions(mask):
    new, old = causal_context(mask, torch.float32), old_causal_context(mask, torch.float32)
    real = mask.bool()
    assert torch.equal(new["position_ids"][real], old["position_ids"][real])
    assert torch.equal(new["attention_mask"][:, 0][real], old["attention_mask"][:, 0][real])
    assert int(new["position_ids"].min()) >= 0


def test_padding_queries_attend_to_themselves_only():
    mask = torch.tensor([[0, 1, 1, 0]])
    allowed = causal_context(mask, torch.float32)["attention_mask"][0, 0] == 0
    assert allowed[0].tolist() == [True, False, False, False]
    assert allowed[3].tolist() == [False, False, False, True]
    assert bool(allowed.any(-1).all())  # no all-masked row


def test_two_segments_give_a_block_diagonal_mask_and_restarting_positions():
    ctx = causal_context(torch.tensor([[1, 1, 1, 2, 2, 0]]), torch.float32)
    expected_allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    expected = torch.zeros(6, 6).masked_fill(~expected_allowed, NEG)
    assert torch.equal(ctx["attention_mask"], expected[None, None])
    assert ctx["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]


# ---------------------------------------------------------------------------------------------
# PackPlan
# ---------------------------------------------------------------------------------------------


def test_hand_checked_plan():
    # segments: A = source 0 row 0 (3), B = source 0 row 1 (1), C = source 1 row 0 (2); capacity 4
    # FFD needs 2 bins; balanced: A | C, B (C is placed before B: longer first)
    plan = PackPlan.build([lengths_mask([3, 1]), lengths_mask([2])], capacity=4)
    assert (plan.rows, plan.length) == (2, 3)
    assert plan.segments.tolist() == [[1, 1, 1], [1, 1, 2]]
    assert plan.row_group.tolist() == [0, 0]
    assert (plan.real_tokens, plan.positions) == (6, 6)
    a = torch.tensor([[1, 2, 3], [4, 0, 0]])
    c = torch.tensor([[5, 6]])
    assert plan.pack([a, c], fill=-1).tolist() == [[1, 2, 3], [5, 6, 4]]


def test_pack_unpack_round_trip_and_gradients():
    masks = [lengths_mask([5, 2, 7], width=8), lengths_mask([3, 6])]
    plan = PackPlan.build(masks, capacity=9)
    parts = [torch.randn(3, 8, 4, requires_grad=True), torch.randn(2, 6, 4, requires_grad=True)]
    packed = plan.pack(parts, fill=7.0)
    assert packed.shape == (plan.rows, plan.length, 4)
    assert bool((packed[plan.segments == 0] == 7.0).all())
    assert int((plan.segments > 0).sum()) == plan.real_tokens == 23
    for i, (part, mask) in enumerate(zip(parts, masks)):
        back = plan.unpack(packed, i, fill=-3.0)
        real = mask.bool()
        assert torch.equal(back[real], part[real])
        assert bool((back[~real] == -3.0).all())
    packed.sum().backward()
    for part, mask in zip(parts, masks):
        assert torch.equal(part.grad, mask[..., None].float().expand_as(part))


def test_unpack_is_differentiable():
    plan = PackPlan.build([lengths_mask([2, 3])], capacity=5)
    packed = torch.randn(plan.rows, plan.length, requires_grad=True)
    plan.unpack(packed, 0).sum().backward()
    assert torch.equal(packed.grad, (plan.segments > 0).float())


def test_groups_never_share_a_row():
    masks = [lengths_mask([2, 2]), lengths_mask([1, 3]), lengths_mask([2])]
    plan = PackPlan.build(masks, capacity=16, groups=[1, 0, 1])
    assert plan.row_group.tolist() == [0, 1]  # one row per group, in group order
    tokens = [torch.full((m.shape[0], m.shape[1]), float(g)) for m, g in zip(masks, [1, 0, 1])]
    packed = plan.pack(tokens, fill=-1.0)
    for row, group in zip(packed, plan.row_group.tolist()):
        assert set(row[row >= 0].tolist()) == {float(group)}


def test_padded_reproduces_concat_with_right_padding():
    masks = [lengths_mask([3, 1], width=4), lengths_mask([2, 2], width=2), torch.tensor([[0, 1, 1]])]
    parts = [torch.randn(m.shape[0], m.shape[1], 3) for m in masks]
    plan = PackPlan.padded(masks, groups=[2, 0, 1])
    pad = torch.nn.functional.pad
    expected_mask = torch.cat([pad(m, (0, 4 - m.shape[1])) for m in masks])
    expected = torch.cat([pad(p * m[..., None], (0, 0, 0, 4 - p.shape[1])) for p, m in zip(parts, masks)])
    assert torch.equal(plan.segments, expected_mask)
    assert torch.equal(plan.pack(parts), expected)
    assert plan.row_group.tolist() == [2, 2, 0, 0, 1]


def test_empty_sources_contribute_nothing():
    empty_rows, no_tokens = torch.zeros(0, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
    plan = PackPlan.build([empty_rows, lengths_mask([2]), no_tokens], capacity=4)
    assert (plan.rows, plan.length, plan.real_tokens) == (1, 2, 2)
    parts = [torch.randn(0, 5), torch.tensor([[1.0, 2.0]]), torch.randn(2, 3)]
    packed = plan.pack(parts)
    assert packed.tolist() == [[1.0, 2.0]]
    assert plan.unpack(packed, 0).shape == (0, 5)
    assert torch.equal(plan.unpack(packed, 2, fill=9.0), torch.full((2, 3), 9.0))

    nothing = PackPlan.build([empty_rows, no_tokens])
    assert (nothing.rows, nothing.length) == (0, 1)
    assert nothing.segments.shape == (0, 1) and nothing.row_group.shape == (0,)
    assert nothing.pack([torch.randn(0, 5, 4), torch.randn(2, 3, 4)]).shape == (0, 1, 4)


def test_already_packed_input_keeps_its_segments():
    # a row holding segments 1 (3 tokens) and 2 (2 tokens), and a row with one segment of 4
    mask = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    values = torch.arange(12.0).view(2, 6)
    plan = PackPlan.build([mask], capacity=5)
    assert (plan.rows, plan.length) == (2, 5)
    # longest first: [4] + ... ; the 3 goes to the other bin, then the 2 to the least loaded
    assert plan.segments.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 2, 2]]
    assert plan.pack([values], fill=-1).tolist() == [[6, 7, 8, 9, -1], [0, 1, 2, 3, 4]]
    # every token keeps its context: same positions, same mask, padding removed
    before, after = causal_context(mask, torch.float32), causal_context(plan.segments, torch.float32)
    assert torch.equal(plan.unpack(after["position_ids"], 0)[mask.bool()], before["position_ids"][mask.bool()])


def test_capacity_none_packs_one_row_per_group():
    plan = PackPlan.build([lengths_mask([700, 900]), lengths_mask([500])], capacity=None)
    assert (plan.rows, plan.length) == (1, 2100)
    assert plan.segments[0].unique().tolist() == [1, 2, 3]
    grouped = PackPlan.build([lengths_mask([700, 900]), lengths_mask([500])], capacity=None, groups=[0, 1])
    assert grouped.rows == 2 and grouped.length == 1600


def test_a_segment_longer_than_capacity_gets_a_row_of_its_own():
    plan = PackPlan.build([lengths_mask([10, 3, 2])], capacity=6)
    assert plan.length == 10
    assert plan.segments.tolist()[0] == [1] * 10
    assert int((plan.segments > 0).sum()) == 15


@pytest.mark.parametrize("seed", range(5))
def test_padding_stays_under_five_percent(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(20, 128) for _ in range(12)]
    # spread over three sources, each padded to its own longest
    masks = [lengths_mask(lengths[i::3]) for i in range(3)]
    plan = PackPlan.build(masks, capacity=DEFAULT_PACK_LENGTH)
    assert plan.real_tokens == sum(lengths)
    assert plan.length <= DEFAULT_PACK_LENGTH
    assert (plan.positions - plan.real_tokens) <= 0.05 * plan.real_tokens


def test_many_rows_stay_balanced():
    rng = random.Random(0)
    lengths = [rng.randint(20, 128) for _ in range(64)]
    plan = PackPlan.build([lengths_mask(lengths)], capacity=1024)
    assert plan.rows > 1 and plan.length <= 1024
    assert (plan.positions - plan.real_tokens) <= 0.05 * plan.real_tokens


def test_plan_is_deterministic():
    masks = [lengths_mask([4, 4, 3]), lengths_mask([4, 3])]
    a, b = PackPlan.build(masks, capacity=8), PackPlan.build(masks, capacity=8)
    values = [torch.arange(m.numel()).view(m.shape) + 100 * i for i, m in enumerate(masks)]
    assert torch.equal(a.segments, b.segments) and torch.equal(a.pack(values), b.pack(values))


def test_bad_arguments_name_the_field():
    mask = lengths_mask([2])
    with pytest.raises(ValueError, match="capacity"):
        PackPlan.build([mask], capacity=0)
    with pytest.raises(ValueError, match="groups"):
        PackPlan.build([mask], groups=[0, 1])
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        PackPlan.build([torch.ones(3, dtype=torch.long)])
    plan = PackPlan.build([mask])
    with pytest.raises(ValueError, match=r"parts\[0\]"):
        plan.pack([torch.zeros(1, 3)])
    with pytest.raises(ValueError, match="source"):
        plan.unpack(torch.zeros(1, 2), 1)


def test_next_token_targets_stop_at_segment_ends():
    labels = torch.tensor([[-100, 11, 12, 21, 22, 0], [-100, 5, 6, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 0, 0, 0]])
    assert next_token_targets(labels, mask).tolist() == [
        [11, 12, -100, 22, -100, -100],
        [5, 6, -100, -100, -100, -100],
    ]
    # a right-padded 0/1 batch (labels -100 on padding): today's labels[:, 1:] shift
    labels01 = torch.tensor([[-100, 3, 4, -100]])
    assert next_token_targets(labels01, torch.tensor([[1, 1, 1, 0]]))[0, :-1].tolist() == labels01[0, 1:].tolist()
    # packing the targets keeps every source's targets
    plan = PackPlan.build([mask], capacity=4)
    packed = plan.pack([next_token_targets(labels, mask)], fill=-100)
    assert sorted(packed[packed != -100].tolist()) == [5, 6, 11, 12, 22]
    assert torch.equal(next_token_targets(plan.pack([labels], fill=-100), plan.segments), packed)


# ---------------------------------------------------------------------------------------------
# The packed model computes what the padded one does
# ---------------------------------------------------------------------------------------------


def _stage(family: str, attn: str):
    config = tiny_config(family, attn)
    lora = LoraConfig(rank=2, dropout=0.0, target_modules=["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"])
    stage = build_stage(get_family(family), config, centralized_plan(config.num_hidden_layers), lora, seed=3).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 at init would hide the adapters (and any A gradient)
        for p in stage.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return stage


def _sources():
    gen = torch.Generator().manual_seed(11)
    masks = [lengths_mask([7, 4, 6], width=7), lengths_mask([5, 2], width=6)]
    ids = [torch.randint(1, 300, m.shape, generator=gen).masked_fill(m == 0, 0) for m in masks]
    return ids, masks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_model_matches_padded(family, attn):
    stage = _stage(family, attn)
    ids, masks = _sources()
    params = list(stage.adapter_parameters().values())

    padded = PackPlan.padded(masks)
    packed_plan = PackPlan.build(masks, capacity=10)
    assert packed_plan.rows < padded.rows and packed_plan.positions < padded.positions
    assert bool((packed_plan.segments.max(-1).values > 1).any())  # some row really holds several

    results = []
    for plan in (padded, packed_plan):
        logits = stage(plan.pack(ids), plan.segments)
        real = [plan.unpack(logits, i)[m.bool()] for i, m in enumerate(masks)]
        loss = logits[plan.segments > 0].sum()
        results.append((real, torch.autograd.grad(loss, params)))
    (real_a, grads_a), (real_b, grads_b) = results
    for a, b in zip(real_a, real_b):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for name, a, b in zip(stage.adapter_parameters(), grads_a, grads_b):
        assert float(a.abs().sum()) > 0, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
