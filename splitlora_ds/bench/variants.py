"""Named benchmark runs besides the four modes: the heterogeneous-client comparison (HSplitLoRA).

On a recipe with heterogeneous clients (per-client split points and ranks, or budgets):
- split-weakest: SplitLoRA as a homogeneous deployment must run it, every client sized for the
  weakest one (the smallest split point and rank the recipe gives any client), FedAvg;
- hsplit: the recipe's clients as planned, exact (stacked) aggregation;
- hetlora: the same clients, HetLoRA's zero-padded aggregation.
Each is mode=split plus overrides, so it runs, logs and reports like any mode.

And on any recipe, split-secagg: mode=split with federation.secure_aggregation, to read the
bytes and time that secure aggregation adds against the plain split run.
"""

from __future__ import annotations

from ..config import MODES, load_config
from ..ds_config import load_ds_config
from ..errors import ConfigError
from ..hetero.setup import resolve_setup
from ..models import get_family

VARIANTS = ("split-weakest", "hsplit", "hetlora", "split-secagg")


def variant_overrides(name: str, recipe: str, overrides: list[str]) -> list[str]:
    """The --set overrides that turn the recipe into run `name` (a mode or a variant)."""
    if name in MODES:
        return [f"mode={name}"]
    if name == "hsplit":
        return ["mode=split", "federation.aggregation=stacked"]
    if name == "hetlora":
        return ["mode=split", "federation.aggregation=zero_pad"]
    if name == "split-secagg":
        return ["mode=split", "federation.secure_aggregation=true"]
    if name == "split-weakest":
        cfg = load_config(recipe, [*overrides, "mode=split"])
        family = get_family(cfg.model.family)
        hf_config = family.load_config(cfg.model.pretrained, cfg.model.config, cfg.model.attn_implementation,
                                       offline_known=True)
        setup = resolve_setup(cfg, family, hf_config, load_ds_config(cfg.deepspeed_config))
        return ["mode=split", f"split.client_layers={min(setup.client_layers)}", f"lora.rank={min(setup.client_ranks)}",
                "lora.server_rank=null", "federation.budgets=null", "federation.aggregation=fedavg",
                "importance.replan_threshold=null"]
    raise ConfigError(f"--modes: unknown run {name!r}; use {', '.join(MODES + VARIANTS)}")
