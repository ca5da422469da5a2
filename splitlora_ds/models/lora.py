"""LoRA adapters on ONE pipeline layer via peft, with deterministic init per (seed, layer)."""

from __future__ import annotations

import warnings
import re
from typing import Optional, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from .base import LayerSpec, ModelFamily, seeded_build

# Module types peft's LoRA can wrap that occur in our layers.
_ADAPTABLE = (nn.Linear, Conv1D, nn.Embedding)


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: exact name or dotted suffix
    return name == target or name.endswith("." + target)


def _as_list(target_modules: Sequence[str] | str) -> list[str]:
    # a bare string would otherwise be iterated character by character
    return [target_modules] if isinstance(target_modules, str) else list(target_modules)


def adaptable_modules(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if n and isinstance(m, _ADAPTABLE)]


def inject_lora(
    layer: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    fan_in_fan_out: bool,
    rank_multiplier: Optional[dict[str, int]] = None,
    module_ranks: Optional[dict[str, int]] = None,
) -> list[str]:
    """Add LoRA adapters to the matching modules of `layer`; freeze everything else.

    Returns the adapted module names ([] when nothing in this layer matches: a stage may hold no
    target, e.g. the embedding). Init uses the global CPU RNG; for bit-identical adapters across
    processes use `build_lora_layer` (or seed the RNG yourself) and build on the CPU.
    """
    targets = _as_list(target_modules)
    names = [n for n in adaptable_modules(layer) if any(_matches(n, t) for t in targets)]
    if names:
        # module_ranks {name: r}: per-module ranks (heterogeneous clients, lora.rank_pattern)
        ranks = {n: (module_ranks or {}).get(n, rank) for n in names}
        # rank_multiplier {suffix: m}: those modules get rank m*r and alpha m*alpha, so their
        # scaling alpha/r is unchanged (fused projections carry one r-block per slice).
        mult = {n: m for n in names for t, m in (rank_multiplier or {}).items() if _matches(n, t)}
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            rank_pattern={f"^{re.escape(n)}$": ranks[n] * mult.get(n, 1) for n in names if ranks[n] * mult.get(n, 1) != rank},
            alpha_pattern={f"^{re.escape(n)}$": alpha * m for n, m in mult.items()},
            lora_dropout=dropout,
            target_modules=names,  # exact names: never lets peft hit a non-adaptable container
            fan_in_fan_out=fan_in_fan_out,
            bias="none",
        )
        with warnings.catch_warnings():
            # peft corrects fan_in_fan_out per module (Linear vs Conv1D) and warns each time
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            inject_adapter_in_model(config, layer)
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
    return names


def build_lora_layer(
    spec: LayerSpec,
    seed: int,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    fan_in_fan_out: bool,
    rank_multiplier: Optional[dict[str, int]] = None,
    rank_pattern: Optional[dict[str, int]] = None,
) -> tuple[nn.Module, list[str]]:
    """build_layer + inject_lora, both seeded from (seed, spec.index): two processes get
    bit-identical base and adapter weights. Load pretrained weights afterwards if needed
    (load_layer_weights understands peft's wrapped names). `rank_pattern` {regex: rank} is searched
    in each module's global name "layers.<index>.<module path>" (lora.rank_pattern)."""
    with seeded_build(seed, spec.index):
        layer = spec.build()
    module_ranks = {}
    for pattern, r in (rank_pattern or {}).items():
        for n in adaptable_modules(layer):
            if n not in module_ranks and re.search(pattern, f"layers.{spec.index}.{n}"):
                module_ranks[n] = r
    # separate stream so adapter init does not depend on how many draws the base init made
    with seeded_build(seed, spec.index, "lora"):
        names = inject_lora(layer, rank, alpha, dropout, target_modules, fan_in_fan_out, rank_multiplier,
                            module_ranks)
    return layer, names


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter tensors (lora_A / lora_B ...) by parameter name, detached."""
    return {n: p.detach() for n, p in module.named_parameters() if "lora_" in n}


def target_modules_in_family(family: ModelFamily, config: PretrainedConfig, target_modules: Sequence[str]) -> None:
    """ConfigError unless every target matches some module of an embed, a block or the head.

    Built on the meta device: costs no memory even for a real-sized model.
    """
    targets = _as_list(target_modules)
    if not targets:
        raise ConfigError("lora.target_modules: empty; name at least one module, e.g. "
                          f"{', '.join(family.default_target_modules)}")
    with torch.device("meta"):
        specs = family.layer_specs(config)
        picked = [specs[0], specs[1], specs[-1]] if len(specs) > 2 else specs  # all blocks are alike
        names = [n for s in picked for n in adaptable_modules(s.build())]
    for t in targets:
        if not isinstance(t, str) or not any(_matches(n, t) for n in names):
            short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
            raise ConfigError(
                f"lora.target_modules: {t!r} matches no module of a {family.name} block/model; "
                f"available: {', '.join(short)}"
            )
