"""`--dry-run`: the split plan with parameter counts per role, built on the meta device.

Nothing is downloaded or allocated: hub ids of known models plan from models.known, and every
stage is built with meta tensors just to count what each role would hold.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import RunConfig
from .hetero.setup import ClientSetup
from .partition import StagePlan, centralized_plan
from .stage import build_stage


def stage_counts(family, hf_config, plan: StagePlan, cfg: RunConfig, rank: Optional[int] = None) -> tuple[int, int]:
    with torch.device("meta"):
        stage = build_stage(family, hf_config, plan, cfg.lora, cfg.train.seed, rank=rank)
    return stage.parameter_counts()


def setup_report(setup: ClientSetup) -> str:
    """Per-client split points and ranks (and the planner's table when budgets chose them)."""
    lines = []
    if setup.plan_text:
        lines += ["client plan from federation.budgets:", setup.plan_text]
    lines.append(f"clients: split after {list(setup.client_layers)} blocks, LoRA ranks {list(setup.client_ranks)}; "
                 f"server rank {setup.server_rank}; aggregation {setup.aggregation}")
    return "\n".join(lines)


def u_shaped_line(tail_layers: int) -> str:
    """What a U-shaped split moves to the clients (split.client_tail_layers)."""
    last = f"its last {tail_layers} block{'s' if tail_layers != 1 else ''}, " if tail_layers else ""
    return (f"U-shaped split (split.client_tail_layers={tail_layers}): each client also holds {last}the final norm "
            f"and LM head and computes its own loss; the server holds the middle blocks and no head")


def plan_report(cfg: RunConfig, family, hf_config, plan, recipe: str, setup: Optional[ClientSetup] = None) -> str:
    lines = [f"splitlora_ds dry run: {recipe}"]
    targets = cfg.lora.target_modules or list(family.default_target_modules)
    fused = f" (fused q|k|v slices {cfg.lora.fused_qkv})" if cfg.lora.fused_qkv else ""
    lines.append(f"model: {family.name} ({cfg.model.pretrained or 'random init'}), {family.num_blocks(hf_config)} "
                 f"blocks, hidden {hf_config.hidden_size}, vocab {hf_config.vocab_size}")
    lines.append(f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, dropout {cfg.lora.dropout:g} on "
                 f"{', '.join(targets)}{fused}")
    width = 30  # of the layers column
    whole_rank = setup.server_rank if setup is not None else None
    whole_total, whole_trainable = stage_counts(family, hf_config, centralized_plan(family.num_blocks(hf_config)), cfg,
                                                whole_rank)
    if cfg.mode == "fedlora":
        lines.append(f"mode: fedlora, world size {cfg.federation.clients}: every client holds the whole model; "
                     f"FedAvg every {cfg.federation.aggregate_every} step(s)")
    elif plan is None:
        lines.append("mode: centralized (1 process)")
    else:
        method = "FedAvg" if setup is None or setup.aggregation == "fedavg" else f"{setup.aggregation} aggregation"
        how = (f"{method} every {cfg.federation.aggregate_every} step(s)" if cfg.mode == "split" else
               f"clients take turns of {cfg.federation.aggregate_every} step(s) (vanilla split learning)")
        lines.append(f"mode: {cfg.mode}, world size {len(plan.all_stages())} = {len(plan.clients)} clients + "
                     f"{len(plan.server)} server stage(s); {how}")
        if plan.u_shaped:
            lines.append(u_shaped_line(cfg.split.client_tail_layers))
        if setup is not None and (setup.exchanges or setup.plan_text):
            lines.append(setup_report(setup))
        # a U-shaped client's layers ("embeddings, blocks 0-1, tail blocks 10-11, head") outgrow 30
        width = max(width, *(len(sp.describe()) + 2 for sp in plan.all_stages()))
        lines.append(f"{'rank':>4}  {'role':<10}{'layers':<{width}}{'LoRA r':>7}{'params':>16}{'trainable':>14}")
        cache: dict[tuple, tuple[int, int]] = {}
        for rank, sp in enumerate(plan.all_stages()):
            r = (setup.client_ranks[rank] if rank < len(plan.clients) else setup.server_rank) if setup else None
            key = (sp.layers, r)
            if key not in cache:  # identical clients are counted once
                cache[key] = stage_counts(family, hf_config, sp, cfg, r)
            total, trainable = cache[key]
            lines.append(f"{rank:>4}  {sp.name:<10}{sp.describe():<{width}}{r or cfg.lora.rank!s:>7}{total:>16,}"
                         f"{trainable:>14,}")
    lines.append(f"{'':>4}  {'whole':<10}{'(centralized)':<{width}}{'':>7}{whole_total:>16,}{whole_trainable:>14,}")
    d = cfg.data
    where = d.path or (", ".join(d.files) if d.files else None)
    part = d.partition + (f"({d.partition_key}, alpha={d.dirichlet_alpha:g})" if d.partition == "dirichlet" else "")
    origin = f" from {where}" if where else " (generated in code)"
    lines.append(f"data: {d.source}{origin}; partition {part}; max_length {d.max_length}")
    lines.append(f"deepspeed_config: {cfg.deepspeed_config}")
    return "\n".join(lines)
