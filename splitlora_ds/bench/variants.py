"""Named benchmark runs besides the four modes: the heterogeneous-client comparison (HSplitLoRA).

On a recipe with heterogeneous clients (per-client split points and ranks, or budgets):
- split-weakest: SplitLoRA as a homogeneous deployment must run it, every client sized for the
  weakest one (the smallest split point and rank the recipe gives any client), FedAvg;
- hsplit: the recipe's clients as planned, exact (stacked) aggregation;
- hetlora: the same clients, HetLoRA's zero-padded aggregation.
Each is mode=split plus overrides, so it runs, logs and reports like any mode.

And on any recipe, split-secagg: mode=split with federation.secure_aggregation, to read the
bytes and time that secure aggregation adds against the plain split run. On a recipe with a
privacy section, the utility cost of each DP option: split-no-dp (every option off),
split-dp-activations (the recipe's activation clipping and noise only), split-dp-updates (its
update clipping and noise only).

And on any recipe, the two split topologies side by side (bytes per step, tokens/s, validation
loss): split-standard (the server holds the head and computes the loss, split.client_tail_layers
null; no tail returns a gradient, so DP on tail gradients is off) and split-u-shaped (every client
keeps the recipe's split.client_tail_layers, or 0, the head only, when the recipe sets none; its
labels never leave it, at the price of a second round trip).
"""

from __future__ import annotations

from ..config import MODES, load_config
from ..ds_config import load_ds_config
from ..errors import ConfigError
from ..hetero.setup import resolve_setup
from ..models import get_family

VARIANTS = ("split-weakest", "hsplit", "hetlora", "split-secagg", "split-no-dp", "split-dp-activations",
            "split-dp-updates", "split-standard", "split-u-shaped")
_DP_OFF = {"activations": ["privacy.activation_clip=null", "privacy.activation_noise=0"],
           "updates": ["privacy.update_clip=null", "privacy.update_noise=0"],
           "tail_gradients": ["privacy.tail_gradient_clip=null", "privacy.tail_gradient_noise=0"]}


def _dp_off(*kinds: str) -> list[str]:
    """The overrides that turn these DP options off (keys of _DP_OFF)."""
    return [override for kind in kinds for override in _DP_OFF[kind]]


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
    if name == "split-standard":
        return ["mode=split", "split.client_tail_layers=null", *_dp_off("tail_gradients")]
    if name == "split-u-shaped":
        tail = load_config(recipe, [*overrides, "mode=split"]).split.client_tail_layers
        return ["mode=split", f"split.client_tail_layers={0 if tail is None else tail}"]
    if name == "split-no-dp":
        return ["mode=split", *_dp_off(*_DP_OFF)]
    if name in ("split-dp-activations", "split-dp-updates"):
        kept = name.rsplit("-", 1)[1]
        privacy = load_config(recipe, [*overrides, "mode=split"]).privacy
        if getattr(privacy, f"{kept[:-1]}_clip") is None:
            raise ConfigError(f"--modes {name}: the recipe sets no privacy.{kept[:-1]}_clip to measure")
        return ["mode=split", *_dp_off(*(kind for kind in _DP_OFF if kind != kept))]
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
