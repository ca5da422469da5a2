"""HSplitLoRA's re-planning as a hook after aggregation: when the importance ranking has moved
far enough since the last plan, re-allocate this stage's LoRA ranks (importance.replan_)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..runtime.schedules import is_aggregation_step
from .importance import ImportanceTracker, replan_


@dataclass
class ImportanceReplan:
    stage: nn.Module
    tracker: ImportanceTracker
    role_rank: int  # the rank budget: role_rank on every module
    threshold: float  # importance.replan_threshold: the ranking shift that triggers a re-plan
    max_rank_factor: int
    optimizer: torch.optim.Optimizer
    aggregate_every: int
    max_steps: int

    def after_step(self, step: int) -> tuple[dict[str, float], Optional[str]]:
        """After step `step`: the figures to log, and a line saying what changed (None: nothing).
        Only after an aggregation that is not the run's last: every holder of a module re-plans
        from the same aggregated adapters, and a last re-plan would train nothing."""
        if not is_aggregation_step(step, self.aggregate_every, self.max_steps) or step >= self.max_steps - 1:
            return {}, None
        shift = self.tracker.shift()
        values = {"importance/shift": shift}
        if shift <= self.threshold:
            return values, None
        changed = replan_(self.stage, self.tracker, self.role_rank, self.max_rank_factor, self.optimizer)
        values["importance/resized_modules"] = len(changed)
        if not changed:
            return values, None
        return values, (f"after step {step + 1} (ranking shift {shift:.2f}): "
                        + ", ".join(f"{m}: r={r}" for m, r in changed.items()))
