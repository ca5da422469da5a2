"""Importance scores, rank allocation, ranking shift and resizing, on hand-made numbers."""

import pytest
import torch

from splitlora_ds.config import LoraConfig
from splitlora_ds.federation.exchange import lora_modules
from splitlora_ds.hetero.importance import (ImportanceTracker, allocate_ranks, kendall_distance, replan_,
                                            resizable, resize_)
from splitlora_ds.models import get_family
from splitlora_ds.partition import make_split_plan
from splitlora_ds.stage import build_stage

from test_models import tiny_config


def _stage(rank=4):
    lora = LoraConfig(rank=rank, alpha=8.0, target_modules=["c_attn", "c_fc"])
    plan = make_split_plan(3, [1], server_stages=1)
    return build_stage(get_family("gpt2"), tiny_config("gpt2"), plan.server[0], lora, seed=1)


def test_score_is_sensitivity_per_unit_of_rank_and_smoothed():
    stage = _stage()
    modules = lora_modules(stage)
    name = "layers.2.block.attn.c_attn"
    A, B, _ = modules[name]
    with torch.no_grad():
        for p in stage.adapter_parameters().values():
            p.fill_(0.5)
            p.grad = torch.full_like(p, 2.0)
    tracker = ImportanceTracker(beta=0.5)
    tracker.update(stage)
    cost = A.shape[1] + B.shape[0]  # 32 in + 96 out (c_attn: q|k|v)
    first = (A.numel() + B.numel()) * 1.0 / cost  # |0.5 x 2| summed over A and B
    assert tracker.scores[name] == pytest.approx(first)
    for p in stage.adapter_parameters().values():
        p.grad = torch.zeros_like(p)
    tracker.update(stage)
    assert tracker.scores[name] == pytest.approx(0.5 * first)  # EMA: 0.5 old + 0.5 x 0


def test_kendall_distance():
    assert kendall_distance(["a", "b", "c"], ["a", "b", "c"]) == 0.0
    assert kendall_distance(["a", "b", "c"], ["c", "b", "a"]) == 1.0
    assert kendall_distance(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)


def test_allocation_by_hand():
    costs = {"x": 10, "y": 10, "z": 20}
    # budget 4 x 40 = 160; x first takes the largest choice that leaves y and z rank 1 (30):
    # 8 x 10 = 80 <= 130; then y: 8 x 10 = 80 > 160 - 80 - 20 = 60 -> 4; z: (160 - 120) / 20 = 2
    assert allocate_ranks(["x", "y", "z"], costs, budget=160, max_rank=8) == {"x": 8, "y": 4, "z": 2}
    ranks = allocate_ranks(["z", "y", "x"], costs, budget=160, max_rank=8)
    assert sum(r * costs[m] for m, r in ranks.items()) <= 160 and ranks["z"] >= ranks["x"]
    with pytest.raises(ValueError, match="cannot give every module rank 1"):
        allocate_ranks(["x", "y", "z"], costs, budget=30, max_rank=8)


def test_resize_keeps_the_update_when_growing_and_approximates_when_shrinking():
    stage = _stage(rank=4)
    name = "layers.2.block.mlp.c_fc"
    A, B, scale = lora_modules(stage)[name]
    with torch.no_grad():
        B.normal_()
    before = scale * (B.double() @ A.double())
    A2, B2 = resize_(stage, name, 8)
    assert A2 is A and A.shape == (8, 32) and B.shape == (128, 8)
    _, _, scale8 = lora_modules(stage)[name]
    assert scale8 == pytest.approx(8.0 / 8)
    torch.testing.assert_close(scale8 * (B.double() @ A.double()), before, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 5, 32)
    module = dict(stage.named_modules())[name]
    out8 = module(x)  # the peft layer runs with the new shapes and scaling
    resize_(stage, name, 2)
    U, S, Vh = torch.linalg.svd(before)
    best = (U[:, :2] * S[:2]) @ Vh[:2]
    _, _, scale2 = lora_modules(stage)[name]
    torch.testing.assert_close(scale2 * (B.double() @ A.double()), best, atol=1e-5, rtol=1e-5)
    assert out8.shape == module(x).shape


def test_replan_moves_rank_to_the_important_modules_within_the_budget():
    stage = _stage(rank=4)
    tracker = ImportanceTracker()
    names = sorted(resizable(stage))
    tracker.scores = {m: float(i) for i, m in enumerate(names)}  # the last name is the most important
    optimizer = torch.optim.AdamW(list(stage.adapter_parameters().values()))
    before = {m: r * c for m, (r, c) in resizable(stage).items()}
    changed = replan_(stage, tracker, role_rank=4, max_rank_factor=2, optimizer=optimizer)
    after = resizable(stage)
    assert changed and sum(r * c for r, c in after.values()) <= sum(before.values())
    assert after[names[-1]][0] == 8 and after[names[0]][0] < 4
    assert tracker.planned == tracker.ranking() and tracker.shift() == 0.0
    out = stage(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long))
    out.sum().backward()
    optimizer.step()  # the optimizer takes the resized parameters


def test_replan_hook_runs_after_aggregation_steps_only_and_past_the_threshold(monkeypatch):
    from splitlora_ds.hetero import replan as hook

    calls = []
    monkeypatch.setattr(hook, "replan_", lambda *a: calls.append(a) or {"layers.1.attn.c_attn": 6})
    tracker = type("T", (), {"shift": lambda self: 0.5})()
    plan = hook.ImportanceReplan(None, tracker, 4, threshold=0.3, max_rank_factor=2, optimizer=None,
                                 aggregate_every=2, max_steps=6)
    assert plan.after_step(0) == ({}, None)  # not an aggregation step
    values, text = plan.after_step(1)
    assert values == {"importance/shift": 0.5, "importance/resized_modules": 1}
    assert text == "after step 2 (ranking shift 0.50): layers.1.attn.c_attn: r=6" and len(calls) == 1
    assert plan.after_step(5) == ({}, None)  # the last step: nothing would train with a new plan
    plan.threshold = 0.6
    assert plan.after_step(3) == ({"importance/shift": 0.5}, None) and len(calls) == 1
