"""Which adapted modules matter: per-module importance during training, and ranks re-allocated to
the important ones within a role's adapter budget (HSplitLoRA's important-weight selection).

- Score: the first-order sensitivity of the module's LoRA parameters, sum |theta * dL/dtheta| over
  A and B (as AdaLoRA), divided by the module's cost per unit of rank (d_in + d_out) so that wide
  and narrow projections compare per trainable parameter; smoothed over steps with an EMA.
- Allocation: the role keeps its adapter budget (rank x sum of costs, what a uniform rank costs);
  modules in order of importance take the largest rank choice that still leaves every later
  module its minimum rank. A module never drops below `min_rank`, so it keeps a gradient and
  keeps being scored.
- Shift: the normalised Kendall tau distance between the ranking the current ranks were chosen
  from and the current one (0: same order, 1: reversed).
- Resize: a module's factors move to a new rank with the update they carry kept (exactly when the
  rank grows, the best approximation when it shrinks; `federation.lowrank.refactor`).
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Sequence

import torch
from torch import nn

from ..federation.lowrank import refactor
from ..federation.exchange import lora_modules
from .planner import rank_choices


class ImportanceTracker:
    def __init__(self, beta: float = 0.85):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.scores: dict[str, float] = {}
        self.planned: list[str] | None = None  # the ranking the current ranks came from

    @torch.no_grad()
    def update(self, stage: nn.Module) -> None:
        """Fold in the gradients of the backward pass just done (call before the optimizer step)."""
        modules = [(n, A, B) for n, (A, B, _s) in lora_modules(stage).items() if A.grad is not None and B.grad is not None]
        if not modules:
            return
        # One tensor, one copy to the host: no device sync per module.
        raw = torch.stack([((A * A.grad).abs().sum() + (B * B.grad).abs().sum()) / (A.shape[1] + B.shape[0])
                           for _, A, B in modules]).tolist()
        for (name, _A, _B), value in zip(modules, raw):
            old = self.scores.get(name)
            self.scores[name] = value if old is None else self.beta * old + (1 - self.beta) * value

    def ranking(self) -> list[str]:
        """Module names, most important first (ties by name, so every run orders them alike)."""
        return sorted(self.scores, key=lambda m: (-self.scores[m], m))

    def shift(self) -> float:
        if self.planned is None:
            return 1.0 if self.scores else 0.0
        return kendall_distance(self.planned, self.ranking())

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores), "planned": self.planned}

    def load_state_dict(self, state: Mapping) -> None:
        self.scores = dict(state["scores"])
        self.planned = state["planned"]


def kendall_distance(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of pairs of the common items that the two rankings order differently."""
    common = [x for x in a if x in set(b)]
    if len(common) < 2:
        return 0.0
    pos = {x: i for i, x in enumerate(b)}
    pairs = list(combinations(common, 2))  # in a's order
    return sum(pos[x] > pos[y] for x, y in pairs) / len(pairs)


def allocate_ranks(ranking: Sequence[str], costs: Mapping[str, int], budget: float, max_rank: int,
                   min_rank: int = 1) -> dict[str, int]:
    """{module: rank} with sum(rank x cost) <= budget, important modules first."""
    floor = sum(min_rank * costs[m] for m in ranking)
    if floor > budget:
        raise ValueError(f"budget {budget:g} cannot give every module rank {min_rank} (needs {floor:g})")
    choices = [r for r in rank_choices(max_rank) if r >= min_rank]
    left, out = budget, {}
    for i, m in enumerate(ranking):
        reserve = sum(min_rank * costs[x] for x in ranking[i + 1:])
        out[m] = max(r for r in choices if r * costs[m] <= left - reserve)
        left -= out[m] * costs[m]
    return out


@torch.no_grad()
def resize_(stage: nn.Module, module_name: str, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Give one peft LoRA module a new rank in place, carrying its update over; returns its (A, B)
    parameters (the same objects, resized: optimizers keep them, their state must be reset)."""
    module = dict(stage.named_modules())[module_name]
    A, B, scale = lora_modules(stage)[module_name]
    alpha = module.lora_alpha["default"]
    new_scale = alpha / rank
    new_A, new_B = refactor(A.double(), scale * B.double(), rank, new_scale)
    A.data = new_A.to(A.dtype).contiguous()
    B.data = new_B.to(B.dtype).contiguous()
    module.r["default"] = rank
    module.scaling["default"] = new_scale
    module.lora_A["default"].out_features = rank
    module.lora_B["default"].in_features = rank
    return A, B


def resizable(stage: nn.Module) -> dict[str, tuple[int, int]]:
    """{module: (rank, cost per unit of rank)} of the adapters a re-plan may resize (Linear
    LoRA factors; embedding adapters keep their rank)."""
    modules = dict(stage.named_modules())
    return {m: (A.shape[0], A.shape[1] + B.shape[0]) for m, (A, B, _s) in lora_modules(stage).items()
            if "default" in getattr(modules[m], "lora_A", {}) and isinstance(modules[m].lora_A["default"], nn.Linear)}


def replan_(stage: nn.Module, tracker: ImportanceTracker, role_rank: int, max_rank_factor: int,
            optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Re-allocate the stage's ranks by importance within the budget of `role_rank` everywhere.
    Returns the modules whose rank changed; their optimizer state starts afresh."""
    current = resizable(stage)
    ranking = [m for m in tracker.ranking() if m in current]
    if not ranking:
        return {}
    costs = {m: current[m][1] for m in ranking}
    ranks = allocate_ranks(ranking, costs, role_rank * sum(costs.values()), role_rank * max_rank_factor)
    changed = {}
    for m, r in ranks.items():
        if r != current[m][0]:
            for p in resize_(stage, m, r):
                optimizer.state.pop(p, None)  # moments of the old shape mean nothing now
            changed[m] = r
    tracker.planned = ranking
    return changed
